"""Precompute throughput: vlp's precompute vs a plain single-process loop doing the same work.

    .venv/bin/python bench/bench_precompute.py [--quick] [--samples N] [--runs 2:defaults,2:ray,2:tuned]
                                               [--set key=value ...] [--ray-env RAY_x=value ...]

Work per sample (both sides): read it from a WebDataset tar shard, decode the .mp4 with decord and
keep 8 uniformly spread frames, resize+centre-crop them to 224 px (bicubic, antialiased), run the
preset:tiny-clip vision tower (penultimate layer), Valley-pool the features (P + T, D) in fp16, and
write them to Parquet (zstd).

  baseline      one process, no Ray: ``wds.WebDataset(urls, shardshuffle=False)``, decord with its
                default threads, vlp.data.preprocess.resize_crop, CLIPVisionModel forward in batches
                of 8 samples, torch at its default thread count, one Parquet file per shard.
  pipeline@N:V  vlp.precompute.run_precompute (output.mode=valley_pooled) with variant V:
                "defaults" = what ``vlp precompute`` does out of the box on one machine: no Ray is
                started, ``executor: auto`` resolves to the local executor (N decode processes via
                data.decode_workers when N is given, the encoder in the driver process);
                "ray" = the Ray Data graph (what a cluster runs) in a fresh ``ray.init(num_cpus=N)``,
                with its defaults; "cpu" (two CPU reservations changed) and "tuned" ("cpu" plus two
                Ray settings vlp does not set) on the same Ray graph; see VARIANTS below. The default
                runs are 2:defaults and 2:ray.

Every configuration runs in its own subprocess of this script (Ray restarted clean each time), one
after another, the baseline first and again last (the mean of the two is the reference), so each
ratio pipeline/baseline compares runs made minutes apart on the same machine. The baseline runs at
niceness 15, like Ray's workers, so both sides compete alike with anything else on the machine.

Each child first runs a small warm-up job (one 8-sample shard, separate output) in the same process
/ Ray session, then the timed job: interpreter start-up, imports and ray.init are not counted (they
are recorded). The encoder actor still starts inside the timed job (run_precompute creates its actor
pool per job), as it does for a user: a few seconds of each pipeline run. The features both sides
wrote are compared at the end (same work, same numbers). While a timed job runs, /proc is sampled
to account for the machine's CPU time: the run's own processes by role, and "other processes" (a
busy neighbour makes the numbers unreliable: the JSON and the output say how busy it was;
--wait-quiet waits for a quiet machine before each run).

Inputs: synthetic 596x336 clips (5 s at 25 fps, libx264) made with vlp.synth.shards.make_shards, tiled
into 16-sample shards (each clip appears several times under distinct keys, so generating them
stays cheap), cached under $VLP_CACHE/bench (default ~/.cache/vlp/bench).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import WORK, loadavg, wait_quiet, write_json  # noqa: E402

W, H, FPS, FRAMES, T = 596, 336, 25, 125, 8
TOWER = "preset:tiny-clip"
# Applied to every pipeline run: a non-interactive run has no use for progress bars.
COMMON_OVERRIDES = ["ray.progress_bars=false"]
# Variants of the pipeline run. "defaults" is what `vlp precompute` does out of the box. "cpu" changes
# two CPU reservations, to values that suit a CPU-only host whose encoder is light: the encoder actor
# is busy ~20% of the time, yet by default it reserves a whole CPU, and every decode task another
# whole CPU, which on 1 CPU leaves no room for any decode task (the job waits forever) and on 2 CPUs
# room for one. "tuned" adds two settings that are not vlp config (see docs/benchmarks.md): Ray Data's
# per-operator resource reservation off (on 2 CPUs it still holds decode to ~1 task at a time) and a
# higher Ray worker soft limit (else Ray keeps killing idle task workers above num_cpus and starting
# new ones, each re-importing torch: 10-16 worker start-ups per job).
VARIANTS = {
    "defaults": {"overrides": [], "ray": False},  # out of the box on one machine: executor auto -> local, no Ray
    "ray": {"overrides": []},  # the Ray Data graph with its defaults (what a cluster runs)
    "cpu": {"overrides": ["encoder.cpus_per_actor=0.25", "data.decode_cpus=0.75"]},
    "tuned": {"overrides": ["encoder.cpus_per_actor=0.25", "data.decode_cpus=0.75"],
              "data_context": {"op_resource_reservation_enabled": False},
              "env": {"RAY_num_workers_soft_limit": "8"}},
}
DEFAULT_RUNS = "2:defaults,2:ray"
# Ray starts its workers at niceness 15 (raylet worker_niceness). The baseline child takes the same
# niceness, so that both sides compete alike with anything else running on the machine.
RAY_WORKER_NICENESS = 15
TARGET_RATIO, TARGET_CPU = 1.2, 1.1  # issue 17: samples/s vs the loop, own CPU per sample vs the loop's
NOISY = 0.05  # share of the machine's CPU taken by other processes above which a run is flagged


# ---------------------------------------------------------------------------------------------- inputs

def prepare_shards(n_samples: int, per_shard: int, distinct: int, warmup: int) -> tuple[list[str], list[str]]:
    """(timed shard paths, warm-up shard paths), generated once and cached under $VLP_CACHE/bench (default ~/.cache/vlp/bench)."""
    from vlp.synth.shards import MakeShardsConfig, make_shards
    from vlp.data.tario import RawSample, iter_tar_samples, write_tar

    n_shards = -(-n_samples // per_shard)
    root = WORK / "precompute" / f"shards-v1-{W}x{H}x{FRAMES}f{FPS}-d{distinct}-n{n_samples}-s{per_shard}-w{warmup}"
    if not (root / ".complete").exists():
        t0 = time.perf_counter()
        shutil.rmtree(root, ignore_errors=True)
        seed_dir = root / "seed"
        make_shards(MakeShardsConfig(out=str(seed_dir), seed=0, videos=distinct, images=0, instructions=0, heldout=0,
                                     samples_per_shard=distinct, width=W, height=H, num_frames=FRAMES, fps=FPS))
        seeds = []
        for tar in sorted(seed_dir.glob("*.tar")):
            with open(tar, "rb") as f:
                seeds += [s for s in iter_tar_samples(f) if isinstance(s, RawSample)]

        def tile(name: str, shard: int, count: int, offset: int):
            samples = []
            for i in range(count):
                src = seeds[(offset + i) % len(seeds)]
                key = f"{shard:05d}{i:04d}"
                meta = json.loads(src.members["json"])
                meta["key"] = key
                samples.append((key, {**src.members, "json": json.dumps(meta).encode()}))
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            with open(root / name, "wb") as f:
                write_tar(f, samples)

        done = 0
        for s in range(n_shards):
            count = min(per_shard, n_samples - done)
            tile(f"timed/webvid-{s:05d}.tar", s, count, done)
            done += count
        tile("warmup/warmup-00000.tar", 90000, warmup, 0)
        shutil.rmtree(seed_dir)
        (root / ".complete").write_text("ok\n")
        print(f"[bench_precompute] generated {n_samples} samples in {n_shards} shards ({distinct} distinct clips) "
              f"in {time.perf_counter() - t0:.0f}s -> {root}", flush=True)
    return sorted(glob.glob(str(root / "timed" / "*.tar"))), sorted(glob.glob(str(root / "warmup" / "*.tar")))


# ---------------------------------------------------------------------------------------------- baseline

def run_baseline(shards: list[str], out: Path, batch: int = T) -> dict:
    """The plain loop. Returns timings; writes out/<shard>.parquet."""
    import io

    import decord
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import webdataset as wds
    from transformers import CLIPVisionModel

    from vlp.data.preprocess import CLIP_MEAN, CLIP_STD, resize_crop
    from vlp.models.presets import resolve_model_path

    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    model = CLIPVisionModel.from_pretrained(resolve_model_path(TOWER)).eval()
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter() - t0
    times = {"read": 0.0, "decode": 0.0, "resize": 0.0, "encode": 0.0, "write": 0.0}
    rows: dict[str, list[dict]] = {}
    pending: list[dict] = []
    n = 0

    def encode(batch_rows):
        t = time.perf_counter()
        x = torch.from_numpy(np.concatenate([r.pop("pixels") for r in batch_rows]))
        px = (x.float() / 255.0 - mean) / std
        feats = model(pixel_values=px, output_hidden_states=True).hidden_states[-2]  # (N*T, 1+P, D)
        for r, f in zip(batch_rows, torch.split(feats, T)):
            pooled = torch.cat([f[:, 1:].mean(0), f[:, 0]], 0).to(torch.float16).numpy()  # (P + T, D)
            r["features"], r["shape"] = pooled.tobytes(), list(pooled.shape)
            rows.setdefault(r["shard"], []).append(r)
        times["encode"] += time.perf_counter() - t

    def write(shard):
        t = time.perf_counter()
        rs = rows.pop(shard)
        table = pa.table({
            "uid": [f"{shard}/{r['key']}" for r in rs], "key": [r["key"] for r in rs], "shard": [shard] * len(rs),
            "media_type": ["video"] * len(rs),
            "caption": [r["caption"] for r in rs], "conversations": [""] * len(rs),
            "meta": [r["meta"] for r in rs],
            "timestamps": pa.array([r["timestamps"] for r in rs], pa.list_(pa.float32())),
            "num_frames": pa.array([T] * len(rs), pa.int32()),
            "n_source_frames": pa.array([r["n_source_frames"] for r in rs], pa.int32()),
            "features": pa.array([r["features"] for r in rs], pa.binary()),
            "shape": pa.array([r["shape"] for r in rs], pa.list_(pa.int32())),
            "mode": ["valley_pooled"] * len(rs)})
        pq.write_table(table, str(out / f"{shard}.parquet"), compression="zstd")
        times["write"] += time.perf_counter() - t

    current = None
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    it = iter(ds)
    while True:
        t = time.perf_counter()
        try:
            s = next(it)
        except StopIteration:
            break
        shard = Path(s["__url__"]).stem
        meta = json.loads(s["json"])
        caption = s["txt"].decode("utf-8").strip()
        times["read"] += time.perf_counter() - t
        if current is not None and shard != current:  # shard finished: flush it
            if pending:
                encode(pending)
                pending = []
            write(current)
        current = shard
        t = time.perf_counter()
        vr = decord.VideoReader(io.BytesIO(s["mp4"]))
        nsrc = len(vr)
        idx = np.clip(np.floor((np.arange(T) + 0.5) * nsrc / T).astype(np.int64), 0, nsrc - 1)
        frames = vr.get_batch(idx).asnumpy()
        stamps = vr.get_frame_timestamp(idx)[:, 0].tolist()
        del vr
        t2 = time.perf_counter()
        times["decode"] += t2 - t
        pixels = resize_crop(frames, 224).numpy()  # (T, 3, 224, 224) uint8
        times["resize"] += time.perf_counter() - t2
        pending.append({"shard": shard, "key": s["__key__"], "caption": caption, "meta": json.dumps(meta),
                        "timestamps": stamps, "n_source_frames": nsrc, "pixels": pixels})
        n += 1
        if len(pending) == batch:
            encode(pending)
            pending = []
    if pending:
        encode(pending)
    if current is not None:
        write(current)
    wall = time.perf_counter() - t0
    return {"samples": n, "wall_s": round(wall, 3), "samples_per_s": round(n / wall, 3),
            "model_load_s": round(t_load, 3), "stage_seconds": {k: round(v, 3) for k, v in times.items()}}


def child_baseline(spec: dict) -> dict:
    import decord
    import torch

    from _benchutil import CpuAccount

    os.nice(RAY_WORKER_NICENESS - os.nice(0))
    out = Path(spec["out"])
    warm = run_baseline(spec["warmup_shards"], out / "warmup")
    acct = CpuAccount()
    timed = run_baseline(spec["shards"], out / "timed")
    timed["cpu_accounting"] = acct.stop()
    return {"config": "baseline", "warmup": warm, "timed": timed,
            "threads": {"torch_num_threads": torch.get_num_threads(),
                        "torch_interop_threads": torch.get_num_interop_threads(),
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)"),
                        "decord_num_threads": "default (0 = auto)", "cpus_usable": len(os.sched_getaffinity(0)),
                        "niceness": os.nice(0),
                        "decord": decord.__version__}}


# ---------------------------------------------------------------------------------------------- pipeline

_OP_RE = re.compile(r"^Operator (\d+) (.+?): (\d+) tasks executed, (\d+) blocks produced in ([\d.]+)s", re.M)
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_stats(text: str) -> list[dict]:
    """Per-operator numbers out of Ray Data's stats text (the format of ray 2.60)."""
    ops = []
    matches = list(_OP_RE.finditer(text))
    for i, m in enumerate(matches):
        body = text[m.end(): matches[i + 1].start() if i + 1 < len(matches) else len(text)]
        op = {"name": m.group(2), "tasks": int(m.group(3)), "blocks": int(m.group(4)), "op_wall_s": float(m.group(5))}
        for label, key in (("Remote wall time", "remote_wall_total_s"), ("Remote cpu time", "remote_cpu_total_s")):
            mm = re.search(label + r":.*?([\d.]+)(us|ms|s) total", body)
            if mm:
                op[key] = round(float(mm.group(1)) * _UNITS[mm.group(2)], 3)
        mm = re.search(r"Estimated single task throughput: ([\d.]+) rows/s", body)
        if mm:
            op["single_task_rows_per_s"] = round(float(mm.group(1)), 2)
        ops.append(op)
    return ops


