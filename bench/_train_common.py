"""What the training benchmarks (bench/train_*.py) share: their inputs, the model, a plain PyTorch engine for
the baselines, and writing one benchmark's part into bench/results/train.json (not part of the vlp package).

Inputs: demo feature sets made with ``vlp.synth.demo.run_demo(train=false)`` (synthetic 8-frame clips and
images, preset:tiny-clip features, Valley-pooled: 264 visual tokens per video, 257 per image; the instruction
set has 480 conversations, a quarter of them on images), made once and cached under $VLP_CACHE/bench/train
(default ~/.cache/vlp/bench/train). Model everywhere: VideoLLM with preset:tiny-llama (2 layers, width 64) and
a linear connector (vision_hidden_size 64), stage-2 style: LLM + connector trained, AdamW, fp32, CPU.

Each benchmark writes its part (``padding``, ``online``, ``memory``, ``step``) into bench/results/train.json
(train.quick.json with --quick), keeping the other parts of the last results; ``parts_run`` says when each part
ran and ``targets`` whether each met its target.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import RESULTS, WORK, loadavg, write_json  # noqa: E402

import numpy as np  # noqa: E402

TRAIN_WORK = WORK / "train"
SHARDS = {"videos": 8, "images": 8, "instructions": 480, "heldout": 4, "samples_per_shard": 32,
          "image_fraction_in_instructions": 0.25}
TEMPLATE, MAX_LEN, LR, SEED = "vicuna_v1", 512, 1e-3, 0
GLOBAL = 8          # samples per optimizer step (all workers)
DROP = 3            # first steps of a run left out of steady state
TARGET_OVERHEAD, TARGET_ZERO2, TARGET_PAD = 1.15, 0.6, 0.10
PARTS = ("padding", "online", "memory", "step", "tower")
TOKENIZER = "preset:tiny-llama"
# the tower the published numbers were measured with (224 px: 264 visual tokens per video), pinned: the demo's
# default became preset:tiny-clip-synth (112 px, 72 tokens), which shortens every row and changes the results
TOWER = "preset:tiny-clip"


def log(*a):
    print("[bench_train]", *a, flush=True)


def feature_root() -> Path:
    """The demo feature sets (made once, reused)."""
    key = "-".join(f"{k[:3]}{v}" for k, v in SHARDS.items())
    root = TRAIN_WORK / f"demo-v2-{TOWER.split(':')[-1]}-{key}"
    if not (root / ".complete").exists():
        from vlp.config import validate
        from vlp.synth.demo import DemoConfig, run_demo

        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        log(f"making feature sets under {root} (once)")
        run_demo(validate(DemoConfig, {"root": str(root), "shards": SHARDS, "train": False,
                                       "tower": {"path": TOWER}, "ray": {"progress_bars": False, "num_cpus": 2}}),
                 log=lambda *_: None)
        (root / ".complete").write_text(f"{time.perf_counter() - t0:.1f}\n")
        import ray

        if ray.is_initialized():  # the overhead benchmark starts its own Ray (quiet, fixed size)
            ray.shutdown()
    return root


def read_feature_rows(uri: str) -> list[dict]:
    """Committed rows of a feature set, features as stored (fp16 bytes), /2-shaped (a /1 set lifted), like the
    training pipeline sees them."""
    import pyarrow.parquet as pq

    from vlp.formats.featureset import FeatureSetLayout, Manifest, feature_parts, is_v1, lift_v1_row

    v1 = is_v1(Manifest.read(FeatureSetLayout(uri)))
    rows = []
    for p in feature_parts(uri):
        rows += [lift_v1_row(r) if v1 else r for r in pq.read_table(p).to_pylist()]
    return rows


def tokenise(rows: list[dict], fmt: str = "auto", template: str = TEMPLATE, max_length: int = MAX_LEN) -> list[dict]:
    """vlp.train.data.Tokenize over rows (what the Ray Data graph runs); returns rows as the worker sees them."""
    from vlp.train.data import Tokenize

    cols = ("uid", "media_type", "modalities", "features", "shape", "mode", "num_frames", "caption", "conversations")
    batch = {}
    for k in cols:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        batch[k] = arr
    batch["format"] = np.asarray([fmt] * len(rows), dtype=object)
    out = Tokenize(TOKENIZER, template, max_length, "truncate", "valley")(batch)
    res = []
    for i in range(len(rows)):
        r = {k: out[k][i] for k in out}
        if not r["skip"]:
            res.append(r)
    return res


def strip_uid(u: str) -> str:
    """'s0:shard/key#2' (a mixture copy, as logged in samples.jsonl) -> 'shard/key' (the feature row)."""
    return u.split(":", 1)[1].split("#", 1)[0] if ":" in u else u.split("#", 1)[0]


def model_config():
    from vlp.models.videollm import ModelConfig

    return ModelConfig.model_validate({"vision_hidden_size": 64,
                                       "llm": {"path": "preset:tiny-llama", "trainable": True}})


def train_config(name: str, global_size: int, micro: int, zero: int, precision: str = "fp32", workers: int = 1,
                 **over):
    """A TrainConfig of the benchmark's model and optimizer (the data set is not read: recipes built from it
    outside Ray get their micro-batches from the benchmark)."""
    from vlp.config import validate
    from vlp.train import TrainConfig

    d = {"run_name": name, "data": {"sets": [{"uri": "unused"}], "seed": SEED},
         "model": model_config().model_dump(mode="json"),
         "optim": {"lr": LR, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_ratio": 0.03, "schedule": "cosine",
                   "grad_clip": 1.0},
         "batch": {"global_size": global_size, "micro_size": micro},
         "deepspeed": {"zero_stage": zero, "precision": precision}, "scaling": {"num_workers": workers}, **over}
    return validate(TrainConfig, d)


class PlainEngine:
    """The baselines' engine: a plain PyTorch model + AdamW (+ LR schedule) behind DeepSpeed's three calls, so
    that vlp.train.recipe.run_step drives it exactly as it drives a DeepSpeed engine. ``step`` clips the
    gradients to ``grad_clip``, steps the optimizer and the schedule and clears the gradients (no accumulation:
    the benchmarks use grad_accum 1)."""

    def __init__(self, model, opt, sched=None, grad_clip: float = 1.0):
        self.module, self.opt, self.sched, self.grad_clip = model, opt, sched, grad_clip
        self.params = [p for g in opt.param_groups for p in g["params"]]

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_group() -> None:
    """A one-process gloo group (world size 1) for DeepSpeed without Ray."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)


