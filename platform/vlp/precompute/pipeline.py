"""The precompute driver: build the Ray Data graph, commit shards as they complete, write the manifest.

    shards --read (CPU tasks)--> rows --decode+sample+resize (CPU tasks)--> uint8 frames
           --encode (actor pool, GPU or CPU)--> fp16 features --write (tasks)--> parts + small metadata
    driver: counts metadata per shard; a shard is committed (marker written) once every row its reader
    produced has been written. Decode, encode and write all stream: none waits for another to finish.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from .. import __version__
from ..config import dump_config
from ..errors import UserError
from ..data.preprocess import RESAMPLER
from ..storage import StorageConfig, expand_shards, get_fs, join
from .config import PrecomputeConfig
from ..formats.featureset import committed_shards, get_json, put_bytes, put_json
from .stages import DecodeFrames, EncodeFeatures, ReadShard, WriteParts


class FeatureSetMismatch(UserError, RuntimeError):
    """The output folder holds features computed with a different config."""

    exit_code = 1


@dataclass
class ShardState:
    parts: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    n_ok: int = 0
    n_err: int = 0
    expected: Optional[int] = None
    frames: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    media: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return self.expected is not None and self.n_ok + self.n_err == self.expected


def shard_names(uris: list[str]) -> dict[str, str]:
    """{uri: short unique name}: the file stem, disambiguated by parent folders when stems collide."""
    def stem(u: str, depth: int) -> str:
        parts = u.rstrip("/").split("/")
        base = parts[-1][:-4] if parts[-1].endswith(".tar") else parts[-1]
        return "__".join([*parts[-1 - depth:-1], base]).replace(":", "")

    depth = 0
    while True:
        names = {u: stem(u, depth) for u in uris}
        if len(set(names.values())) == len(uris) or depth > 8:
            return names
        depth += 1


def tower_geometry(cfg: PrecomputeConfig) -> tuple[int, int, str, tuple, tuple]:
    """(image size, hidden size, weights sha256, mean, std) without building the model on the driver. mean/std
    are resolved: ``data.preprocess.mean/std`` when set, else the tower's own (its preprocessor_config.json)."""
    from transformers import AutoConfig

    from ..models.presets import resolve_model_path
    from ..models.vision import tower_mean_std, weights_hash

    path = resolve_model_path(cfg.encoder.tower.path)
    c = AutoConfig.from_pretrained(path)
    vc = getattr(c, "vision_config", c)
    mean, std = cfg.data.preprocess.resolve(*tower_mean_std(path))
    return vc.image_size, vc.hidden_size, weights_hash(path), mean, std


def fingerprint(cfg: PrecomputeConfig, size: int, hidden: int, sha: str, mean: tuple, std: tuple) -> dict:
    """What the features depend on. ``preprocess`` holds the crop size and the mean/std actually used (resolved,
    never None): chat and infer read them back from the export, and a resume with other values is refused."""
    return {
        "encoder": {"type": cfg.encoder.tower.type, "path": cfg.encoder.tower.path, "weights_sha256": sha,
                    "layer": cfg.encoder.tower.layer, "hidden_size": hidden, "image_size": size},
        "mode": cfg.output.mode,
        "sampling": cfg.data.sampling.model_dump(),
        "preprocess": {**cfg.data.preprocess.model_dump(mode="json"), "size": size, "mean": list(mean),
                       "std": list(std), "resampler": RESAMPLER},
    }


def plan_stages(cfg: PrecomputeConfig) -> tuple[dict, DecodeFrames, dict]:
    """(fingerprint, decode stage, encoder actor kwargs), resolved once on the driver: the decode stage pads with
    the resolved mean and the encoder normalises with the resolved mean/std, the values the fingerprint records."""
    size, hidden, sha, mean, std = tower_geometry(cfg)
    size = cfg.data.preprocess.size or size
    fp = fingerprint(cfg, size, hidden, sha, mean, std)
    decode = DecodeFrames(cfg.data.sampling, cfg.data.decode, size, cfg.data.preprocess.pad_to_square, mean)
    encode = dict(tower_cfg=cfg.encoder.tower, mode=cfg.output.mode,
                  max_frames_per_forward=cfg.encoder.max_frames_per_forward, mean=mean, std=std)
    return fp, decode, encode


def encoder_on_gpu(cfg: PrecomputeConfig, cluster_gpus: float) -> bool:
    """Whether the encoder actors ask for GPUs: tower.device=cuda, or auto with GPUs in the cluster or an
    accelerator_type asked for (an autoscaling cluster may have no GPU node up yet)."""
    device = cfg.encoder.tower.device
    return device == "cuda" or (device == "auto" and (cluster_gpus > 0 or cfg.encoder.accelerator_type is not None))


