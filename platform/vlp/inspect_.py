"""``vlp inspect``: summarise a shard set or a feature set (counts, media types, frames, errors).

A shard set none of whose shards opens as a tar (a text file, a video, a folder of something else) is no shard
set at all: :class:`NotInspectable`, a user error, rather than a report of one corrupt shard."""

from __future__ import annotations

import json
from collections import Counter

from .data.audio import AudioConfig, decode_audio
from .data.media import DecodeConfig, MediaError, SamplingConfig, decode_media, sniff
from .data.tario import TarProblem, iter_tar_samples
from .errors import UserError
from .formats.featureset import FeatureSetLayout, Fingerprint, Manifest, committed_shards
from .data.sample import SampleConfig, parse_sample
from .storage import StorageConfig, expand_shards, get_fs


class NotInspectable(UserError):
    """What ``vlp inspect`` was given is neither a readable tar shard (set) nor a feature set."""


def is_feature_set(uri: str, storage: StorageConfig | None = None) -> bool:
    return FeatureSetLayout(uri, storage).is_feature_set()


def inspect_shards(specs: list[str], storage: StorageConfig | None = None, decode: bool = True,
                   max_samples: int | None = None, sample: SampleConfig | None = None) -> dict:
    """Read every sample of the shards (as precompute does with ``sample``); with ``decode`` also open each
    media to count its frames. Members no stage reads are counted in ``ignored_members``. NotInspectable when
    no shard opens as a tar."""
    sample = sample or SampleConfig()
    shards = expand_shards(specs, storage)
    media = Counter()
    containers = Counter()
    errors: list[dict] = []
    frames_hist = Counter()
    ignored = Counter()
    items = Counter()
    n = ok = text = 0
    per_shard = {}
    sampling = SamplingConfig(num_frames=1)
    for uri in shards:
        fs, path = get_fs(uri, storage)
        s_ok = s_n = 0
        try:
            f = fs.open(path, "rb")
        except Exception as e:
            errors.append({"shard": uri, "key": "<shard>", "stage": "open", "reason": str(e)})
            continue
        with f:
            for item in iter_tar_samples(f, max_sample_bytes=sample.max_sample_bytes):
                if max_samples is not None and n >= max_samples:
                    break
                n += 1
                s_n += 1
                if isinstance(item, TarProblem):
                    errors.append({"shard": uri, "key": item.key, "stage": "read", "reason": item.reason})
                    continue
                ignored.update(item.ignored)
                try:
                    parsed = parse_sample(item, sample)
                except ValueError as e:
                    errors.append({"shard": uri, "key": item.key, "stage": "read", "reason": str(e)})
                    continue
                problem = _look_at_items(parsed, decode, sampling, containers, media, frames_hist)
                if problem:
                    errors.append({"shard": uri, "key": item.key, "stage": "decode", "reason": problem})
                    continue
                items.update(parsed.modalities)
                text += parsed.text_only
                ok += 1
                s_ok += 1
        per_shard[uri] = {"samples": s_n, "ok": s_ok}
    check_some_tar(specs, errors, len(shards))
    return {
        "kind": "shards", "shards": len(shards), "samples": n, "ok": ok, "errors": len(errors),
        "samples_text": text, "items_by_modality": dict(items), "media_types": dict(media), "containers": dict(containers),
        "source_frames": {"min": min(frames_hist) if frames_hist else 0, "max": max(frames_hist) if frames_hist else 0,
                          "histogram": dict(sorted(frames_hist.items()))},
        "ignored_members": dict(ignored), "per_shard": per_shard, "error_records": errors,
    }


def check_some_tar(specs: list[str], errors: list[dict], n_shards: int) -> None:
    """NotInspectable when every one of ``n_shards`` failed before its first member (open or tar header)."""
    whole = [e for e in errors if e["key"] == "<shard>"]
    if n_shards == 0 or len(whole) < n_shards:
        return
    first = whole[0]
    if len(specs) == 1 and n_shards == 1:
        raise NotInspectable(f"{specs[0]} is not a tar shard ({first['reason']}) and not a feature set (no "
                             "fingerprint.json or manifest.json)")
    raise NotInspectable(f"none of the {n_shards} shard(s) of {', '.join(specs)} is a tar shard (first: "
                         f"{first['shard']}: {first['reason']})")