def _probe():
    import torch

    return {"torch_num_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "(unset)")}


def child_pipeline(spec: dict) -> dict:
    import ray
    import ray.data

    from vlp.config import apply_overrides, validate
    from vlp.precompute.config import PrecomputeConfig

    n = spec["num_cpus"]
    out = Path(spec["out"])

    def cfg_for(shards, uri):
        data = {"data": {"shards": shards}, "encoder": {"tower": {"path": TOWER}},
                "output": {"uri": str(uri), "mode": "valley_pooled", "overwrite": True}, "ray": {"num_cpus": n}}
        apply_overrides(data, spec["overrides"])
        return validate(PrecomputeConfig, data, "bench")

    cfg = cfg_for(spec["shards"], out / "timed")
    if not spec.get("ray", True):  # out of the box on one machine: no Ray at all
        return child_local(spec, cfg, cfg_for(spec["warmup_shards"], out / "warmup"))
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
             object_store_memory=cfg.ray.object_store_memory)
    t_init = time.perf_counter() - t0
    ctx = ray.data.DataContext.get_current()  # run_precompute uses (and keeps) the current context
    for k, v in spec.get("data_context", {}).items():
        setattr(ctx, k, v)
    try:
        sw, t_warm, s, wall, cpu = warm_then_timed(cfg_for(spec["warmup_shards"], out / "warmup"), cfg)
        probes = {
            "decode_task": ray.get(ray.remote(num_cpus=cfg.data.decode_cpus)(_probe).remote()),
            "encoder_actor": ray.get(ray.remote(num_cpus=cfg.encoder.cpus_per_actor)(_probe).remote()),
        }
    finally:
        ray.shutdown()
    tr = s["this_run"]
    return {
        "config": spec["config"], "num_cpus": n, "overrides": spec["overrides"],
        "data_context": spec.get("data_context", {}), "ray_init_s": round(t_init, 3),
        "warmup": {"samples": sw["this_run"]["samples_ok"], "wall_s": round(t_warm, 3),
                   "samples_per_s": round(sw["this_run"]["samples_ok"] / t_warm, 3)},
        "timed": {"samples": tr["samples_ok"], "failed": tr["samples_failed"], "wall_s": round(wall, 3),
                  "samples_per_s": round(tr["samples_ok"] / wall, 3),
                  "stage_cpu_seconds": tr["stage_cpu_seconds"], "cpu_accounting": cpu},
        "effective_config": {"data.read_cpus": cfg.data.read_cpus, "data.decode_cpus": cfg.data.decode_cpus,
                             "data.decode_batch_size": cfg.data.decode_batch_size,
                             "data.decode.threads": cfg.data.decode.threads, "encoder.batch_size": cfg.encoder.batch_size,
                             "encoder.concurrency": cfg.encoder.concurrency,
                             "encoder.cpus_per_actor": cfg.encoder.cpus_per_actor, "write_cpus": 0.25},
        "threads": probes, "niceness": {"driver": os.nice(0), "ray_workers": "15 (Ray default worker_niceness)"},
        "ray_data_operators": parse_stats(s["ray_data_stats"]),
        "ray_data_stats": s["ray_data_stats"],
    }


