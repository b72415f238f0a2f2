"""A TrainConfig trained in the test's own process, on one rank (the ``one_rank`` fixture's gloo group): the
library's checks, held data path, recipe steps and export, without Ray Train's worker group.

For learning proofs that need hundreds of steps: two Ray Train ranks syncing through gloo every step on an
oversubscribed 2-core machine (the suite's xdist workers beside them) spend much of each step waiting. In the suite
(2026-12-02, clean clones) the demo test that ran `run_demo` whole took ~18 min; its three trainings and the
evaluation take ~5 min here on one rank (the feature sets and a one-epoch `run_demo` another ~8 min).
What Ray Train adds (worker groups, checkpoints, failure and resume, ZeRO across ranks) is tested in tests/train/
on few steps.
"""

from __future__ import annotations

import os

from vlp.storage import join
from vlp.train import TrainConfig
from vlp.train.recipe import RunLogs, TrainRecipe
from vlp.train.trainer import build_held, check_setup, worker_meta


class NoCheckpoints(TrainRecipe):
    """The recipe with its one Ray Train step left out: checkpoints go through ``ray.train.report``."""

    def save(self, epoch: int, final: bool = False) -> None:
        pass


def train_in_process(cfg: TrainConfig) -> dict:
    """Train ``cfg`` (``scaling.num_workers`` must be 1) as ``run_train`` would, minus checkpoints and resume.
    Needs a local Ray (the held sets are tokenised and materialised by Ray Data, as ``run_train`` does) and the
    ``one_rank`` fixture. -> {"run_dir", "export", "steps"}; metrics.jsonl and the export land in the run folder."""
    assert cfg.scaling.num_workers == 1, "one rank in this process"
    run_dir = join(os.path.abspath(cfg.output_dir), cfg.run_name)
    os.makedirs(run_dir, exist_ok=True)
    setup = check_setup(cfg, log=lambda *_: None)
    recipe = NoCheckpoints(cfg, worker_meta(cfg, setup, run_dir, build_held(cfg)))
    recipe.setup()
    recipe.logs = RunLogs(run_dir, tensorboard=False)
    for epoch in range(cfg.epochs):
        recipe.train_epoch(epoch)
        if recipe.done:
            break
    recipe.logs.close()
    recipe.export(recipe.gather_counters())
    return {"run_dir": run_dir, "export": join(run_dir, "export"), "steps": recipe.step}
