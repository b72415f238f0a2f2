"""Training benchmarks: Ray Train + DeepSpeed overhead, ZeRO memory, precomputed vs online features, padding.

    .venv/bin/python bench/bench_train.py [--quick] [--rounds N] [--skip step,memory,online,padding]

Writes bench/results/train.json (train.quick.json with --quick). Every number that depends on how busy
the machine is comes as a ratio against a baseline measured in the same script, interleaved in rounds.

Inputs: demo feature sets made with ``vlp.synth.demo.run_demo(train=false)`` (synthetic 8-frame clips and
images, preset:tiny-clip features, Valley-pooled: 264 visual tokens per video, 257 per image; the
instruction set has 480 conversations, a quarter of them on images), made once and cached under
$VLP_CACHE/bench/train (default ~/.cache/vlp/bench/train). Model everywhere: VideoLLM with
preset:tiny-llama (2 layers, width 64) and a linear connector (vision_hidden_size 64), stage-2 style:
LLM + connector trained, AdamW, fp32, CPU.

1. step     Ray Train + DeepSpeed (vlp.train.run_train, 1 worker, ZeRO-0; full mode adds 1 worker ZeRO-2 and
            2 workers ZeRO-0) vs a plain single-process PyTorch loop (fresh subprocess, no Ray, no
            DeepSpeed) that replays exactly the micro-batches the Ray run logged in samples.jsonl, with the
            same model, trainable set, AdamW, LR schedule, gradient clipping and torch thread count (the
            losses agree step for step). One epoch over the instruction set (quick: a seeded half), global
            batch 8. A third run per round, DeepSpeed alone (one process, no Ray), splits the overhead.
            Rounds: plain run, Ray run, plain replay, Ray run, plain replay...; each Ray run is compared
            with the mean of the plain runs just before and after it. Steady state:
            steps after the first DROP. overhead = plain samples/s / Ray samples/s (Ray: from metrics.jsonl
            compute_s + data_wait_s per step). Wall time including start-up is reported separately.
2. memory   per-rank model-state bytes under ZeRO-0/1/2 at world size 2: torch.distributed (gloo) in 2
            local processes (torch.multiprocessing.spawn, MASTER_ADDR=127.0.0.1; not Ray Train), the
            DeepSpeed config of vlp.train.loop.deepspeed_config, two optimizer steps; every live tensor
            storage of the rank found (gc sweep + param grads) and classified weights / gradients /
            optimizer state (incl. fp32 master copies) / reduction bucket / other, late in the 2nd backward,
            after it (gradients and optimizer state both alive: the number compared) and after the 2nd step.
            fp32 (the brief's setting) and, in full mode, bf16 (DeepSpeed's bf16 path runs on CPU too).
            Compared with vlp.train.memory.model_state_bytes and with the per-parameter byte counts.
3. online   one process, the same micro-batches: (a) Valley-pooled features read from the feature set vs
            (b) uint8 frames (decoded + resized once), each step normalize + tiny-clip tower forward +
            pool_valley(mode="frames") before the LLM forward/backward. Alternating blocks of steps.
4. padding  padding fraction of micro-batches with vlp.train.data.length_grouped(group=True) (by length, the
            default; and by_modality=True, LLaVA's modality-first order) vs random batching, in windows of
            micro x grad_accum x group_window rows as the worker does, on tokenised rows of a mixture:
            instruction videos (264 visual tokens) and images (257), caption rows, long multi-turn
            conversations and text-only conversations.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import RESULTS, WORK, loadavg, spread, write_json  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()
TRAIN_WORK = WORK / "train"
SHARDS = {"videos": 8, "images": 8, "instructions": 480, "heldout": 4, "samples_per_shard": 32,
          "image_fraction_in_instructions": 0.25}
TEMPLATE, MAX_LEN, LR, SEED = "vicuna_v1", 512, 1e-3, 0
GLOBAL = 8          # samples per optimizer step (all workers)
DROP = 3            # first steps of a run left out of steady state
TARGET_OVERHEAD, TARGET_ZERO2, TARGET_PAD = 1.15, 0.6, 0.10
ONLINE_ROWS = 96    # part 3 holds these samples' decoded frames in memory (8 x 3 x 224 x 224 uint8 each)


def log(*a):
    print("[bench_train]", *a, flush=True)


# ------------------------------------------------------------------------------------------------- inputs

def feature_root() -> Path:
    """The demo feature sets (made once, reused)."""
    key = "-".join(f"{k[:3]}{v}" for k, v in SHARDS.items())
    root = TRAIN_WORK / f"demo-v1-{key}"
    if not (root / ".complete").exists():
        from vlp.config import validate
        from vlp.synth.demo import DemoConfig, run_demo

        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        log(f"making feature sets under {root} (once)")
        run_demo(validate(DemoConfig, {"root": str(root), "shards": SHARDS, "train": False,
                                       "ray": {"progress_bars": False, "num_cpus": 2}}), log=lambda *_: None)
        (root / ".complete").write_text(f"{time.perf_counter() - t0:.1f}\n")
        import ray

        if ray.is_initialized():  # part 1 starts its own Ray (quiet, fixed size)
            ray.shutdown()
    return root


def read_feature_rows(uri: str) -> list[dict]:
    """Committed rows of a feature set, features as stored (fp16 bytes), like the training pipeline sees them."""
    import pyarrow.parquet as pq

    from vlp.formats.featureset import feature_parts

    rows = []
    for p in feature_parts(uri):
        rows += pq.read_table(p).to_pylist()
    return rows


def tokenise(rows: list[dict], fmt: str = "auto", template: str = TEMPLATE, max_length: int = MAX_LEN) -> list[dict]:
    """vlp.train.data.Tokenize over rows (what the Ray Data graph runs); returns rows as the worker sees them."""
    from vlp.train.data import Tokenize

    cols = ("uid", "media_type", "features", "shape", "mode", "num_frames", "caption", "conversations")
    batch = {}
    for k in cols:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r[k] for r in rows]
        batch[k] = arr
    batch["format"] = np.asarray([fmt] * len(rows), dtype=object)
    out = Tokenize(_tok_path(), template, max_length, "truncate", "valley")(batch)
    res = []
    for i in range(len(rows)):
        r = {k: out[k][i] for k in out}
        if not r["skip"]:
            res.append(r)
    return res


def _tok_path() -> str:
    return "preset:tiny-llama"


def strip_uid(u: str) -> str:
    """'s0:shard/key#2' (a mixture copy, as logged in samples.jsonl) -> 'shard/key' (the feature row)."""
    return u.split(":", 1)[1].split("#", 1)[0] if ":" in u else u.split("#", 1)[0]


def model_config():
    from vlp.models.videollm import ModelConfig

    return ModelConfig.model_validate({"vision_hidden_size": 64,
                                       "llm": {"path": "preset:tiny-llama", "trainable": True}})


def feats_of(r, dtype):
    import torch

    return torch.from_numpy(np.frombuffer(r["features"], np.float16).reshape(tuple(int(s) for s in r["shape"]))
                            .copy()).to("cpu", dtype)


# ------------------------------------------------------------------------------------ 1. plain loop (child)

def plain_job(spec: dict) -> dict:
    """The baseline: one process, no Ray, no DeepSpeed; the Ray loop's per-step work, nothing else.
    With spec["engine"] == "deepspeed": the same, but through a DeepSpeed engine (world size 1, gloo, the
    run's ZeRO stage and vlp's DeepSpeed config): splits the Ray path's overhead into DeepSpeed and Ray."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(spec["threads"])
    engine = None
    from vlp.models.videollm import VideoLLM
    from vlp.train.loop import lr_lambda

    t_import = time.perf_counter()
    by_uid = {r["uid"]: r for r in tokenise(read_feature_rows(spec["uri"]))}
    t_data = time.perf_counter()
    torch.manual_seed(SEED)
    model = VideoLLM(model_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    steps = spec["schedule"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(len(steps), 0.03, "cosine"))
    if spec.get("engine") == "deepspeed":
        import deepspeed
        import torch.distributed as dist

        from vlp.config import validate
        from vlp.train import TrainConfig
        from vlp.train.loop import deepspeed_config

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        cfg = validate(TrainConfig, {"run_name": "ds", "data": {"sets": [{"uri": "unused"}]},
                                     "batch": {"global_size": spec["micro"], "micro_size": spec["micro"]},
                                     "deepspeed": {"zero_stage": spec["zero_stage"], "precision": "fp32"},
                                     "scaling": {"num_workers": 1}})
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg, "fp32", sum(p.numel() for p in params)))
    t_model = time.perf_counter()
    micro = spec["micro"]
    per_step, ends, cpu_ends, losses = [], [], [], []
    it = iter(steps)
    while True:
        t0 = time.perf_counter()
        uids = next(it, None)
        if uids is None:
            break
        rows = [by_uid[strip_uid(u)] for u in uids]
        group = [rows[i:i + micro] for i in range(0, len(rows), micro)]
        t_d = time.perf_counter() - t0
        t1 = time.perf_counter()
        loss_sum = 0.0
        for mb in group:
            feats = [feats_of(r, torch.float32) for r in mb]
            args = ([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
                    feats, [r["mode"] for r in mb], [int(r["num_frames"]) for r in mb])
            if engine is not None:  # exactly the Ray worker's calls
                out = engine(*args)
                engine.backward(out.loss)
                engine.step()
            else:
                out = model(*args)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            loss_sum += float(out.loss.detach())
        per_step.append({"samples": len(rows), "data_wait_s": t_d, "compute_s": time.perf_counter() - t1})
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        losses.append(loss_sum / len(group))
    t_steps = time.perf_counter()
    if engine is not None:
        return {"steps": per_step, "step_end_times": ends, "cpu_end_times": cpu_ends, "losses": losses,
                "phases_s": {"total_in_process": t_steps - t_start}}
    with tempfile.TemporaryDirectory() as d:  # the Ray run ends with a checkpoint + an export: so does this
        from transformers import AutoTokenizer

        from vlp.models.presets import resolve_model_path
        from vlp.formats.export import export_model

        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{d}/state.pt")
        export_model(model, AutoTokenizer.from_pretrained(resolve_model_path(_tok_path())), f"{d}/export")
    t_end = time.perf_counter()
    return {"steps": per_step, "step_end_times": ends, "cpu_end_times": cpu_ends, "losses": losses,
            "phases_s": {"imports": t_import - t_start, "read_and_tokenise": t_data - t_import,
                         "model_and_optimizer": t_model - t_data, "steps": t_steps - t_model,
                         "checkpoint_and_export": t_end - t_steps, "total_in_process": t_end - t_start}}


def run_plain(uri: str, schedule: list[list[str]], micro: int, threads: int, engine: str = "torch",
              zero_stage: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec_p, out_p = Path(d) / "spec.json", Path(d) / "out.json"
        spec_p.write_text(json.dumps({"uri": uri, "schedule": schedule, "micro": micro, "threads": threads,
                                      "engine": engine, "zero_stage": zero_stage}))
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, str(HERE), "--_plain", str(spec_p), str(out_p)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            raise RuntimeError(f"plain loop failed:\n{p.stdout[-4000:]}")
        res = json.loads(out_p.read_text())
    res["wall_s_subprocess"] = wall
    return res


# ------------------------------------------------------------------------------------------- 1. Ray path

def ray_cfg(uri: str, runs: Path, name: str, workers: int, zero: int, weight: float, epochs: int = 1):
    from vlp.config import validate
    from vlp.train import TrainConfig

    return validate(TrainConfig, {
        "run_name": name, "output_dir": str(runs), "stage": "stage2",
        "data": {"sets": [{"uri": uri, "weight": weight}], "template": TEMPLATE, "max_length": MAX_LEN,
                 "seed": SEED},
        "model": model_config().model_dump(mode="json"),
        "optim": {"lr": LR, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_ratio": 0.03, "schedule": "cosine",
                  "grad_clip": 1.0},
        "batch": {"global_size": GLOBAL, "micro_size": GLOBAL // workers},
        "deepspeed": {"zero_stage": zero, "precision": "fp32"},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.5},
        "epochs": epochs,
        "tensorboard": False, "checkpoint": {"every_n_steps": 10**6, "keep_last": 1}, "log_every": 10**6,
        "max_failures": 0, "ray": {"progress_bars": False, "num_cpus": 2}})


def run_ray(uri: str, runs: Path, name: str, workers: int, zero: int, weight: float, epochs: int = 1) -> dict:
    from vlp.train import run_train

    cfg = ray_cfg(uri, runs, name, workers, zero, weight, epochs)
    t0, t0_epoch = time.perf_counter(), time.time()
    s = run_train(cfg, log=lambda *_: None)
    wall, t1_epoch = time.perf_counter() - t0, time.time()
    rd = Path(s["run_dir"])
    metrics = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    sched = [json.loads(x)["uids"] for x in (rd / "samples.jsonl").read_text().splitlines()]
    first = metrics[0]
    return {"wall_s": wall, "metrics": metrics, "schedule": sched, "steps": s["steps"],
            "wall_parts_s": {  # from the driver's clock and the metrics' time stamps (same machine)
                "start_to_first_step_begin": first["time"] - first["data_wait_s"] - first["compute_s"] - t0_epoch,
                "first_step_data_wait": first["data_wait_s"],
                "steps": metrics[-1]["time"] - (first["time"] - first["data_wait_s"] - first["compute_s"])
                - first["data_wait_s"],
                "after_last_step": t1_epoch - metrics[-1]["time"]}}


def local_schedule(uri: str, weight: float, micro: int) -> list[list[str]]:
    """A schedule built like the worker builds it (the library's Mixture picks the epoch's rows, windows of
    micro x group_window, length_grouped), from the rows in file order; for the plain run before round 1."""
    from vlp.train.data import Mixture, length_grouped

    rows = {f"s0:{r['uid']}": r for r in tokenise(read_feature_rows(uri))}
    uids = np.asarray([u.split(":", 1)[1] for u in rows], dtype=object)
    picked = Mixture("s0", weight, SEED, str(TRAIN_WORK / "no-state.json"), "auto")({"uid": uids})["uid"]
    stream = [{**rows["s0:" + strip_uid(u)], "uid": u} for u in picked]
    rng = np.random.default_rng([SEED, 0, 0, 0])
    mbs = []
    for s in range(0, len(stream), micro * 8):
        mbs += length_grouped(stream[s:s + micro * 8], micro, rng, True)
    return [[r["uid"] for r in mb] for mb in mbs]


class ProcPoller:
    """CPU seconds of every process on the machine, polled from /proc every ``period`` s in a thread, so that
    CPU use can be cut to the Ray run's steady-state window (metrics.jsonl time stamps, same clock).
    Kinds: train_worker (ray::RayTrainWorker under this driver), ray_other (every other descendant of this
    driver: raylet, gcs, Ray Data tasks, Train controller...), driver (this process), other (the rest of
    the machine: other jobs, including other Ray clusters)."""

    def __init__(self, period: float = 0.2):
        import threading

        self.period, self.hz, self.me = period, os.sysconf("SC_CLK_TCK"), os.getpid()
        self.kind: dict = {}
        self.series: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _snap(self) -> dict:
        out, ppid = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                st = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            f = st[st.rindex(")") + 2:].split()
            pid = int(d)
            ppid[pid] = int(f[1])
            out[(pid, int(f[19]))] = (int(f[11]) + int(f[12])) / self.hz  # key (pid, start time): pids get reused

        def mine(pid: int) -> bool:
            for _ in range(64):
                if pid == self.me:
                    return True
                if pid <= 1 or pid not in ppid:
                    return False
                pid = ppid[pid]
            return False

        for key in out:
            pid = key[0]
            if pid == self.me:
                self.kind[key] = "driver"
            elif self.kind.get(key) in (None, "ray_other") and mine(pid):  # re-check: a pooled ray::IDLE
                try:                                                       # worker becomes ray::RayTrainWorker
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    cmd = ""
                self.kind[key] = "train_worker" if "RayTrainWorker" in cmd else "ray_other"
            elif key not in self.kind:
                self.kind[key] = "other"
        return out

    def _run(self):
        while not self._stop.wait(self.period):
            self.series.append((time.time(), self._snap()))

    def stop(self):
        self._stop.set()
        self._t.join()

    def window(self, t0: float, t1: float) -> dict:
        """{kind: CPU seconds used in [t0, t1]} (linear interpolation between polls), plus the window."""
        pts = [(t, snap) for t, snap in self.series]

        def at(t: float, key) -> float:
            prev = None
            for ts, snap in pts:
                if key not in snap:
                    continue
                if ts >= t:
                    if prev is None:
                        return snap[key]
                    (tp, cp) = prev
                    return cp + (snap[key] - cp) * (t - tp) / (ts - tp) if ts > tp else snap[key]
                prev = (ts, snap[key])
            return prev[1] if prev else 0.0

        keys = {k for _, snap in pts for k in snap}
        out: dict = {}
        for k in keys:
            d = at(t1, k) - at(t0, k)
            if d > 0:
                out[self.kind.get(k, "other")] = out.get(self.kind.get(k, "other"), 0.0) + d
        return {"window_s": round(t1 - t0, 3), **{k: round(v, 3) for k, v in out.items()}}


def steady(steps: list[dict], ends: list[float], drop: int) -> dict:
    """samples/s over steps[drop:]: from per-step (data_wait + compute), from step-end intervals, and the
    median step."""
    sel = steps[drop:]
    samples = sum(s["samples"] for s in sel)
    t = sum(s["data_wait_s"] + s["compute_s"] for s in sel)
    iv = ends[-1] - ends[drop - 1] if drop >= 1 else None
    med = statistics.median(s["data_wait_s"] + s["compute_s"] for s in sel)
    return {"steps": len(sel), "samples": samples, "samples_per_s": samples / t, "wall_s": round(t, 4),
            "samples_per_s_intervals": samples / iv if iv else None,
            "samples_per_s_median_step": sel[0]["samples"] / med,
            "data_wait_s_total": round(sum(s["data_wait_s"] for s in sel), 4),
            "max_step_s": round(max(s["data_wait_s"] + s["compute_s"] for s in sel), 4)}


def bench_step(root: Path, rounds: int, quick: bool, work: Path) -> dict:
    """Rounds of: Ray Train run i, then the plain replay of its logged batches. Each Ray run is compared
    with the mean of the plain runs just before and just after it (the one before replays the previous
    round's batches; before round 1, a schedule built the same way from the rows in file order), which
    cancels slow drift in how busy the machine is."""
    import ray

    uri = str(root / "features" / "instruct")
    n_rows = len(read_feature_rows(uri))
    # a seeded half of the set (quick) or all of it, once: no Mixture copies (weight > 1 puts a row's copies
    # next to each other, and length grouping then into the same micro-batch: unrealistic zero padding)
    weight = 0.5 if quick else 1.0
    runs = work / "runs"
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    t_ray_init = time.perf_counter() - t0
    plan = [("w1_zero0", 1, 0)] * rounds
    if not quick:
        plan += [("w1_zero2", 1, 2), ("w2_zero0", 2, 0)]
    out: dict = {"ray_init_s": round(t_ray_init, 2), "rows_per_epoch": int(n_rows * weight),
                 "global_batch": GLOBAL, "drop_first_steps": DROP, "runs": []}
    # the plain loop runs 1 torch thread, like each Ray worker (2 threads on a shared 2-core machine made
    # the plain loop 10x slower from OpenMP oversubscription: no baseline at all). For 2 workers the ratio
    # is therefore data-parallel speed-up on 2 cores, not overhead.
    threads_of = {1: 1, 2: 1}
    log(f"step throughput: plain run before round 1 ({threads_of[plan[0][1]]} thread(s))")
    prev = {"threads": threads_of[plan[0][1]], "schedule": local_schedule(uri, weight, GLOBAL)}
    prev["result"] = run_plain(uri, prev["schedule"], GLOBAL, prev["threads"])
    for i, (label, workers, zero) in enumerate(plan):
        threads = threads_of[workers]
        if prev["threads"] != threads:  # the bracket's first half must use this round's thread count
            log(f"step throughput: plain run before round {i + 1} ({threads} thread(s))")
            prev = {"threads": threads, "schedule": prev["schedule"]}
            prev["result"] = run_plain(uri, prev["schedule"], GLOBAL, threads)
        log(f"step throughput: round {i + 1}/{len(plan)} {label}: Ray Train run")
        poll = ProcPoller()
        try:
            r = run_ray(uri, runs, f"{label}_{i}", workers, zero, weight)
        finally:
            poll.stop()
        ray_steps = [{"samples": GLOBAL, "data_wait_s": m["data_wait_s"], "compute_s": m["compute_s"]}
                     for m in r["metrics"]]
        ray_ends = [m["time"] for m in r["metrics"]]
        log(f"step throughput: round {i + 1}/{len(plan)} {label}: plain replay ({threads} thread(s), micro {GLOBAL})")
        p = run_plain(uri, r["schedule"], GLOBAL, threads)
        ds = None
        if workers == 1:
            log(f"step throughput: round {i + 1}/{len(plan)} {label}: DeepSpeed alone (no Ray) replay")
            ds = run_plain(uri, r["schedule"], GLOBAL, threads, "deepspeed", zero)
        pb = prev["result"]
        rs = steady(ray_steps, ray_ends, DROP)
        ps_after = steady(p["steps"], p["step_end_times"], DROP)
        ps_before = steady(pb["steps"], pb["step_end_times"], DROP)
        cold = i == 0
        ov = {}
        for key, name in (("samples_per_s", "overhead"), ("samples_per_s_intervals", "overhead_intervals"),
                          ("samples_per_s_median_step", "overhead_median_step")):
            base = (ps_before[key] + ps_after[key]) / 2
            ov[name] = round(base / rs[key], 3)
            ov[name + "_after_only"] = round(ps_after[key] / rs[key], 3)
        if ds is not None:  # split: plain -> DeepSpeed in one process -> DeepSpeed under Ray Train
            dss = steady(ds["steps"], ds["step_end_times"], DROP)
            ov["deepspeed_alone_over_plain"] = round(ps_after["samples_per_s"] / dss["samples_per_s"], 3)
            ov["ray_over_deepspeed_alone"] = round(dss["samples_per_s"] / rs["samples_per_s"], 3)
        n = min(len(p["losses"]), len(r["metrics"]))
        # CPU seconds per sample in the steady state: the Ray worker process(es) (from /proc) vs the plain
        # process (process_time): extra work in the worker vs waiting for a CPU (contention)
        cpu = poll.window(r["metrics"][DROP - 1]["time"], r["metrics"][-1]["time"])
        steady_samples = GLOBAL * (len(r["metrics"]) - DROP)
        plain_cpu = p["cpu_end_times"][-1] - p["cpu_end_times"][DROP - 1]
        cpu["train_worker_cpu_ms_per_sample"] = round(1000 * cpu.get("train_worker", 0.0) / steady_samples, 3)
        cpu["plain_cpu_ms_per_sample"] = round(1000 * plain_cpu / ps_after["samples"], 3)
        cpu["plain_cpu_share"] = round(plain_cpu / ps_after["wall_s"], 3)
        if cpu.get("train_worker"):
            ov["overhead_cpu_time"] = round(cpu["train_worker_cpu_ms_per_sample"] / cpu["plain_cpu_ms_per_sample"], 3)
        ray_ms = [round(1000 * (x["data_wait_s"] + x["compute_s"]), 1) for x in ray_steps]
        plain_ms = [round(1000 * (x["data_wait_s"] + x["compute_s"]), 1) for x in p["steps"]]
        # the same micro-batch in both: per-step ratios cancel batch-to-batch differences in length
        ov["overhead_paired_median"] = round(
            statistics.median(a / b for a, b in zip(ray_ms[DROP:n], plain_ms[DROP:n])), 3)
        rec = {
            "label": label, "workers": workers, "zero_stage": zero, "micro_per_worker": GLOBAL // workers,
            "torch_threads": {"ray_per_worker": 1, "plain": threads}, "steps": r["steps"],
            "ray": rs, "plain_before": ps_before, "plain_after": ps_after, **ov,
            "wall": {"ray_run_train_s": round(r["wall_s"], 2),
                     "ray_run_train_plus_ray_init_s": round(r["wall_s"] + (t_ray_init if cold else 0.0), 2),
                     "ray_parts_s": {k: round(v, 2) for k, v in r["wall_parts_s"].items()},
                     "plain_subprocess_s": round(p["wall_s_subprocess"], 2),
                     "plain_phases_s": {k: round(v, 2) for k, v in p["phases_s"].items()},
                     "ratio": round((r["wall_s"] + (t_ray_init if cold else 0.0)) / p["wall_s_subprocess"], 2),
                     "includes_ray_init": cold},
            "loss_max_abs_diff_ray_vs_plain": round(
                max(abs(a - m["loss"]) for a, m in zip(p["losses"][:n], r["metrics"][:n])), 6),
            "padding_frac_mean_ray": round(statistics.mean(m["padding_frac"] for m in r["metrics"]), 4),
            "loadavg": loadavg(),
            "step_ms": {"ray": ray_ms, "plain_after": plain_ms},
            "cpu_s_in_ray_steady_window": cpu,
        }
        log(f"  {label}: Ray {rs['samples_per_s']:.1f} samples/s, plain {ps_before['samples_per_s']:.1f} before / "
            f"{ps_after['samples_per_s']:.1f} after -> overhead {ov['overhead']:.3f}x (intervals "
            f"{ov['overhead_intervals']:.3f}x, median step {ov['overhead_median_step']:.3f}x, paired "
            f"{ov['overhead_paired_median']:.3f}x; DeepSpeed alone {ov.get('deepspeed_alone_over_plain')}x, Ray on "
            f"top {ov.get('ray_over_deepspeed_alone')}x; CPU time per sample {ov.get('overhead_cpu_time')}x); "
            f"steady-window CPU s {cpu}; wall "
            f"{rec['wall']['ray_run_train_plus_ray_init_s']:.1f}s vs {p['wall_s_subprocess']:.1f}s")
        out["runs"].append(rec)
        prev = {"threads": threads, "schedule": r["schedule"], "result": p}
    if not quick:  # what a short epoch costs: Ray Data runs the whole graph again at every epoch start
        log("step throughput: epoch restarts (a seeded quarter of the set per epoch, 3 epochs, 1 worker ZeRO-0)")
        r = run_ray(uri, runs, "epochs", 1, 0, 0.25, epochs=3)
        ms = r["metrics"]
        firsts = [m for k, m in enumerate(ms) if k == 0 or m["epoch"] != ms[k - 1]["epoch"]]
        med = statistics.median(m["compute_s"] + m["data_wait_s"] for m in ms if m not in firsts)
        out["epoch_restarts"] = {
            "epochs": 3, "steps": len(ms), "steps_per_epoch": len(ms) // 3,
            "first_step_data_wait_s": [round(m["data_wait_s"], 2) for m in firsts],
            "median_other_step_s": round(med, 4),
            "stall_in_median_steps": [round(m["data_wait_s"] / med, 1) for m in firsts],
            "steps_s_total": round(sum(m["compute_s"] + m["data_wait_s"] for m in ms), 2),
            "wall_s": round(r["wall_s"], 2)}
        log(f"  epoch restarts: first-step data wait {out['epoch_restarts']['first_step_data_wait_s']} s "
            f"vs median step {med:.3f} s")
    ray.shutdown()
    w1 = [x for x in out["runs"] if x["label"] == "w1_zero0"]
    med = statistics.median(x["overhead"] for x in w1)
    out["summary"] = {
        "overhead_w1_zero0": spread([x["overhead"] for x in w1]),
        "overhead_w1_zero0_intervals": spread([x["overhead_intervals"] for x in w1]),
        "overhead_w1_zero0_median_step": spread([x["overhead_median_step"] for x in w1]),
        "overhead_w1_zero0_paired_median": spread([x["overhead_paired_median"] for x in w1]),
        "overhead_w1_zero0_cpu_time": spread([x["overhead_cpu_time"] for x in w1 if "overhead_cpu_time" in x]),
        "target": TARGET_OVERHEAD, "met": med <= TARGET_OVERHEAD,
        "wall_ratio_w1_zero0_warm_ray": spread([x["wall"]["ratio"] for x in w1 if not x["wall"]["includes_ray_init"]]),
        "wall_ratio_first_run_incl_ray_init": out["runs"][0]["wall"]["ratio"],
        "deepspeed_alone_over_plain_w1_zero0": spread([x["deepspeed_alone_over_plain"] for x in w1]),
        "ray_over_deepspeed_alone_w1_zero0": spread([x["ray_over_deepspeed_alone"] for x in w1]),
        **{f"overhead_{x['label']}": x["overhead"] for x in out["runs"] if x["label"] != "w1_zero0"},
        **{f"speedup_{x['label']}_vs_plain_1_thread": round(1 / x["overhead"], 3) for x in out["runs"]
           if x["workers"] == 2},
    }
    return out


# ------------------------------------------------------------------------------------------------ 2. memory

def _storages(tensors) -> dict[int, int]:
    """{storage data_ptr: nbytes} of real (non-meta, non-empty) tensors."""
    import torch

    out = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        try:
            s = t.untyped_storage()
        except Exception:
            continue
        if s.nbytes() and s.data_ptr():
            out[s.data_ptr()] = s.nbytes()
    return out


def _tensors_in(obj, depth: int = 0):
    import torch

    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


def _snapshot(model, engine) -> dict:
    """Bytes of every live tensor storage of this process (gc sweep + param grads), classified in this order:
    weights: storages of the model's parameters (ZeRO-1/2: the flat buffer they view);
    reduce_bucket: the ZeRO wrapper's ipg bucket buffers (param grads are views into it during backward);
    gradients: param .grad / .grad_accum, averaged_gradients, grads_in_partition;
    optimizer: everything else the DeepSpeed optimizer (wrapper) holds in its attributes: the torch optimizer's
    state (exp_avg, exp_avg_sq, step), fp32 master weights (ZeRO: single_partition_of_fp32_groups; bf16
    ZeRO-0: fp32_groups); other: the rest (inputs, rotary buffers...)."""
    import torch

    gc.collect()
    zopt = engine.optimizer
    inner = getattr(zopt, "optimizer", zopt)
    params = list(model.parameters())
    weights = _storages(p.data for p in params)
    grad_t = [p.grad for p in params if p.grad is not None]
    grad_t += [p.grad_accum for p in params if isinstance(getattr(p, "grad_accum", None), torch.Tensor)]
    grad_t += list(_tensors_in(getattr(zopt, "averaged_gradients", None)))
    grad_t += list(_tensors_in(getattr(zopt, "grads_in_partition", None)))
    bucket_t = []
    for b in (getattr(zopt, "ipg_buckets", None) or {}).values():
        bucket_t += list(_tensors_in(getattr(b, "buffer", None)))
    opt_t = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for o in {id(zopt): zopt, id(inner): inner}.values():
        for v in vars(o).values():
            opt_t += list(_tensors_in(v))
    grads, bucket, optim = _storages(grad_t), _storages(bucket_t), _storages(opt_t)
    import warnings

    with warnings.catch_warnings():  # isinstance() on every object trips deprecation shims (torch.distributed)
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    every = _storages(live + grad_t + bucket_t + opt_t)
    cats = {"weights": 0, "optimizer": 0, "gradients": 0, "reduce_bucket": 0, "other": 0}
    other_big = []
    for ptr, nb in every.items():
        c = ("weights" if ptr in weights else "reduce_bucket" if ptr in bucket else "gradients" if ptr in grads
             else "optimizer" if ptr in optim else "other")
        cats[c] += nb
        if c == "other" and nb >= 4096:
            other_big.append(nb)
    cats["other_largest"] = sorted(other_big, reverse=True)[:5]
    return cats


def _mem_stage(rank: int, world: int, stage: int, precision: str, mbs: list) -> dict:
    import deepspeed
    import torch

    from vlp.config import validate
    from vlp.models.videollm import VideoLLM
    from vlp.train import TrainConfig
    from vlp.train.loop import deepspeed_config, lr_lambda

    cfg = validate(TrainConfig, {
        "run_name": "mem", "data": {"sets": [{"uri": "unused"}]}, "model": model_config().model_dump(mode="json"),
        "batch": {"global_size": 4 * world, "micro_size": 4},
        "deepspeed": {"zero_stage": stage, "precision": precision},
        "scaling": {"num_workers": world}})
    bf16 = precision == "bf16"
    torch.manual_seed(SEED)
    model = VideoLLM(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(10, 0.03, "cosine"))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, precision, n_trainable))
    del model, opt, params, sched
    snaps = {}
    state = {"step": 0}

    def hook(g):  # runs late in the 2nd backward (the embeddings get their gradient last): every gradient
        if state["step"] == 1 and "during_backward" not in snaps:  # so far exists, the bucket is allocated
            snaps["during_backward"] = _snapshot(engine.module, engine)
        return g

    handle = engine.module.llm.get_input_embeddings().weight.register_hook(hook)
    for step, mb in enumerate(mbs[:2]):
        state["step"] = step
        feats = [feats_of(r, torch.bfloat16 if bf16 else torch.float32) for r in mb]
        out = engine([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
                     feats, [r["mode"] for r in mb], [int(r["num_frames"]) for r in mb])
        engine.backward(out.loss)
        del out, feats
        if step == 1:
            snaps["after_backward"] = _snapshot(engine.module, engine)
        engine.step()
        if step == 1:
            snaps["after_step"] = _snapshot(engine.module, engine)
    handle.remove()
    res = {"rank": rank, "stage": stage, "precision": precision, "world": world,
           "param_dtype": str(next(engine.module.parameters()).dtype), "trainable": n_trainable, "frozen": n_frozen,
           "engine_optimizer": type(engine.optimizer).__name__, **snaps}
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine
    gc.collect()
    return res


def _mem_worker(rank: int, world: int, port: int, precision: str, batches_path: str, out_dir: str) -> None:
    """One rank: ZeRO-0, 1, 2 one after another (a fresh engine each), results to out_dir/<stage>-rank<r>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import pickle

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with open(batches_path, "rb") as f:
        mbs = pickle.load(f)[rank]
    for stage in (0, 1, 2):
        t0 = time.perf_counter()
        res = _mem_stage(rank, world, stage, precision, mbs)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        Path(out_dir, f"{stage}-rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# per trainable parameter: (weights, gradients, optimizer state) bytes held by one of n ranks
def _expected(precision: str, stage: int, n: int, master_in_fp32: bool) -> tuple[float, float, float]:
    if precision == "bf16":  # the ZeRO paper / vlp.train.memory: 2 + 2 + 12 (fp32 master + Adam m, v)
        return {0: (2, 2, 12), 1: (2, 2, 12 / n), 2: (2, 2 / n, 12 / n)}[stage]
    opt = 12 if master_in_fp32 else 8  # fp32: Adam m, v (+ DeepSpeed's fp32 partition copy under ZeRO-1/2)
    return {0: (4, 4, 8), 1: (4, 4, opt / n), 2: (4, 4 / n, opt / n)}[stage]


def bench_memory(root: Path, work: Path, precisions: tuple[str, ...]) -> dict:
    import pickle

    import torch.multiprocessing as mp

    from vlp.train.data import length_grouped
    from vlp.train.memory import default_bucket_elems, model_state_bytes

    world = 2
    rows = tokenise(read_feature_rows(str(root / "features" / "instruct")))
    mbs = length_grouped(rows, 4, np.random.default_rng(SEED), True)
    bp = work / "mem_batches.pkl"
    bp.write_bytes(pickle.dumps([mbs[0:2], mbs[2:4]]))
    out = {"method": "torch.distributed gloo, 2 local processes (torch.multiprocessing.spawn), not Ray Train; "
                     "model + AdamW + deepspeed.initialize with vlp.train.loop.deepspeed_config (contiguous_gradients, "
                     "reduce_bucket_size sized to the model by vlp.train.memory.default_bucket_elems = "
                     "max(5e5, trainable) elements here), 2 micro-batches of 4 per rank; every live tensor storage classified "
                     "during the 2nd backward (late: all gradients exist, reduction bucket allocated), after it "
                     "(the gradients the optimizer step will use) and after the 2nd step",
           "world": world, "precisions": {}}
    for prec in precisions:
        log(f"memory: {prec}, ZeRO-0/1/2, {world} ranks (gloo, torch.multiprocessing.spawn)")
        od = work / f"mem-{prec}"
        od.mkdir(parents=True, exist_ok=True)
        mp.spawn(_mem_worker, args=(world, _free_port(), prec, str(bp), str(od)), nprocs=world, join=True)
        stages = {}
        for stage in (0, 1, 2):
            ranks = [json.loads((od / f"{stage}-rank{r}.json").read_text()) for r in range(world)]
            stages[stage] = {"ranks": ranks, "wall_s": max(r["wall_s"] for r in ranks)}
        P, F = stages[0]["ranks"][0]["trainable"], stages[0]["ranks"][0]["frozen"]
        res = {"trainable_params": P, "frozen_params": F, "stages": {}}
        for stage in (0, 1, 2):
            rk = stages[stage]["ranks"]
            ab = [r["after_backward"] for r in rk]
            og = [a["optimizer"] + a["gradients"] for a in ab]
            w, g, o = _expected(prec, stage, world, True)
            exp = {"opt_grad": P * (g + o), "total": P * (w + g + o),
                   "vlp_model_state_bytes": model_state_bytes(P, F, world, stage, prec)}
            rec = {
                "engine_optimizer": rk[0]["engine_optimizer"], "param_dtype": rk[0]["param_dtype"],
                "per_rank": [{k: r.get(k) for k in ("during_backward", "after_backward", "after_step")} for r in rk],
                "opt_plus_grad_bytes_per_rank": og,
                "total_model_state_bytes_per_rank": [a["optimizer"] + a["gradients"] + a["weights"] for a in ab],
                "expected_bytes_per_rank": {k: int(v) for k, v in exp.items()},
                "measured_over_expected_opt_grad": round(max(og) / exp["opt_grad"], 3),
                "measured_total_over_vlp_model_state_bytes": round(
                    max(a["optimizer"] + a["gradients"] + a["weights"] for a in ab) / exp["vlp_model_state_bytes"], 3),
                "reduce_bucket_bytes_during_backward": max((r.get("during_backward") or {}).get("reduce_bucket", 0)
                                                           for r in rk),
                "peak_during_backward_bytes_per_rank": [
                    sum(v for k, v in (r.get("during_backward") or {}).items()
                        if k in ("weights", "optimizer", "gradients", "reduce_bucket")) for r in rk],
                "wall_s": stages[stage]["wall_s"],
            }
            if prec == "fp32":
                w2, g2, o2 = _expected(prec, stage, world, False)
                rec["expected_bytes_per_rank"]["opt_grad_without_master_copy"] = int(P * (g2 + o2))
            res["stages"][f"zero{stage}"] = rec
        z0 = max(res["stages"]["zero0"]["opt_plus_grad_bytes_per_rank"])
        for s_ in ("zero1", "zero2"):
            res["stages"][s_]["opt_plus_grad_vs_zero0"] = round(
                max(res["stages"][s_]["opt_plus_grad_bytes_per_rank"]) / z0, 3)
        e0, e2 = sum(_expected(prec, 0, world, True)[1:]), sum(_expected(prec, 2, world, True)[1:])
        res["summary"] = {"reduce_bucket_elems": default_bucket_elems(P),
                          "zero2_reduce_bucket_bytes": res["stages"]["zero2"]["reduce_bucket_bytes_during_backward"],
                          "zero1_vs_zero0": res["stages"]["zero1"]["opt_plus_grad_vs_zero0"],
                          "zero2_vs_zero0": res["stages"]["zero2"]["opt_plus_grad_vs_zero0"],
                          "expected_zero2_vs_zero0": round(e2 / e0, 3),
                          "target": TARGET_ZERO2,
                          "met": res["stages"]["zero2"]["opt_plus_grad_vs_zero0"] <= TARGET_ZERO2}
        if prec == "fp32":
            res["summary"]["expected_zero2_vs_zero0_without_master_copy"] = round(
                sum(_expected(prec, 2, world, False)[1:]) / sum(_expected(prec, 0, world, False)[1:]), 3)
        out["precisions"][prec] = res
    out["summary"] = {p: out["precisions"][p]["summary"] for p in out["precisions"]}
    out["summary"]["met"] = out["precisions"]["fp32"]["summary"]["met"]  # the brief's setting: fp32 on CPU
    if "bf16" in out["precisions"]:
        out["summary"]["met_bf16"] = out["precisions"]["bf16"]["summary"]["met"]
    return out


# -------------------------------------------------------------------------------------- 3. online encoding

def decode_frames(root: Path, uids: set[str]) -> dict:
    """uid -> uint8 (T, 3, S, S): the shard media decoded, sampled and resized exactly as precompute did."""
    import torch

    from vlp.data.media import DecodeConfig, SamplingConfig
    from vlp.formats.featureset import get_json
    from vlp.precompute.stages import DecodeFrames, ReadShard, shape_of

    fp = get_json(str(root / "features" / "instruct"), "fingerprint.json")
    dec = DecodeFrames(SamplingConfig.model_validate(fp["sampling"]), DecodeConfig(), fp["preprocess"]["size"],
                       fp["preprocess"]["pad_to_square"], tuple(fp["preprocess"]["mean"]))
    out = {}
    for tar in sorted((root / "shards").glob("instruct-*.tar")):
        for row in ReadShard()({"shard": tar.stem, "uri": str(tar)}):
            uid = f"{row['shard']}/{row['key']}"
            if row["kind"] != "sample" or uid not in uids:
                continue
            r = dec.decode_row(row)
            arr = np.frombuffer(r["frames"], np.uint8).reshape(shape_of(r["frames_shape"]))
            out[uid] = torch.from_numpy(arr.copy())
    return out


def bench_online(root: Path, rounds: int, steps_per_block: int) -> dict:
    import torch

    from vlp.data.preprocess import normalize
    from vlp.models.videollm import VideoLLM
    from vlp.models.vision import VisionTowerConfig, build_vision_tower
    from vlp.formats.featureset import get_json
    from vlp.train.data import length_grouped

    torch.set_num_threads(1)
    rows = tokenise(read_feature_rows(str(root / "features" / "instruct")))[:ONLINE_ROWS]
    frames = decode_frames(root, {r["uid"] for r in rows})
    rows = [r for r in rows if r["uid"] in frames]
    mbs = length_grouped(rows, GLOBAL, np.random.default_rng(SEED), True)
    tower = build_vision_tower(VisionTowerConfig(path="preset:tiny-clip", device="cpu", dtype="float32"))
    pp = get_json(str(root / "features" / "instruct"), "fingerprint.json")["preprocess"]  # mean/std precompute used
    torch.manual_seed(SEED)
    model = VideoLLM(model_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step(mb, online: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        if online:
            x = torch.cat([frames[r["uid"]] for r in mb])  # (sum T, 3, S, S) uint8
            lens = [frames[r["uid"]].shape[0] for r in mb]
            px = normalize(x, pp["mean"], pp["std"], tower.dtype)
            f = tower.features(px)  # (sum T, 1 + P, D), no grad (frozen tower)
            feats, modes = list(torch.split(f, lens)), ["frames"] * len(mb)  # pool_valley(mode="frames") in the model
        else:
            feats, modes, lens = [feats_of(r, torch.float32) for r in mb], [r["mode"] for r in mb], \
                [int(r["num_frames"]) for r in mb]
        t_vis = time.perf_counter() - t0
        out = model([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
                    feats, modes, lens)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t_vis

    for mb in mbs[:2]:  # warm-up both paths
        step(mb, False)
        step(mb, True)
    res = {"pre": [], "online": [], "online_visual": [], "pre_visual": []}
    ratios = []
    k = 0
    for rnd in range(rounds):
        blk = {}
        for mode in (("pre", "online") if rnd % 2 == 0 else ("online", "pre")):
            ts = []
            for j in range(steps_per_block):
                dt, tv = step(mbs[(k + j) % len(mbs)], mode == "online")
                ts.append(dt)
                res[f"{mode}_visual"].append(tv)
            res[mode] += ts
            blk[mode] = sum(ts)
        k += steps_per_block
        ratios.append(blk["online"] / blk["pre"])
    pre, onl = statistics.median(res["pre"]), statistics.median(res["online"])
    n_frames = statistics.mean(sum(frames[r["uid"]].shape[0] for r in mb) for mb in mbs)
    return {"micro_batch": GLOBAL, "micro_batches": len(mbs), "frames_per_micro_batch_mean": round(n_frames, 1),
            "rounds": rounds, "steps_per_block": steps_per_block, "torch_threads": 1,
            "step_s_median": {"precomputed": round(pre, 4), "online": round(onl, 4)},
            "visual_part_s_median": {"precomputed_read_fp16": round(statistics.median(res["pre_visual"]), 4),
                                     "online_normalize_tower": round(statistics.median(res["online_visual"]), 4)},
            "ratio_online_over_precomputed": spread(ratios),
            "ratio_median_steps": round(onl / pre, 3)}


# ------------------------------------------------------------------------------------------------ 4. padding

def mixture_rows(root: Path) -> tuple[list[dict], dict]:
    """Tokenised rows of a mixed set: instruction videos/images as they are, caption rows (pretrain set),
    long multi-turn conversations and text-only conversations (copies of instruction rows, rewritten)."""
    instruct = read_feature_rows(str(root / "features" / "instruct"))
    pretrain = read_feature_rows(str(root / "features" / "pretrain"))
    rng = np.random.default_rng(SEED)
    long_rows, text_rows = [], []
    for i, r in enumerate(instruct):
        conv = json.loads(r["conversations"])
        qa = [(conv[j]["value"].split("\n", 1)[-1], conv[j + 1]["value"]) for j in range(0, len(conv), 2)]
        if i % 2 == 0:  # long: 4-12 turns
            turns = [qa[t % len(qa)] for t in range(int(rng.integers(4, 13)))]
            c = []
            for t, (q, a) in enumerate(turns):
                c += [{"from": "human", "value": (f"<{r['media_type']}>\n" if t == 0 else "") + q},
                      {"from": "gpt", "value": a}]
            long_rows.append({**r, "uid": r["uid"] + "~long", "conversations": json.dumps(c)})
        if i % 4 == 1:  # text-only: no placeholder, 1-6 turns
            c = []
            for t in range(int(rng.integers(1, 7))):
                q, a = qa[t % len(qa)]
                c += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            text_rows.append({**r, "uid": r["uid"] + "~text", "conversations": json.dumps(c)})
    rows = (tokenise(instruct) + tokenise(pretrain, fmt="caption") + tokenise(long_rows) + tokenise(text_rows))
    kinds = {"instruction video": sum(1 for r in tokenise(instruct) if r["media_type"] == "video"),
             "instruction image": sum(1 for r in tokenise(instruct) if r["media_type"] == "image"),
             "caption (video+image)": len(pretrain), "long multi-turn": len(long_rows), "text-only": len(text_rows)}
    return rows, kinds


def _length_grouped_variant(by_modality: bool):
    """vlp.train.data.length_grouped with by_modality set (LLaVA-style modality first, then length)."""
    import inspect

    from vlp.train.data import length_grouped

    if "by_modality" in inspect.signature(length_grouped).parameters:
        return lambda rows, micro, rng, group: length_grouped(rows, micro, rng, group, by_modality=by_modality)

    def fallback(rows, micro, rng, group):  # a library from before data.group_by_modality existed
        key = (lambda r: (r["media_type"], r["length"])) if by_modality else (lambda r: r["length"])
        rows = sorted(rows, key=key)
        mbs = [rows[i:i + micro] for i in range(0, len(rows) - micro + 1, micro)]
        return [mbs[i] for i in rng.permutation(len(mbs))]
    return fallback


def stream_batches(rows: list[dict], micro: int, window: int, rng, group: bool, fn=None) -> list[list[dict]]:
    """The worker's micro_batches(): fill a window, length_grouped it, drop the tail remainder."""
    from vlp.train.data import length_grouped

    fn = fn or length_grouped
    out = []
    for s in range(0, len(rows), window):
        out += fn(rows[s:s + window], micro, rng, group)
    return out


# (micro, grad_accum); (16, 4) = the TrainConfig defaults at 2 workers
PAD_CONFIGS = ((4, 1), (8, 1), (8, 2), (16, 1), (16, 4))


def bench_padding(root: Path, seeds: int) -> dict:
    from vlp.train.data import padding_fraction

    rows, kinds = mixture_rows(root)
    no_text = [r for r in rows if not r["uid"].endswith("~text")]
    lens = [int(r["length"]) for r in rows]
    res = {"rows": len(rows), "kinds": kinds, "length_min": min(lens), "length_median": statistics.median(lens),
           "length_max": max(lens), "group_window": 8, "seeds": seeds,
           "note": "text-only rows keep the media_type of the feature row they came from (a feature set has no "
                   "text-only media type); window = micro x grad_accum x group_window (8), 1 worker",
           "configs": []}
    keys = {"grouped_by_length": None,  # the library's default (data.group_by_modality=false)
            "grouped_by_modality_then_length": _length_grouped_variant(True)}
    for mix_name, mix in (("with_text_only", rows), ("without_text_only", no_text)):
        for micro, accum in PAD_CONFIGS:
            window = micro * accum * 8  # TrainDataConfig.group_window default
            rec = {"mixture": mix_name, "rows": len(mix), "micro": micro, "grad_accum": accum, "window": window}
            acc: dict = {"random": []}
            for seed in range(seeds):
                order = np.random.default_rng([SEED, seed]).permutation(len(mix))  # the stream's order
                stream = [mix[i] for i in order]
                acc["random"].append(padding_fraction(stream_batches(stream, micro, window,
                                                                     np.random.default_rng(seed), False)))
                for name, fn in keys.items():
                    acc.setdefault(name, []).append(padding_fraction(
                        stream_batches(stream, micro, window, np.random.default_rng(seed), True, fn)))
            for name, v in acc.items():
                rec[name] = round(float(statistics.mean(v)), 4)
            res["configs"].append(rec)
    lib, mod = "grouped_by_length", "grouped_by_modality_then_length"
    main = next(c for c in res["configs"]
                if c["mixture"] == "with_text_only" and c["micro"] == 8 and c["grad_accum"] == 1)
    res["summary"] = {
        "micro8_window64_grouped": main[lib], "micro8_window64_random": main["random"],
        "micro8_window64_by_modality": main[mod],
        "worst_grouped": max(c[lib] for c in res["configs"]),
        "worst_by_modality": max(c[mod] for c in res["configs"]),
        "target": TARGET_PAD, "met": all(c[lib] < TARGET_PAD for c in res["configs"]),
        "met_configs": sum(c[lib] < TARGET_PAD for c in res["configs"]), "configs": len(res["configs"])}
    return res


# ---------------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds, fewer steps, fp32 memory only (about 4 minutes)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="Ray-vs-plain rounds, 1 worker ZeRO-0 (default 2 quick, 4 full)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: step,memory,online,padding")
    ap.add_argument("--_plain", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._plain:
        res = plain_job(json.loads(Path(a._plain[0]).read_text()))
        Path(a._plain[1]).write_text(json.dumps(res))
        return
    skip = {s for s in a.skip.split(",") if s}
    rounds = a.rounds or (2 if a.quick else 4)
    t_all = time.perf_counter()
    root = feature_root()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=TRAIN_WORK))
    payload: dict = {"what": "see the docstring of bench/bench_train.py and docs/benchmarks_train.md",
                     "model": "VideoLLM: preset:tiny-llama (2 layers, width 64) + linear connector (64 -> 64); "
                              "LLM + connector trained, AdamW, fp32, CPU",
                     "feature_set": str(root), "shards": SHARDS, "loadavg_start": loadavg()}
    try:
        if "padding" not in skip:
            log("padding: length grouping vs random batching")
            payload["padding"] = bench_padding(root, seeds=10 if a.quick else 30)
            log(f"  {payload['padding']['summary']}")
        if "online" not in skip:
            log("online: precomputed features vs CLIP tower per step")
            payload["online"] = bench_online(root, rounds=4 if a.quick else 8, steps_per_block=3 if a.quick else 4)
            log(f"  ratio {payload['online']['ratio_online_over_precomputed']}")
        if "memory" not in skip:
            payload["memory"] = bench_memory(root, work, ("fp32",) if a.quick else ("fp32", "bf16"))
            log(f"  {payload['memory']['summary']}")
        if "step" not in skip:
            payload["step"] = bench_step(root, rounds, a.quick, work)
            log(f"  {payload['step']['summary']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload["loadavg_end"] = loadavg()
    payload["total_s"] = round(time.perf_counter() - t_all, 1)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    parts_run = {k: now for k in ("padding", "online", "memory", "step") if k in payload}
    old_path = RESULTS / f"train{'.quick' if a.quick else ''}.json"
    if skip and old_path.exists():  # a partial run keeps the skipped parts of the last results, marked as older
        old = json.loads(old_path.read_text())
        for k in ("padding", "online", "memory", "step"):
            if k in skip and k in old:
                payload[k] = old[k]
                parts_run[k] = old.get("parts_run", {}).get(k, old.get("created_at"))
    payload["parts_run"] = parts_run
    payload["targets"] = {k: payload[k]["summary"]["met"] for k in ("step", "memory", "padding") if k in payload}
    path = write_json("train", a.quick, payload)
    log(f"wrote {path} in {payload['total_s']:.0f}s")


if __name__ == "__main__":
    main()