def warm_then_timed(warm_cfg, cfg) -> tuple:
    """The warm-up job, then the timed one with the machine's CPU accounted: (warm-up summary, its wall s, timed
    summary, its wall s, CPU accounting)."""
    from _benchutil import CpuAccount
    from vlp.precompute.pipeline import run_precompute

    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.perf_counter()
    sw = run_precompute(warm_cfg, log=quiet)
    t_warm = time.perf_counter() - t0
    acct = CpuAccount()
    t0 = time.perf_counter()
    s = run_precompute(cfg, log=quiet)
    return sw, t_warm, s, time.perf_counter() - t0, acct.stop()


def child_local(spec: dict, cfg, warm_cfg) -> dict:
    """A pipeline run without Ray: ``vlp precompute`` on one machine (executor auto resolves to local)."""
    from vlp.precompute.pipeline import choose_executor

    os.nice(RAY_WORKER_NICENESS - os.nice(0))  # as the baseline: both compete alike with anything else running
    sw, t_warm, s, wall, cpu = warm_then_timed(warm_cfg, cfg)
    tr = s["this_run"]
    return {
        "config": spec["config"], "num_cpus": spec["num_cpus"], "overrides": spec["overrides"],
        "executor": choose_executor(cfg), "ray_init_s": 0.0,
        "warmup": {"samples": sw["this_run"]["samples_ok"], "wall_s": round(t_warm, 3),
                   "samples_per_s": round(sw["this_run"]["samples_ok"] / t_warm, 3)},
        "timed": {"samples": tr["samples_ok"], "failed": tr["samples_failed"], "wall_s": round(wall, 3),
                  "samples_per_s": round(tr["samples_ok"] / wall, 3),
                  "stage_cpu_seconds": tr["stage_cpu_seconds"], "cpu_accounting": cpu},
        "effective_config": {"executor": cfg.executor, "data.decode_workers": cfg.data.decode_workers,
                             "data.decode_batch_size": cfg.data.decode_batch_size,
                             "encoder.batch_size": cfg.encoder.batch_size},
        "niceness": {"driver": os.nice(0)},
    }


