"""The demo (what `make demo` runs) learns, and its ablation shows what Valley's per-frame CLS tokens buy; the demo's
orchestration trains, evaluates, reports and reuses every finished step.

One module fixture makes the demo's shards and three feature sets at full size (`vlp demo` with ``train=false``).
On them:

- the learning proof trains stage 1, stage 2 and the ablation with the demo's own stage configs
  (``vlp.synth.demo.stage1_config`` / ``stage2_configs``: same data, steps, batch, learning rates, ZeRO stage)
  on one rank in this process (tests/in_process.py: the recipe's steps and held data path, no Ray Train worker
  group) and evaluates both exports on the held-out clips with ``vlp.eval.synthetic.evaluate``;
- the orchestration test runs ``run_demo`` itself on the same folder with one epoch per stage (Ray Train,
  checkpoints, export, evaluation, report) and runs it again to see every step reused.

Stated targets (measured on a 2-core CPU, docs/training.md "Pooling ablation"): stage-2 loss falls at least 5x,
stage-1 loss falls, held-out colour accuracy (choice and generated) at least 0.5; with pooler `valley` the
model tells a direction from its opposite on at least 0.7 of the held-out clips and names it (out of 4) on at
least 0.5, while `patch_mean` (no CLS tokens) stays within 0.1 of chance (0.5) on direction-vs-opposite: the
held-out clips come in reversed pairs, on which an order-blind model scores 0.5 by construction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from in_process import train_in_process
from vlp.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO = ROOT / "configs/local/demo.yaml"


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    """`make demo`'s shards and feature sets (full size, no training) -> (root, {set name: uri}, log lines)."""
    from vlp.synth.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("learning") / "demo"
    lines: list = []
    res = run_demo(load_config(DemoConfig, DEMO, [f"root={root}", "ray.progress_bars=false", "train=false",
                                                  "executor=local"]),  # as make demo (no Ray yet there)
                   log=lines.append)
    assert {n: r["samples"] for n, r in res["features"].items()} == {"pretrain": 128, "instruct": 192, "heldout": 32}
    return root, {n: str(root / "features" / n) for n in ("pretrain", "instruct", "heldout")}


def test_the_demo_learns_and_only_valleys_cls_tokens_tell_direction(demo, one_rank, tmp_path):
    from vlp.eval.synthetic import evaluate
    from vlp.synth.demo import DemoConfig, stage1_config, stage2_configs

    _, features = demo
    cfg = load_config(DemoConfig, DEMO, [f"root={tmp_path}", "num_workers=1"])
    s1 = train_in_process(stage1_config(cfg, features))
    runs = {name: train_in_process(c) for name, c in stage2_configs(cfg, features, s1["export"]).items()}
    assert set(runs) == {"stage2", "stage2_patch_mean"} and runs["stage2"]["steps"] == 600

    l1, l2, la = (_losses(r["run_dir"]) for r in (s1, runs["stage2"], runs["stage2_patch_mean"]))
    assert sum(l1[-3:]) / 3 < l1[0]
    assert l2[0] / (sum(l2[-5:]) / 5) >= 5, (l2[0], l2[-5:])
    assert len(la) == len(l2) and la[0] / (sum(la[-5:]) / 5) >= 5, (la[0], la[-5:])  # same steps, learns too
    valley = evaluate(runs["stage2"]["export"], features["heldout"])["by_type"]
    blind_eval = evaluate(runs["stage2_patch_mean"]["export"], features["heldout"], generate=False)
    assert blind_eval["pooler"] == "patch_mean"
    blind = blind_eval["by_type"]
    summary = {p: {q: round(v["choice_acc"], 2) for q, v in bt.items()} for p, bt in (("valley", valley),
                                                                                       ("patch_mean", blind))}
    print("held-out choice accuracy:", summary)
    colour = valley["color"]
    assert colour["n"] == 32 and colour["chance"] == 0.25
    assert colour["choice_acc"] >= 0.5 and colour["gen_acc"] >= 0.5, summary
    for bt in (valley, blind):
        assert bt["direction"]["n"] == 32 and bt["direction_vs_opposite"]["chance"] == 0.5
    assert valley["direction_vs_opposite"]["choice_acc"] >= 0.7, summary
    assert valley["direction"]["choice_acc"] >= 0.5 and valley["direction"]["gen_acc"] >= 0.5, summary
    assert abs(blind["direction_vs_opposite"]["choice_acc"] - 0.5) <= 0.1, summary


def test_the_demo_trains_evaluates_reports_and_reuses_every_step(demo):
    from vlp.synth.demo import DemoConfig, run_demo

    root, _ = demo
    cfg = load_config(DemoConfig, DEMO, [f"root={root}", "ray.progress_bars=false", "num_workers=1",
                                         "stage1.epochs=1", "stage2.epochs=1"])
    lines: list = []
    res = run_demo(cfg, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "shards: reused" in text and text.count("already complete, 0 to do") == 3  # the fixture's
    assert [res[s]["steps"] for s in ("stage1", "stage2", "ablation")] == [8, 6, 6]
    assert len(_losses(res["stage2"]["run_dir"])) == 6
    assert set(res["eval"]) == {"stage2 (valley)", "stage2 (patch_mean)"}
    for ev in res["eval"].values():
        assert ev["by_type"]["direction"]["n"] == 32 and ev["by_type"]["direction_vs_opposite"]["chance"] == 0.5
    assert res["eval"]["stage2 (patch_mean)"]["pooler"] == "patch_mean"
    assert res["eval"]["stage2 (valley)"]["by_type"]["color"]["gen_acc"] is not None

    rep = root / "report"
    for f in ("report.md", "loss.png", "throughput.png", "data_wait.png", "padding.png", "errors.png"):
        assert (rep / f).stat().st_size > 500, f
    md = (rep / "report.md").read_text()
    assert "| question | n | chance | stage2 (valley) choice | stage2 (valley) generated | stage2 (patch_mean) choice" in md
    assert "| color | 32 | 0.25 |" in md and "| direction_vs_opposite | 32 | 0.50 |" in md
    assert "## Answers on held-out clips" in md
    assert (root / "eval.json").exists() and (root / "demo_config.yaml").exists()
    assert (root / "train" / "stage2" / "export" / "vlp_model.json").exists()

    lines = []
    again = run_demo(cfg, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "shards: reused" in text and text.count("already complete, 0 to do") == 3
    assert again["stage1"]["reused"] and again["stage2"]["reused"] and again["ablation"]["reused"]
    assert "evaluation: reused" in text and again["eval"] == res["eval"]