def write_part(part: str, quick: bool, result: dict, started: float, load_start: list, script: str) -> Path:
    """Put one benchmark's result into bench/results/train(.quick).json, keeping the other parts of the last
    results (their ``parts_run`` time stays theirs)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    old_path = RESULTS / f"train{'.quick' if quick else ''}.json"
    old = json.loads(old_path.read_text()) if old_path.exists() else {}
    payload: dict = {"what": "see the docstrings of bench/train_*.py and docs/benchmarks_train.md",
                     "model": "VideoLLM: preset:tiny-llama (2 layers, width 64) + linear connector (64 -> 64); "
                              "LLM + connector trained, AdamW, fp32, CPU",
                     "feature_set": str(feature_root()), "shards": SHARDS}
    parts_run = {}
    for k in PARTS:
        if k == part:
            payload[k], parts_run[k] = result, now
        elif k in old:
            payload[k] = old[k]
            parts_run[k] = old.get("parts_run", {}).get(k, old.get("created_at"))
    payload["loadavg_start"], payload["loadavg_end"] = load_start, loadavg()
    payload["total_s"] = round(time.perf_counter() - started, 1)
    payload["last_script"] = script
    payload["parts_run"] = parts_run
    payload["targets"] = {k: payload[k]["summary"]["met"] for k in ("step", "memory", "padding") if k in payload}
    path = write_json("train", quick, payload)
    log(f"wrote {part} into {path} in {payload['total_s']:.0f}s")
    return path


def bench_main(part: str, script: str, doc: str, quick_help: str, run, add_args=None) -> None:
    """The command line every bench/train_*.py shares: ``--quick`` (+ the script's own flags from ``add_args``),
    ``run(args, feature_root, work_dir) -> result`` timed, the work folder removed, the part written."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if add_args:
        add_args(ap)
    a = ap.parse_args()
    t0, load0 = time.perf_counter(), loadavg()
    root = feature_root()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=TRAIN_WORK))
    try:
        res = run(a, root, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"  {res['summary']}")
    write_part(part, a.quick, res, t0, load0, Path(script).name)
