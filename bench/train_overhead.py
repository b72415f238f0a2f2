"""Training benchmark 1, step overhead: Ray Train + DeepSpeed vs a plain PyTorch loop on the same batches.

    .venv/bin/python bench/train_overhead.py [--quick] [--rounds N]

Ray Train + DeepSpeed (vlp.train.run_train, 1 worker, ZeRO-0; full mode adds 1 worker ZeRO-2 and 2 workers
ZeRO-0) vs a plain single-process PyTorch loop (fresh subprocess, no Ray, no DeepSpeed) that replays exactly the
micro-batches the Ray run logged in samples.jsonl, with the same model, trainable set, AdamW, LR schedule,
gradient clipping and torch thread count (the losses agree step for step). Both run the library's step,
vlp.train.recipe.run_step: the plain loop drives a plain PyTorch engine with it (bench/_train_common.PlainEngine).
One epoch over the instruction set (quick: a seeded half), global batch 8. A third run per round, DeepSpeed
alone (one process, no Ray: vlp.train.recipe.TrainRecipe.setup + train_step in a one-rank gloo group), splits
the overhead. Rounds: plain run, Ray run, plain replay, Ray run, plain replay...; each Ray run is compared with
the mean of the plain runs just before and after it. Steady state: steps after the first DROP. overhead = plain
samples/s / Ray samples/s (Ray: from metrics.jsonl compute_s + data_wait_s per step). Wall time including
start-up is reported separately. Full mode also measures the pause at each epoch start (3 short epochs).
Writes the ``step`` part of bench/results/train.json (2 rounds with --quick, 4 without).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import loadavg, spread  # noqa: E402
from _train_common import (DROP, GLOBAL, LR, MAX_LEN, SEED, TARGET_OVERHEAD, TEMPLATE, TOKENIZER,  # noqa: E402
                           TRAIN_WORK, PlainEngine, bench_main, log, model_config, one_rank_group,
                           read_feature_rows, strip_uid, tokenise, train_config)

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------------------------ plain loop (child)

def plain_engine(spec: dict):
    """The replay's engine: a plain PyTorch one, or (spec["engine"] == "deepspeed") the recipe's own setup
    outside Ray (world size 1, gloo, the run's ZeRO stage and vlp's DeepSpeed config)."""
    import torch

    from vlp.models.videollm import VideoLLM
    from vlp.train.recipe import TrainRecipe, lr_lambda

    steps = len(spec["schedule"])
    if spec.get("engine") == "deepspeed":
        one_rank_group()
        cfg = train_config("ds", spec["micro"], spec["micro"], spec["zero_stage"])
        recipe = TrainRecipe(cfg, {"run_dir": "unused", "state_path": "unused", "total_steps": steps})
        recipe.setup()  # seeded model, AdamW, schedule, deepspeed.initialize; 1 torch thread (cpus_per_worker)
        torch.set_num_threads(spec["threads"])
        return recipe, recipe.engine
    torch.manual_seed(SEED)
    model = VideoLLM(model_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999),
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0.03, "cosine"))
    return None, PlainEngine(model, opt, sched, grad_clip=1.0)


def plain_job(spec: dict) -> dict:
    """The baseline: one process, no Ray, no DeepSpeed; the Ray loop's per-step work (the library's
    vlp.train.recipe.run_step), nothing else. With spec["engine"] == "deepspeed": the same through the
    recipe's DeepSpeed engine and its train_step: splits the Ray path's overhead into DeepSpeed and Ray."""
    t_start = time.perf_counter()
    import torch

    from vlp.train.recipe import run_step

    torch.set_num_threads(spec["threads"])
    t_import = time.perf_counter()
    by_uid = {r["uid"]: r for r in tokenise(read_feature_rows(spec["uri"]))}
    t_data = time.perf_counter()
    recipe, engine = plain_engine(spec)
    t_model = time.perf_counter()
    micro = spec["micro"]
    per_step, ends, cpu_ends, losses = [], [], [], []
    for uids in spec["schedule"]:
        t0 = time.perf_counter()
        rows = [by_uid[strip_uid(u)] for u in uids]
        group = [rows[i:i + micro] for i in range(0, len(rows), micro)]
        t_d = time.perf_counter() - t0
        stats = (recipe.train_step(group, t_d) if recipe is not None
                 else run_step(engine, group, "cpu", torch.float32, t_d))
        per_step.append({"samples": stats.samples, "data_wait_s": t_d, "compute_s": stats.compute_s})
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        losses.append(stats.loss)
    t_steps = time.perf_counter()
    if recipe is not None:
        return {"steps": per_step, "step_end_times": ends, "cpu_end_times": cpu_ends, "losses": losses,
                "phases_s": {"total_in_process": t_steps - t_start}}
    with tempfile.TemporaryDirectory() as d:  # the Ray run ends with a checkpoint + an export: so does this
        from transformers import AutoTokenizer

        from vlp.formats.export import export_model
        from vlp.models.presets import resolve_model_path

        torch.save({"model": engine.module.state_dict(), "opt": engine.opt.state_dict()}, f"{d}/state.pt")
        export_model(engine.module, AutoTokenizer.from_pretrained(resolve_model_path(TOKENIZER)), f"{d}/export")
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


# ------------------------------------------------------------------------------------------------ Ray path

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




# ------------------------------------------------------------------------------------------------ rounds

def round_record(label: str, workers: int, zero: int, threads: int, r: dict, p: dict, pb: dict, ds, cpu: dict,
                 cold: bool, t_ray_init: float) -> dict:
    """One round's comparison: the Ray run ``r`` against the plain runs before (``pb``) and after (``p``) it,
    split by the DeepSpeed-alone replay ``ds`` (1 worker only), with the CPU seconds of the steady window."""
    ray_steps = [{"samples": GLOBAL, "data_wait_s": m["data_wait_s"], "compute_s": m["compute_s"]}
                 for m in r["metrics"]]
    rs = steady(ray_steps, [m["time"] for m in r["metrics"]], DROP)
    ps_after = steady(p["steps"], p["step_end_times"], DROP)
    ps_before = steady(pb["steps"], pb["step_end_times"], DROP)
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
    ov["overhead_paired_median"] = round(statistics.median(a / b for a, b in zip(ray_ms[DROP:n], plain_ms[DROP:n])), 3)
    return {
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


def one_round(i: int, n_rounds: int, label: str, workers: int, zero: int, threads: int, uri: str, runs: Path,
              weight: float, prev: dict, t_ray_init: float) -> tuple[dict, dict]:
    """Ray run, plain replay of its batches (and DeepSpeed alone at 1 worker): (record, the next round's prev)."""
    log(f"step throughput: round {i + 1}/{n_rounds} {label}: Ray Train run")
    poll = ProcPoller()
    try:
        r = run_ray(uri, runs, f"{label}_{i}", workers, zero, weight)
    finally:
        poll.stop()
    log(f"step throughput: round {i + 1}/{n_rounds} {label}: plain replay ({threads} thread(s), micro {GLOBAL})")
    p = run_plain(uri, r["schedule"], GLOBAL, threads)
    ds = None
    if workers == 1:
        log(f"step throughput: round {i + 1}/{n_rounds} {label}: DeepSpeed alone (no Ray) replay")
        ds = run_plain(uri, r["schedule"], GLOBAL, threads, "deepspeed", zero)
    cpu = poll.window(r["metrics"][DROP - 1]["time"], r["metrics"][-1]["time"])
    rec = round_record(label, workers, zero, threads, r, p, prev["result"], ds, cpu, i == 0, t_ray_init)
    ov = rec
    log(f"  {label}: Ray {rec['ray']['samples_per_s']:.1f} samples/s, plain {rec['plain_before']['samples_per_s']:.1f} "
        f"before / {rec['plain_after']['samples_per_s']:.1f} after -> overhead {ov['overhead']:.3f}x (intervals "
        f"{ov['overhead_intervals']:.3f}x, median step {ov['overhead_median_step']:.3f}x, paired "
        f"{ov['overhead_paired_median']:.3f}x; DeepSpeed alone {ov.get('deepspeed_alone_over_plain')}x, Ray on "
        f"top {ov.get('ray_over_deepspeed_alone')}x; CPU time per sample {ov.get('overhead_cpu_time')}x); "
        f"steady-window CPU s {cpu}; wall "
        f"{rec['wall']['ray_run_train_plus_ray_init_s']:.1f}s vs {p['wall_s_subprocess']:.1f}s")
    return rec, {"threads": threads, "schedule": r["schedule"], "result": p}


def epoch_restarts(uri: str, runs: Path) -> dict:
    """What a short epoch costs: Ray Data runs the whole graph again at every epoch start."""
    log("step throughput: epoch restarts (a seeded quarter of the set per epoch, 3 epochs, 1 worker ZeRO-0)")
    r = run_ray(uri, runs, "epochs", 1, 0, 0.25, epochs=3)
    ms = r["metrics"]
    firsts = [m for k, m in enumerate(ms) if k == 0 or m["epoch"] != ms[k - 1]["epoch"]]
    med = statistics.median(m["compute_s"] + m["data_wait_s"] for m in ms if m not in firsts)
    out = {"epochs": 3, "steps": len(ms), "steps_per_epoch": len(ms) // 3,
           "first_step_data_wait_s": [round(m["data_wait_s"], 2) for m in firsts],
           "median_other_step_s": round(med, 4),
           "stall_in_median_steps": [round(m["data_wait_s"] / med, 1) for m in firsts],
           "steps_s_total": round(sum(m["compute_s"] + m["data_wait_s"] for m in ms), 2),
           "wall_s": round(r["wall_s"], 2)}
    log(f"  epoch restarts: first-step data wait {out['first_step_data_wait_s']} s vs median step {med:.3f} s")
    return out


def step_summary(runs: list[dict]) -> dict:
    w1 = [x for x in runs if x["label"] == "w1_zero0"]
    med = statistics.median(x["overhead"] for x in w1)
    return {
        "overhead_w1_zero0": spread([x["overhead"] for x in w1]),
        "overhead_w1_zero0_intervals": spread([x["overhead_intervals"] for x in w1]),
        "overhead_w1_zero0_median_step": spread([x["overhead_median_step"] for x in w1]),
        "overhead_w1_zero0_paired_median": spread([x["overhead_paired_median"] for x in w1]),
        "overhead_w1_zero0_cpu_time": spread([x["overhead_cpu_time"] for x in w1 if "overhead_cpu_time" in x]),
        "target": TARGET_OVERHEAD, "met": med <= TARGET_OVERHEAD,
        "wall_ratio_w1_zero0_warm_ray": spread([x["wall"]["ratio"] for x in w1 if not x["wall"]["includes_ray_init"]]),
        "wall_ratio_first_run_incl_ray_init": runs[0]["wall"]["ratio"],
        "deepspeed_alone_over_plain_w1_zero0": spread([x["deepspeed_alone_over_plain"] for x in w1]),
        "ray_over_deepspeed_alone_w1_zero0": spread([x["ray_over_deepspeed_alone"] for x in w1]),
        **{f"overhead_{x['label']}": x["overhead"] for x in runs if x["label"] != "w1_zero0"},
        **{f"speedup_{x['label']}_vs_plain_1_thread": round(1 / x["overhead"], 3) for x in runs
           if x["workers"] == 2},
    }


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
    plan = [("w1_zero0", 1, 0)] * rounds + ([] if quick else [("w1_zero2", 1, 2), ("w2_zero0", 2, 0)])
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
        rec, prev = one_round(i, len(plan), label, workers, zero, threads, uri, runs, weight, prev, t_ray_init)
        out["runs"].append(rec)
    if not quick:
        out["epoch_restarts"] = epoch_restarts(uri, runs)
    ray.shutdown()
    out["summary"] = step_summary(out["runs"])
    return out


def main() -> None:
    if sys.argv[1:2] == ["--_plain"]:  # one plain-PyTorch baseline job, run by run_plain in its own process
        res = plain_job(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(res))
        return
    bench_main("step", __file__, __doc__, "2 rounds of 1 worker ZeRO-0 on a seeded half, no ZeRO-2, 2-worker or "
               "epoch-restart runs", lambda a, root, work: bench_step(root, a.rounds or (2 if a.quick else 4),
                                                                      a.quick, work),
               lambda ap: ap.add_argument("--rounds", type=int, default=None,
                                          help="Ray-vs-plain rounds, 1 worker ZeRO-0 (default 2 quick, 4 full)"))

if __name__ == "__main__":
    main()