def _look_at_items(sample, decode: bool, sampling, containers: Counter, media: Counter, frames_hist: Counter):
    """Count one sample's items (containers; with ``decode`` the decoded media type and source frames of each).
    -> the first item's problem ("item i (name): reason"), or None."""
    for it in sample.items:
        if it.data is None:
            return f"item {it.index} ({it.name}): media references are not supported yet"
        containers[sniff(it.data)[1]] += 1
        if not decode:
            media[it.ext] += 1
            continue
        try:
            if it.modality == "audio":  # decoded (default cuts) to know it is sound; no frames to count
                decode_audio(it.data, AudioConfig())
                media["audio"] += 1
                continue
            mtype, dec = decode_media(it.data, it.ext, sampling, DecodeConfig())
        except MediaError as e:
            return f"item {it.index} ({it.name}): {e}"
        media[mtype] += 1
        frames_hist[dec.n_source_frames] += 1
    return None


def inspect_features(uri: str, storage: StorageConfig | None = None) -> dict:
    layout = FeatureSetLayout(uri, storage)
    manifest = Manifest.read(layout)
    fp = Fingerprint.read(layout)
    done = committed_shards(layout)
    media, items = Counter(), Counter()
    for rec in done.values():
        media.update(rec.media)
        items.update(rec.items)
    raw = (layout.read(layout.ERRORS) or b"").decode()
    errors = [json.loads(x) for x in raw.splitlines() if x.strip()]
    reasons = Counter(f"{e['stage']}: {e['reason'][:80]}" for e in errors)
    return {
        "kind": "features", "complete": manifest is not None and len(done) == len(manifest.inputs),
        "shards_committed": len(done), "shards_in_manifest": len(manifest.inputs) if manifest else None,
        "samples": sum(r.n_ok for r in done.values()), "errors": sum(r.n_err for r in done.values()),
        "frames": sum(r.frames for r in done.values()), "media_types": dict(media),
        "samples_text": media.get("text", 0), "items_by_modality": dict(items),
        "mode": fp.mode if fp else None, "encoder": fp.encoder.to_json() if fp else None,
        "sampling": fp.sampling if fp else None,
        "format": manifest.format if manifest else None,
        "vlp_version": manifest.vlp_version if manifest else None,
        "errors_by_reason": dict(reasons.most_common()),
    }


def format_report(rep: dict) -> str:
    lines = []
    if rep["kind"] == "shards":
        lines.append(f"shard set: {rep['shards']} shard(s), {rep['samples']} sample(s), {rep['ok']} ok, "
                     f"{rep['errors']} error(s)")
        lines.append(f"  media types: {rep['media_types']}  containers: {rep['containers']}")
        lines.append(f"  items: {rep['items_by_modality']}  text-only samples: {rep['samples_text']}")
        sf = rep["source_frames"]
        lines.append(f"  source frames per sample: min {sf['min']}, max {sf['max']}")
        if rep["ignored_members"]:
            lines.append(f"  ignored members (streamed past, never held or unpickled): {rep['ignored_members']}")
        for e in rep["error_records"][:50]:
            lines.append(f"  ! {e['shard'].rsplit('/', 1)[-1]} {e['key']} [{e['stage']}] {e['reason'][:160]}")
        if len(rep["error_records"]) > 50:
            lines.append(f"  ... {len(rep['error_records']) - 50} more")
    else:
        state = "complete" if rep["complete"] else "INCOMPLETE (resume with the same command)"
        lines.append(f"feature set ({state}): {rep['shards_committed']} shard(s) committed, {rep['samples']} "
                     f"sample(s), {rep['errors']} error(s), {rep['frames']} frames")
        enc = rep.get("encoder") or {}
        lines.append(f"  mode {rep['mode']}, encoder {enc.get('path')} layer {enc.get('layer')} "
                     f"(d={enc.get('hidden_size')}, sha256 {str(enc.get('weights_sha256'))[:12]}), "
                     f"media {rep['media_types']}")
        lines.append(f"  items: {rep['items_by_modality']}  text-only samples: {rep['samples_text']}")
        for k, v in rep["errors_by_reason"].items():
            lines.append(f"  ! {v} x {k}")
    return "\n".join(lines)