# ---------------------------------------------------------------------------------------------- driver

def _stop_group(p: subprocess.Popen) -> None:
    """TERM, then KILL, whatever is left of the child's process group (Ray daemons of a hung run)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        t = time.time() + wait
        while time.time() < t:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    if p.poll() is None:
        p.wait()


def run_child(spec: dict, timeout: float, log_dir: Path, env: dict) -> dict:
    log_dir.mkdir(parents=True, exist_ok=True)
    res_path = log_dir / f"{spec['name']}.result.json"
    log_path = log_dir / f"{spec['name']}.log"
    res_path.unlink(missing_ok=True)
    spec = {**spec, "result": str(res_path)}
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        # own process group, so that a hung child can be stopped together with the Ray it started
        p = subprocess.Popen([sys.executable, __file__, "--_child", json.dumps(spec)], stdout=logf,
                             stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[1]),
                             env={**os.environ, **env}, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        _stop_group(p)
    took = time.perf_counter() - t0
    shutil.rmtree(Path(spec["out"]) / "warmup", ignore_errors=True)
    if rc != 0 or not res_path.exists():
        tail = log_path.read_text()[-3000:]
        print(f"  {spec['name']}: FAILED ({rc}) after {took:.0f}s; log {log_path}\n{tail}", flush=True)
        return {"config": spec["config"], "out": spec["out"], "error": f"exit {rc} after {took:.0f}s (timeout {timeout:.0f}s)",
                "log": str(log_path)}
    r = json.loads(res_path.read_text())
    r["child_total_s"] = round(took, 1)
    r["out"] = spec["out"]
    acct = r["timed"].get("cpu_accounting", {})
    other = acct.get("cpu_s", {}).get("other_processes", 0.0)
    print(f"  {spec['name']}: {r['timed']['samples']} samples in {r['timed']['wall_s']:.1f}s = "
          f"{r['timed']['samples_per_s']:.2f} samples/s (child {took:.0f}s; other processes used "
          f"{other:.0f} of {acct.get('cpu_s_available', 0):.0f} CPU-s)", flush=True)
    return r


def read_features(folder: Path) -> dict:
    """{uid: fp16 array} from every Parquet file under folder."""
    import numpy as np
    import pyarrow.parquet as pq

    out = {}
    for p in folder.rglob("*.parquet"):
        t = pq.read_table(p, columns=["uid", "features", "shape"]).to_pydict()
        for uid, f, shape in zip(t["uid"], t["features"], t["shape"]):
            if isinstance(f, list):  # vlp's format: one entry per media item (one video here)
                f, shape = f[0], shape[0]
            out[uid] = np.frombuffer(f, np.float16).reshape(shape)
    return out


def compare_outputs(base_dir: Path, other_dir: Path) -> dict:
    """Do the pipeline and the plain loop produce the same features? (max |difference| over all values)"""
    import numpy as np

    a, b = read_features(base_dir), read_features(other_dir)
    common = sorted(set(a) & set(b))
    if not common:
        return {"samples_compared": 0, "baseline_samples": len(a), "pipeline_samples": len(b)}
    diff = max(float(np.abs(a[u].astype(np.float32) - b[u].astype(np.float32)).max()) for u in common)
    scale = max(float(np.abs(a[u].astype(np.float32)).max()) for u in common)
    return {"samples_compared": len(common), "baseline_samples": len(a), "pipeline_samples": len(b),
            "same_shapes": all(a[u].shape == b[u].shape for u in common),
            "max_abs_diff": round(diff, 5), "max_abs_value": round(scale, 3)}


def noise(r: dict) -> float | None:
    """Share of the machine's CPU time that processes outside this benchmark took during a timed run."""
    a = r.get("timed", {}).get("cpu_accounting", {})
    return round(a["cpu_s"].get("other_processes", 0.0) / a["cpu_s_available"], 3) if a.get("cpu_s_available") else None


