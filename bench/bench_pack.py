"""`vlp pack` throughput: vlp's Ray Data pack vs the plain single-process loop a user writes today.

    .venv/bin/python bench/bench_pack.py [--quick] [--records N] [--samples-per-shard N] [--rounds R]
                                         [--scenarios local,s3] [--variants defaults,half]

Dataset (made once, cached under $VLP_CACHE/bench/pack): N records in one Valley-format JSON file (the format
reads LLaVA-style ``image`` rows and ``video`` rows alike): three in four are an image (a 64x96 JPEG, Pillow), one
in four a clip (8 frames 64x96, libx264 mp4, PyAV), each record its own file. Valley's layout: images under
``images/``, clips as ``webvid/<video>.mp4`` (the row names the clip ``video: "<id>"``).

Both sides write one shard per ``samples_per_shard`` records, key = the record's running index (9 digits),
members ``<key>.jpg`` / ``<key>.mp4`` and ``<key>.json``:

  baseline   one process, no Ray: ``json.load`` of the annotation file, then for each record read its media file
             (local: ``open().read()``; S3: one boto3 ``get_object`` after another), ``webdataset.TarWriter``
             one tar per N records (S3: into memory, then one ``put_object``).
  vlp@V      ``vlp.pack.run_pack`` (valley format) with variant V (``VARIANTS``): ``local`` = the executor vlp
             picks on one machine (threads in this process, no Ray), ``ray`` = Ray Data tasks in a Ray started
             once with ``ray.init(num_cpus=2)`` before the timed runs. What the vlp run does beyond the loop: a
             streaming, validating annotation read, a sniff per item, per-group error files and commit markers
             (plus plan files on Ray), the manifest.

Scenarios: ``local`` (media, annotations and output on local disk), ``s3`` (all three on a loopback moto
S3 server started by this script, as the tests do; both sides talk to the same server) and ``s3_latency`` (the
same server behind ``_latency_proxy.py``, which delays every request by ``--latency-ms``, default 20 ms: an
object store across a network, where each GET waits; the loopback server answers in ~2-4 ms of its own CPU).

Timing. Ray start-up is counted apart: ``ray.init`` is timed once, then one warm-up pack (the first job in a
fresh Ray session: its task workers start and import vlp) is timed too and recorded as the cold first run, not
part of the rounds; the baseline gets one warm-up run as well (its first run would pay the webdataset import).
Then per scenario R rounds, each running the baseline and every vlp variant once, the order reversed every
other round so that drift on this shared machine hits both sides alike; each round gives a ratio
(vlp samples/s / baseline samples/s), reported as min/median/max, both without and with ``ray.init`` added to
every vlp run. Ray's task workers run at niceness 15 (Ray's default); after ``ray.init`` this process (the
baseline loop and vlp's driver) takes niceness 15 too, so that on a busy shared machine both sides compete with
the neighbours on the same footing. Each timed run also samples /proc for the CPU time other processes took (``noise``).

Fairness check: each vlp output is compared with the baseline's of the same round: same number of shards and
samples, the same member names in every shard and the same media bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # conftest.start_moto

# The loopback moto server accepts any keys; set before Ray starts so that its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray starts its task workers at niceness 15 (its default worker_niceness). After ray.init this process (the
# baseline loop and vlp's driver) takes the same niceness, so that both sides compete alike with the other jobs
# on a shared machine.
NICENESS = 15
# a busy shared machine can make the local node miss Ray's default registration deadline
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
# and its raylet stops when the metrics agent has not written its port file in time (seen at load ~18 on 2 cores)
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")

from _benchutil import WORK, CpuAccount, loadavg, spread, write_json  # noqa: E402

H, W, CLIP_FRAMES, FPS = 64, 96, 8, 8
VIDEO_EVERY = 4  # one record in four is a clip
NUM_CPUS = 2
TARGET = 1.3
BUCKET = "bench-pack"
# vlp variants, all with vlp pack's defaults except samples_per_shard (its default 1000 would make these few
# hundred records one group: no parallelism between groups) and the executor: "local" = what `vlp pack` picks on
# one machine with no cluster named (threads in the driver, no Ray); "ray" = Ray Data tasks (what it picks on a
# cluster), "ray_half" = the same with cpus_per_task 0.5, so that 4 group tasks run at once on 2 CPUs.
VARIANTS = {"local": {"executor": "local"}, "ray": {"executor": "ray"},
            "ray_half": {"executor": "ray", "cpus_per_task": 0.5}}
DEFAULT_VARIANTS = "local,ray"
NOISY = 0.05


# ---------------------------------------------------------------------------------------------- inputs

def prepare_dataset(n: int) -> Path:
    """{root}/ann.json (valley format) + images/*.jpg + webvid/*.mp4, made once and cached."""
    import numpy as np

    from vlp.synth.shards import Attributes, encode_jpeg, encode_mp4, render_clip

    root = WORK / "pack" / f"dataset-v1-n{n}-{W}x{H}-v{VIDEO_EVERY}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    (root / "webvid").mkdir()
    colors, shapes, dirs = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"], ["left", "right", "up", "down"]
    recs = []
    for i in range(n):
        a = Attributes(colors[i % 4], shapes[i % 3], dirs[(i // 3) % 4])
        rng = np.random.default_rng(i)
        if i % VIDEO_EVERY == VIDEO_EVERY - 1:
            vid = f"{1_000_000 + i}"
            (root / "webvid" / f"{vid}.mp4").write_bytes(encode_mp4(render_clip(a, rng, H, W, CLIP_FRAMES), FPS))
            recs.append({"id": f"v{i}", "video": vid, "conversations": [
                {"from": "human", "value": "<video>\nWhat happens in the clip?"},
                {"from": "gpt", "value": f"A {a.color} {a.shape} moves {a.direction}."}]})
        else:
            name = f"images/{i:06d}.jpg"
            (root / name).write_bytes(encode_jpeg(render_clip(a, rng, H, W, 1)[0]))
            recs.append({"id": f"i{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the picture?"},
                {"from": "gpt", "value": f"A {a.color} {a.shape}."}]})
    (root / "ann.json").write_text(json.dumps(recs))
    (root / ".complete").touch()
    return root


def media_path(rec: dict) -> tuple[str, str]:
    """(relative path, member extension) of a record, as a plain script for Valley's layout resolves it."""
    if "video" in rec:
        v = rec["video"]
        return f"{rec.get('source', 'webvid')}/{v if v.endswith('.mp4') else v + '.mp4'}", "mp4"
    return rec["image"], rec["image"].rsplit(".", 1)[1].lower()


def start_proxy(upstream: str, latency_ms: float):
    """``_latency_proxy.py`` in front of ``upstream`` (http://host:port) -> (process, its endpoint URL)."""
    import socket
    import subprocess

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parent / "_latency_proxy.py"),
                             "--port", str(port), "--upstream", upstream.split("//", 1)[1],
                             "--delay-ms", str(latency_ms)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the latency proxy did not start")


def upload_dataset(root: Path, s3, prefix: str) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != ".complete":
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.relative_to(root).as_posix()}", Body=p.read_bytes())


# ---------------------------------------------------------------------------------------------- the two sides

def baseline_local(root: Path, out: Path, per_shard: int) -> int:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with open(root / "ann.json") as f:
        recs = json.load(f)
    for g in range(0, len(recs), per_shard):
        with wds.TarWriter(str(out / f"data-{g // per_shard:06d}.tar"), mtime=0.0) as w:
            for i, rec in enumerate(recs[g:g + per_shard], start=g):
                rel, ext = media_path(rec)
                with open(root / rel, "rb") as f:
                    data = f.read()
                w.write({"__key__": f"{i:09d}", ext: data, "json": json.dumps(rec).encode()})
    return len(recs)


def baseline_s3(s3, src: str, out: str, per_shard: int) -> int:
    import webdataset as wds

    recs = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{src}/ann.json")["Body"].read())
    for g in range(0, len(recs), per_shard):
        buf = io.BytesIO()
        with wds.TarWriter(buf, mtime=0.0) as w:
            for i, rec in enumerate(recs[g:g + per_shard], start=g):
                rel, ext = media_path(rec)
                data = s3.get_object(Bucket=BUCKET, Key=f"{src}/{rel}")["Body"].read()
                w.write({"__key__": f"{i:09d}", ext: data, "json": json.dumps(rec).encode()})
        s3.put_object(Bucket=BUCKET, Key=f"{out}/data-{g // per_shard:06d}.tar", Body=buf.getvalue())
    return len(recs)


def vlp_pack(ann: str, media_root: str, out: str, per_shard: int, variant: str, endpoint: str | None) -> int:
    from vlp.config import validate
    from vlp.pack import PackConfig, run_pack

    cfg = validate(PackConfig, {"format": {"type": "valley"}, "annotations": [ann], "media_root": media_root,
                                "out": out, "samples_per_shard": per_shard, "ray": {"progress_bars": False},
                                **({"storage": {"endpoint_url": endpoint}} if endpoint else {}),
                                **VARIANTS[variant]})
    man = run_pack(cfg, log=lambda *a: None)
    t = man["totals"]
    if t.get("errors"):
        raise RuntimeError(f"vlp pack reported {t['errors']} error(s): {man}")
    return t["packed"]


# ---------------------------------------------------------------------------------------------- checks

def tar_listing(blobs: dict[str, bytes]) -> dict:
    """{shard name: [(member name, sha1 of media bytes or None for json)]}."""
    out = {}
    for name, blob in sorted(blobs.items()):
        rows = []
        with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
            for m in tf.getmembers():
                data = tf.extractfile(m).read()
                rows.append((m.name, None if m.name.endswith(".json") else hashlib.sha1(data).hexdigest()))
        out[name] = rows
    return out


def read_tars(where: str, s3=None) -> dict[str, bytes]:
    if s3 is None:
        return {p.name: p.read_bytes() for p in Path(where).glob("*.tar")}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=where + "/").get("Contents", [])]
    return {k.rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read()
            for k in keys if k.endswith(".tar") and "/_pack/" not in k}


def compare(base: dict, other: dict) -> dict:
    a, b = tar_listing(base), tar_listing(other)
    ma = [r for rows in a.values() for r in rows]
    mb = [r for rows in b.values() for r in rows]
    same = a == b
    return {"shards": [len(a), len(b)], "members": [len(ma), len(mb)],
            "samples": [len({m[0].split('.')[0] for m in ma}), len({m[0].split('.')[0] for m in mb})],
            "same_member_names": [[m[0] for m in r] for r in a.values()] == [[m[0] for m in r] for r in b.values()],
            "same_media_bytes": same, "ok": same}


# ---------------------------------------------------------------------------------------------- driver

def timed(fn, *args) -> dict:
    acct = CpuAccount()
    t0 = time.perf_counter()
    n = fn(*args)
    wall = time.perf_counter() - t0
    cpu = acct.stop()
    other = cpu.get("cpu_s", {}).get("other_processes", 0.0)
    return {"samples": n, "wall_s": round(wall, 3), "samples_per_s": round(n / wall, 2),
            "noise": round(other / cpu["cpu_s_available"], 3) if cpu.get("cpu_s_available") else None,
            "cpu_accounting": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 records, 1 round (sanity check)")
    ap.add_argument("--records", type=int, default=None, help="records (default 192, quick 96)")
    ap.add_argument("--samples-per-shard", type=int, default=None, help="default 16")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per scenario (default 3, quick 1)")
    ap.add_argument("--scenarios", default="local,s3,s3_latency")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="s3_latency: delay added to every request")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--name", default="pack")
    args = ap.parse_args(argv)

    n = args.records or (96 if args.quick else 192)
    per_shard = args.samples_per_shard or 16
    rounds = args.rounds or (1 if args.quick else 3)
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    load_before = loadavg()
    t_start = time.perf_counter()

    root = prepare_dataset(n)
    work = WORK / "pack" / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    print(f"[bench_pack] {n} records ({n // VIDEO_EVERY} clips), {per_shard} per shard, {rounds} round(s), "
          f"scenarios {scenarios}, vlp variants {variants}; load {load_before}", flush=True)

    moto = endpoint = s3 = proxy = proxy_endpoint = s3_lat = None
    results: dict = {}
    try:
        if "s3" in scenarios or "s3_latency" in scenarios:
            import boto3

            from conftest import start_moto

            moto, endpoint = start_moto()
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket=BUCKET)
            upload_dataset(root, s3, "src")
        if "s3_latency" in scenarios:
            proxy, proxy_endpoint = start_proxy(endpoint, args.latency_ms)
            s3_lat = boto3.client("s3", endpoint_url=proxy_endpoint, region_name="us-east-1")

        import ray

        init_failures = []
        for attempt in range(3):  # a busy shared machine can make the local node miss its start-up deadline
            t0 = time.perf_counter()
            try:
                ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
                break
            except Exception as e:
                init_failures.append(f"{time.perf_counter() - t0:.0f}s: {str(e)[:120]}")
                print(f"  ray.init failed ({init_failures[-1]}); again", flush=True)
                ray.shutdown()
        else:
            raise RuntimeError(f"ray.init failed 3 times: {init_failures}")
        ray_init_s = time.perf_counter() - t0
        os.nice(NICENESS - os.nice(0))
        niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
        cold = {}
        for v in variants:  # the first ray run starts the task workers; the first local one pays imports
            t0 = time.perf_counter()
            vlp_pack(str(root / "ann.json"), str(root), str(work / f"warmup-{v}"), per_shard, v, None)
            cold[v] = time.perf_counter() - t0
            shutil.rmtree(work / f"warmup-{v}", ignore_errors=True)
        ray_v = next((v for v in variants if VARIANTS[v]["executor"] == "ray"), variants[0])
        cold_s = cold[ray_v]
        # the baseline's warm-up too: its first run in this process would otherwise pay the webdataset import
        t0 = time.perf_counter()
        baseline_local(root, work / "warmup-baseline", per_shard)
        base_cold_s = time.perf_counter() - t0
        shutil.rmtree(work / "warmup-baseline", ignore_errors=True)
        print(f"  ray.init(num_cpus={NUM_CPUS}) {ray_init_s:.2f}s; cold first vlp pack (local disk) "
              + ", ".join(f"{v} {c:.2f}s" for v, c in cold.items()) + f"; Ray worker niceness {niceness}", flush=True)

        for sc in scenarios:
            rows = []
            for r in range(rounds):
                order = ["baseline"] + variants
                if r % 2:
                    order = order[::-1]
                row = {"round": r, "order": order, "runs": {}}
                for conf in order:
                    out_id = f"{sc}-r{r}-{conf}"
                    if sc == "local":
                        out = str(work / out_id)
                        fn, fargs = ((baseline_local, (root, Path(out), per_shard)) if conf == "baseline" else
                                     (vlp_pack, (str(root / "ann.json"), str(root), out, per_shard, conf, None)))
                    else:  # both sides talk to the server directly (s3) or through the latency proxy
                        client, ep = (s3, endpoint) if sc == "s3" else (s3_lat, proxy_endpoint)
                        out = f"out/{out_id}"
                        fn, fargs = ((baseline_s3, (client, "src", out, per_shard)) if conf == "baseline" else
                                     (vlp_pack, (f"s3://{BUCKET}/src/ann.json", f"s3://{BUCKET}/src",
                                                 f"s3://{BUCKET}/{out}", per_shard, conf, ep)))
                    res = timed(fn, *fargs)
                    res["out"] = out
                    row["runs"][conf] = res
                    print(f"  {sc} round {r} {conf:9s} {res['samples']} samples in {res['wall_s']:6.2f}s = "
                          f"{res['samples_per_s']:7.1f}/s (other processes {res['noise'] or 0:.0%} of the machine)",
                          flush=True)
                base = row["runs"]["baseline"]
                base_tars = read_tars(base["out"], None if sc == "local" else s3)
                for v in variants:
                    vr = row["runs"][v]
                    vr["vs_baseline"] = compare(base_tars, read_tars(vr["out"], None if sc == "local" else s3))
                    if not vr["vs_baseline"]["ok"]:
                        print(f"  WARNING: {sc} round {r} {v}: output differs from the baseline's: "
                              f"{vr['vs_baseline']}", flush=True)
                    vr["ratio"] = round(vr["samples_per_s"] / base["samples_per_s"], 3)
                    init = ray_init_s if VARIANTS[v]["executor"] == "ray" else 0.0  # local never starts Ray
                    vr["ratio_with_ray_init"] = round(base["wall_s"] / (vr["wall_s"] + init), 3)
                if sc == "local":
                    for conf in order:
                        shutil.rmtree(row["runs"][conf]["out"], ignore_errors=True)
                rows.append(row)
            summ = {"baseline_samples_per_s": spread([rw["runs"]["baseline"]["samples_per_s"] for rw in rows])}
            for v in variants:
                ratios = [rw["runs"][v]["ratio"] for rw in rows]
                summ[v] = {"samples_per_s": spread([rw["runs"][v]["samples_per_s"] for rw in rows]),
                           "ratio": spread(ratios),
                           "ratio_with_ray_init": spread([rw["runs"][v]["ratio_with_ray_init"] for rw in rows]),
                           "same_output_as_baseline": all(rw["runs"][v]["vs_baseline"]["ok"] for rw in rows),
                           "target_met": statistics_median(ratios) >= TARGET}
            if sc == "local":  # one `vlp pack` in a fresh process: ray.init + the cold first job, vs the loop
                bw = statistics_median([rw["runs"]["baseline"]["wall_s"] for rw in rows])
                summ["cold_fresh_session"] = {"variant": ray_v, "wall_s": round(ray_init_s + cold_s, 3),
                                              "baseline_wall_s_median": bw,
                                              "ratio": round(bw / (ray_init_s + cold_s), 3)}
            summ["noise_max"] = max(x["noise"] or 0 for rw in rows for x in rw["runs"].values())
            results[sc] = {"summary": summ, "rounds": rows}
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        for p in (proxy, moto):
            if p is not None:
                p.terminate()
                p.wait(10)
    shutil.rmtree(work, ignore_errors=True)

    payload = {
        "what": "samples/s packing the same annotations + media into WebDataset shards: vlp pack (Ray Data, "
                f"ray.init(num_cpus={NUM_CPUS}) done before the timed runs) vs a plain single-process loop",
        "s3_latency_ms": args.latency_ms if "s3_latency" in scenarios else None,
        "inputs": {"records": n, "clips": n // VIDEO_EVERY, "images": n - n // VIDEO_EVERY,
                   "image": f"{W}x{H} JPEG (Pillow, q92)", "clip": f"{CLIP_FRAMES} frames {W}x{H} libx264 mp4 at {FPS} fps",
                   "annotation_format": "valley (one JSON array; image rows LLaVA-style, video rows webvid/<id>.mp4)",
                   "media_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".mp4")),
                   "samples_per_shard": per_shard, "shards": -(-n // per_shard)},
        "knobs": {"variants": {v: {"samples_per_shard": per_shard, **VARIANTS[v]} for v in variants},
                  "ray_num_cpus": NUM_CPUS, "driver_and_baseline_niceness": os.nice(0),
                  "ray_worker_niceness": niceness, "ray.progress_bars": False,
                  "ray_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_")}},
        "ray_init_s": round(ray_init_s, 3), "ray_init_failed_tries": init_failures,
        "cold_first_run_s": {"what": "the first vlp pack of each variant (local disk) in the fresh Ray session (ray: "
                             "task workers start and import vlp); not part of the rounds",
                             "wall_s": {v: round(c, 3) for v, c in cold.items()},
                             "baseline_first_run_s": round(base_cold_s, 3)},
        "target": {"what": f"vlp samples/s >= {TARGET} x baseline samples/s on {NUM_CPUS} CPUs (median ratio per "
                   "round, Ray already initialised)",
                   "met": {sc: {v: results[sc]["summary"][v]["target_met"] for v in variants} for sc in results}},
        "scenarios": results,
        "reliable_if_noise_below": NOISY,
        "elapsed_s": round(time.perf_counter() - t_start, 1), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    path = write_json(args.name, args.quick, payload)

    print(f"\n{'scenario':8s} {'config':9s} {'samples/s (min/med/max)':>26s} {'ratio (min/med/max)':>22s} "
          f"{'with ray.init':>20s} {'same out':>8s}")
    for sc, res in results.items():
        s = res["summary"]
        b = s["baseline_samples_per_s"]
        print(f"{sc:8s} {'baseline':9s} {b['min']:8.1f}/{b['median']:7.1f}/{b['max']:7.1f}")
        for v in variants:
            x = s[v]
            print(f"{sc:8s} {v:9s} {x['samples_per_s']['min']:8.1f}/{x['samples_per_s']['median']:7.1f}/"
                  f"{x['samples_per_s']['max']:7.1f} {x['ratio']['min']:8.2f}/{x['ratio']['median']:.2f}/"
                  f"{x['ratio']['max']:.2f} {x['ratio_with_ray_init']['min']:8.2f}/"
                  f"{x['ratio_with_ray_init']['median']:.2f}/{x['ratio_with_ray_init']['max']:.2f} "
                  f"{str(x['same_output_as_baseline']):>8s}")
        for v in variants:
            print(f"target {sc} {v} >= {TARGET}x: median {s[v]['ratio']['median']} -> "
                  f"{'MET' if s[v]['target_met'] else 'MISSED'}")
        if s["noise_max"] > NOISY:
            print(f"WARNING: {sc}: other processes took up to {s['noise_max']:.0%} of the machine during a timed run")
    print(f"ray.init {ray_init_s:.2f}s, cold first run {cold_s:.2f}s; load {load_before} -> {loadavg()}")
    print(f"wrote {path}")
    return 0


def statistics_median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs)


if __name__ == "__main__":
    sys.exit(main())