def stage_resources(cfg: PrecomputeConfig, on_gpu: bool) -> dict[str, dict]:
    """Ray resource requests per stage, the numbers the autoscaler scales on. Reads, decodes and writes are
    CPU tasks; the encoder is an actor pool, each actor holding ``num_gpus_per_actor`` GPUs (of
    ``accelerator_type`` when set) when the tower runs on cuda, else CPUs only."""
    enc = {"num_cpus": cfg.encoder.cpus_per_actor, "num_gpus": cfg.encoder.num_gpus_per_actor if on_gpu else 0}
    if on_gpu and cfg.encoder.accelerator_type:
        enc["accelerator_type"] = cfg.encoder.accelerator_type
    return {"read": {"num_cpus": cfg.data.read_cpus},
            "decode": {"num_cpus": cfg.data.decode_cpus, "memory": cfg.data.decode_memory_mb << 20},
            "encode": enc,
            "write": {"num_cpus": 0.25}}


def _clear_uncommitted(out: str, storage: StorageConfig, names: list[str]) -> None:
    fs, root = get_fs(out, storage)
    for sub in ("parts", "errors"):
        for n in names:
            p = join(root, sub, n)
            if fs.exists(p):
                fs.rm(p, recursive=True)


def run_precompute(cfg: PrecomputeConfig, log=print) -> dict:
    """Run (or resume) a precompute job. Returns the summary dict (also written to summary.json)."""
    import ray

    from ..runtime import init_ray

    t_start = time.time()
    out, ost = cfg.output.uri, cfg.output.storage
    shards = expand_shards(cfg.data.shards, cfg.data.storage)
    names = shard_names(shards)
    fp, decode, encode = plan_stages(cfg)

    fs, root = get_fs(out, ost)
    fs.makedirs(root, exist_ok=True)
    old_fp = get_json(out, "fingerprint.json", ost)
    if old_fp is not None and old_fp != fp:
        if not cfg.output.overwrite:
            diff = sorted(k for k in set(fp) | set(old_fp) if fp.get(k) != old_fp.get(k))
            raise FeatureSetMismatch(
                f"{out} holds features made with a different {', '.join(diff)}; use a new output.uri "
                f"or output.overwrite=true to delete them")
        fs.rm(root, recursive=True)
        fs.makedirs(root, exist_ok=True)
    put_json(out, "fingerprint.json", fp, ost)
    put_bytes(out, "config.yaml", dump_config(cfg).encode(), ost)

    done = committed_shards(out, ost)
    todo = [u for u in shards if names[u] not in done]
    skipped = [names[u] for u in shards if names[u] in done]
    log(f"[vlp] precompute {len(shards)} shard(s): {len(skipped)} already complete, {len(todo)} to do -> {out}")
    _clear_uncommitted(out, ost, [names[u] for u in todo])

    states: dict[str, ShardState] = {names[u]: ShardState() for u in todo}
    stage_time: Counter = Counter()
    ds_stats = ""
    if todo:
        init_ray(cfg.ray)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.ray.progress_bars
        res = stage_resources(cfg, encoder_on_gpu(cfg, ray.cluster_resources().get("GPU", 0)))
        items = [{"shard": names[u], "uri": u} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.flat_map(ReadShard(cfg.data.storage), **res["read"])
        # Decode runs as stateless CPU tasks (not actors, so it never pins CPUs that reads and writes need).
        # Its memory reservation also keeps Ray Data from fusing it into the encoder actor, which would
        # serialise decoding and encoding in one process.
        ds = ds.map_batches(decode, batch_size=cfg.data.decode_batch_size, batch_format="numpy", **res["decode"])
        ds = ds.map_batches(
            EncodeFeatures, fn_constructor_kwargs=encode, batch_size=cfg.encoder.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.encoder.concurrency), **res["encode"])
        ds = ds.map_batches(WriteParts(out, ost, cfg.output.mode), batch_size=cfg.encoder.batch_size * 2,
                            batch_format="numpy", **res["write"])
        for meta in ds.iter_rows():
            st = states[meta["shard"]]
            if meta["kind"] == "end":
                st.expected = int(meta["expected"])
            else:
                st.n_ok += int(meta["n_ok"])
                st.n_err += int(meta["n_err"])
                st.frames += int(meta["frames"])
                st.bytes_in += int(meta["bytes_in"])
                st.bytes_out += int(meta["bytes_out"])
                st.media.update(json.loads(meta["media_counts"] or "{}"))
                st.ignored.update(json.loads(meta["ignored"] or "{}"))
                for k in ("read", "decode", "encode"):
                    stage_time[k] += float(meta[f"t_{k}"])
                if meta["part"]:
                    st.parts.append(meta["part"])
                if meta["errors"]:
                    st.errors.append(meta["errors"])
            if st.expected is not None and st.n_ok + st.n_err > st.expected:
                raise RuntimeError(f"shard {meta['shard']}: more rows than its reader produced (internal error)")
            if st.complete:
                _commit(out, ost, meta["shard"], st)
        ds_stats = ds.stats()
    incomplete = [n for n, s in states.items() if not s.complete]
    if incomplete:
        raise RuntimeError(f"shards never completed: {incomplete}")
    return _finish(cfg, shards, names, states, skipped, fp, t_start, ds_stats, stage_time, log)