def own_cpu_per_sample(r: dict) -> float | None:
    """CPU milliseconds per sample spent by the run's own processes (driver + Ray workers/daemons)."""
    a = r.get("timed", {}).get("cpu_accounting", {})
    if not a.get("cpu_s"):
        return None
    own = sum(v for k, v in a["cpu_s"].items() if k != "other_processes")
    return round(1000 * own / r["timed"]["samples"], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 samples, runs 2:defaults,2:ray, one baseline (sanity "
                    "check)")
    ap.add_argument("--samples", type=int, default=None, help="samples in the timed job (default 1024, quick 48)")
    ap.add_argument("--samples-per-shard", type=int, default=16)
    ap.add_argument("--distinct", type=int, default=None, help="distinct synthetic clips (default 24, quick 8)")
    ap.add_argument("--runs", default=None,
                    help=f"pipeline runs as NUM_CPUS:VARIANT,... (variants: {', '.join(VARIANTS)}; "
                         f"default {DEFAULT_RUNS})")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra PrecomputeConfig override for every pipeline run (repeatable)")
    ap.add_argument("--ray-env", action="append", default=[], metavar="RAY_X=VALUE",
                    help="environment for the pipeline children, e.g. RAY_num_workers_soft_limit=8 (repeatable)")
    ap.add_argument("--baseline-runs", type=int, default=None, choices=(0, 1, 2),
                    help="baseline runs: 2 = before and after the pipeline runs (default; quick: 1)")
    ap.add_argument("--timeout", type=float, default=360, help="seconds per child before it counts as hung")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each run, wait up to SECONDS for the machine to be >= 90%% idle (shared machines)")
    ap.add_argument("--name", default="precompute", help="results file bench/results/<name>.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        spec = json.loads(args._child)
        res = child_baseline(spec) if spec["config"] == "baseline" else child_pipeline(spec)
        Path(spec["result"]).write_text(json.dumps(res))
        return 0

    n = args.samples or (48 if args.quick else 1024)
    distinct = args.distinct or (8 if args.quick else 24)
    runs_spec = []
    for item in (args.runs or DEFAULT_RUNS).split(","):
        c, _, v = item.strip().partition(":")
        v = v or "defaults"
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} in --runs (known: {', '.join(VARIANTS)})")
        runs_spec.append((int(c), v))
    ray_env = dict(e.split("=", 1) for e in args.ray_env)
    shards, warm = prepare_shards(n, args.samples_per_shard, distinct, warmup=8)
    nb = args.baseline_runs if args.baseline_runs is not None else (1 if args.quick else 2)
    order = ["baseline"] * min(nb, 1) + [f"pipeline@{c}:{v}" for c, v in runs_spec] + ["baseline"] * max(nb - 1, 0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = WORK / "precompute" / f"run-{stamp}"
    print(f"[bench_precompute] {n} samples / {len(shards)} shards; order: {', '.join(order)}", flush=True)
    load_before = loadavg()
    t_start = time.perf_counter()
    runs = []
    for i, conf in enumerate(order):
        tag = conf.replace("@", "").replace(":", "-")
        spec = {"name": f"{i}-{tag}", "config": conf, "shards": shards, "warmup_shards": warm,
                "out": str(work / f"{i}-{tag}")}
        if conf != "baseline":
            c, v = conf.split("@")[1].split(":")
            workers = [] if VARIANTS[v].get("ray", True) else [f"data.decode_workers={c}"]
            spec.update(num_cpus=int(c), variant=v,
                        overrides=COMMON_OVERRIDES + VARIANTS[v]["overrides"] + workers + args.set,
                        data_context=VARIANTS[v].get("data_context", {}), ray=VARIANTS[v].get("ray", True))
        quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        env = {**VARIANTS[spec["variant"]].get("env", {}), **ray_env} if conf != "baseline" else {}
        runs.append(run_child(spec, args.timeout, work / "logs", env))
        if quiet:
            runs[-1]["waited_for_quiet"] = quiet

    # same work? compare every pipeline run's features with the first baseline run's
    base_out = next((Path(r["out"]) for r in runs if r["config"] == "baseline" and "error" not in r), None)
    for r in runs:
        if r["config"] != "baseline" and "error" not in r and base_out is not None:
            r["features_vs_baseline"] = compare_outputs(base_out / "timed", Path(r["out"]) / "timed")

    base = [r for r in runs if r["config"] == "baseline" and "error" not in r]
    base_sps = sum(r["timed"]["samples_per_s"] for r in base) / len(base) if base else None
    summary = {"baseline": {"samples_per_s": round(base_sps, 3) if base_sps else None,
                            "runs_samples_per_s": [r["timed"]["samples_per_s"] for r in base],
                            "own_cpu_ms_per_sample": [own_cpu_per_sample(r) for r in base],
                            "noise_other_processes_share": [noise(r) for r in base]}}
    for r in runs:
        if r["config"] == "baseline":
            continue
        if "error" in r:
            summary[r["config"]] = {"error": r["error"]}
            continue
        sps = r["timed"]["samples_per_s"]
        summary[r["config"]] = {
            "samples_per_s": sps, "ratio_vs_baseline": round(sps / base_sps, 3) if base_sps else None,
            "own_cpu_ms_per_sample": own_cpu_per_sample(r), "noise_other_processes_share": noise(r),
            "features_vs_baseline": r.get("features_vs_baseline"),
            "cold_first_job": r["warmup"], "ray_init_s": r["ray_init_s"]}
    targets = {}
    for conf in summary:
        if conf.startswith("pipeline@2") and "error" not in summary[conf]:
            ratio = summary[conf]["ratio_vs_baseline"]
            base_cpu = [x for x in summary["baseline"]["own_cpu_ms_per_sample"] if x]
            cpu = summary[conf]["own_cpu_ms_per_sample"]
            cpu_ratio = round(cpu / (sum(base_cpu) / len(base_cpu)), 3) if cpu and base_cpu else None
            targets[conf] = {"ratio": ratio, "cpu_per_sample_ratio": cpu_ratio,
                             "met": bool(ratio and ratio >= TARGET_RATIO and cpu_ratio and cpu_ratio <= TARGET_CPU)}
    payload = {
        "what": "samples/s of the timed job (after a warm-up job in the same process / Ray session)",
        "inputs": {"samples": n, "shards": len(shards), "samples_per_shard": args.samples_per_shard,
                   "distinct_clips": distinct, "clip": f"{W}x{H}, {FRAMES} frames at {FPS} fps, libx264 crf 18",
                   "frames_per_sample": T, "tower": TOWER, "mode": "valley_pooled", "warmup_samples": 8},
        "variants": {k: {**v, "overrides": COMMON_OVERRIDES + v["overrides"] + args.set} for k, v in VARIANTS.items()},
        "ray_env": ray_env,
        "baseline_settings": {"niceness": RAY_WORKER_NICENESS, "torch_threads": "default (all cores)",
                              "decord_threads": "default", "encoder_batch_samples": T},
        "summary": summary,
        "target": {"what": f"pipeline@2 samples/s >= {TARGET_RATIO} x baseline samples/s and own CPU per sample "
                           f"<= {TARGET_CPU} x the baseline's", "by_run": targets},
        "max_noise": max((x for x in (noise(r) for r in runs) if x is not None), default=None),
        "reliable_if_max_noise_below": NOISY,
        "order": order, "runs": runs,
        "elapsed_s": round(time.perf_counter() - t_start, 1), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    path = write_json(args.name, args.quick, payload)
    if all("error" not in r for r in runs):
        shutil.rmtree(work, ignore_errors=True)
    else:
        for r in runs:
            shutil.rmtree(r.get("out", work / "-"), ignore_errors=True)  # keep only the logs

    print(f"\n{'config':20s} {'samples/s':>10s} {'ratio':>7s} {'own CPU ms/sample':>18s} {'noise':>6s}")
    b = summary["baseline"]
    print(f"{'baseline':20s} {base_sps or 0:10.2f} {1:7.3f} {str(b['own_cpu_ms_per_sample']):>18s} "
          f"{str(b['noise_other_processes_share']):>6s}")
    for conf, sm in summary.items():
        if conf == "baseline":
            continue
        if "error" in sm:
            print(f"{conf:20s} ERROR {sm['error']}")
        else:
            print(f"{conf:20s} {sm['samples_per_s']:10.2f} {sm['ratio_vs_baseline'] or 0:7.3f} "
                  f"{str(sm['own_cpu_ms_per_sample']):>18s} {str(sm['noise_other_processes_share']):>6s}")
    for conf, sm in summary.items():
        fv = sm.get("features_vs_baseline") if isinstance(sm, dict) else None
        if fv:
            print(f"{conf}: features vs baseline: {fv['samples_compared']} samples, max |diff| {fv.get('max_abs_diff')} "
                  f"(values up to {fv.get('max_abs_value')})")
    for conf, t in targets.items():
        print(f"target {conf}: >= {TARGET_RATIO} x baseline samples/s: {t['ratio']}, <= {TARGET_CPU} x its CPU per "
              f"sample: {t['cpu_per_sample_ratio']} -> {'MET' if t['met'] else 'MISSED'}")
    if payload["max_noise"] is not None and payload["max_noise"] > NOISY:
        print(f"WARNING: other processes took up to {payload['max_noise']:.0%} of the machine during a timed run; "
              f"these numbers are not reliable, run again on a quiet machine")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