def _commit(out: str, storage: StorageConfig, name: str, st: ShardState) -> None:
    put_json(out, f"shards/{name}.json", {
        "shard": name, "parts": st.parts, "errors": st.errors, "n_ok": st.n_ok, "n_err": st.n_err,
        "expected": st.expected, "frames": st.frames, "bytes_in": st.bytes_in, "bytes_out": st.bytes_out,
        "media": dict(st.media), "ignored_members": dict(st.ignored), "committed_at": time.time(),
    }, storage)


def _finish(cfg, shards, names, states, skipped, fp, t_start, ds_stats, stage_time, log) -> dict:
    out, ost = cfg.output.uri, cfg.output.storage
    done = committed_shards(out, ost)
    fs, root = get_fs(out, ost)
    # every error record of every committed shard, in one file
    lines = []
    reasons: Counter = Counter()
    for rec in done.values():
        for e in rec["errors"]:
            with fs.open(join(root, e), "rb") as f:
                for line in f.read().decode().splitlines():
                    if line.strip():
                        lines.append(line)
                        d = json.loads(line)
                        reasons[f"{d['stage']}: {_reason_class(d['reason'])}"] += 1
    put_bytes(out, "errors.jsonl", ("\n".join(lines) + ("\n" if lines else "")).encode(), ost)
    wall = time.time() - t_start
    ran = states
    frames = sum(s.frames for s in ran.values())
    samples_ok = sum(s.n_ok for s in ran.values())
    summary = {
        "run": cfg.run_name or out.rstrip("/").rsplit("/", 1)[-1],
        "shards": len(shards), "shards_run": len(ran), "shards_skipped_complete": len(skipped),
        "samples_ok": sum(r["n_ok"] for r in done.values()),
        "samples_failed": sum(r["n_err"] for r in done.values()),
        "this_run": {"samples_ok": samples_ok, "samples_failed": sum(s.n_err for s in ran.values()),
                     "frames": frames, "bytes_in": sum(s.bytes_in for s in ran.values()),
                     "bytes_out": sum(s.bytes_out for s in ran.values()), "wall_s": round(wall, 3),
                     "samples_per_s": round(samples_ok / wall, 3) if wall > 0 else 0.0,
                     "frames_per_s": round(frames / wall, 3) if wall > 0 else 0.0,
                     "stage_cpu_seconds": {k: round(v, 3) for k, v in stage_time.items()}},
        "errors_by_reason": dict(reasons.most_common()),
        "ray_data_stats": ds_stats,
    }
    manifest = {
        "format": "vlp-features/1", "vlp_version": __version__, "created_at": time.time(), "host": socket.gethostname(),
        "inputs": shards, "shard_names": {u: names[u] for u in shards},
        "shards": {n: {k: done[n][k] for k in ("n_ok", "n_err", "expected", "frames", "media", "ignored_members")}
                   for n in sorted(done)},
        "encoder": fp["encoder"], "layer": fp["encoder"]["layer"], "mode": fp["mode"],
        "sampling": fp["sampling"], "preprocess": fp["preprocess"],
        "totals": {"samples_ok": summary["samples_ok"], "samples_failed": summary["samples_failed"]},
        "config": cfg.model_dump(mode="json"),
    }
    put_json(out, "manifest.json", manifest, ost)
    put_json(out, "summary.json", summary, ost)
    t = summary["this_run"]
    log(f"[vlp] done: {summary['samples_ok']} ok, {summary['samples_failed']} failed "
        f"({len(skipped)} shard(s) reused); this run {t['samples_ok']} samples, {t['frames']} frames in "
        f"{t['wall_s']:.1f}s = {t['samples_per_s']:.2f} samples/s, {t['frames_per_s']:.1f} frames/s; "
        f"in {t['bytes_in'] / 1e6:.1f} MB, out {t['bytes_out'] / 1e6:.1f} MB")
    if reasons:
        log("[vlp] errors by reason: " + "; ".join(f"{k} x{v}" for k, v in reasons.most_common()))
        log(f"[vlp] error records: {join(out, 'errors.jsonl')}")
    return summary


def _reason_class(reason: str) -> str:
    """Short class of an error reason for the summary table (first clause, no numbers/paths)."""
    import re

    r = reason.split(":")[0] if reason.startswith(("decord", "pyav", "tar is")) else reason
    r = re.sub(r"\(.*?\)", "", r)
    r = re.sub(r"\d+", "N", r)
    return r.strip()[:80]
