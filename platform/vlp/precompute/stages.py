"""The precompute stages: plain functions / callable classes over rows and batches, testable without Ray.

Row kinds flowing through the graph (one schema for all, so Arrow blocks stay uniform):
  ``sample``  a usable sample; gains ``frames`` after decode and ``features`` after encode
  ``error``   a sample (or a whole shard) that cannot be used; carries ``stage`` and ``error``
  ``end``     one per shard, last out of the reader, with ``expected`` = rows the shard produced;
              the driver commits a shard once it has seen that many sample+error rows for it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import numpy as np

from ..data.media import IMAGE_EXTS, VIDEO_EXTS, DecodeConfig, MediaError, SamplingConfig, decode_media
from ..data.preprocess import normalize, resize_crop
from ..data.tario import RawSample, TarProblem, iter_tar_samples
from ..formats.featureset import FeatureSetLayout
from ..models.poolers.valley import valley_pool  # output.mode=valley_pooled is the Valley pooler's own pooling
from ..storage import StorageConfig, describe_storage_error, get_fs

ROW_FIELDS = {
    "shard": "", "key": "", "kind": "", "media": b"", "media_ext": "", "caption": "", "conversations": "",
    "meta": "", "error": "", "stage": "", "expected": -1, "bytes_in": 0, "ignored": "",
    "media_type": "", "frames": b"", "frames_shape": "", "timestamps": "", "n_source_frames": 0,
    "decoder": "", "features": b"", "features_shape": "", "t_read": 0.0, "t_decode": 0.0, "t_encode": 0.0,
}


def make_row(**kw) -> dict:
    row = dict(ROW_FIELDS)
    unknown = set(kw) - set(row)
    if unknown:
        raise KeyError(f"unknown row fields {unknown}")
    row.update(kw)
    return row


# ------------------------------------------------------------------------------------------------ read

def parse_sample(raw: RawSample) -> dict[str, Any]:
    """Pick the media member, caption and conversations of one raw sample. Raises ValueError(reason)."""
    media_ext = next((e for e in (*VIDEO_EXTS, *IMAGE_EXTS) if e in raw.members), None)
    if media_ext is None:
        have = ", ".join(sorted(raw.members)) or "nothing"
        raise ValueError(f"no media member (sample has: {have})")
    meta: dict = {}
    if "json" in raw.members:
        try:
            meta = json.loads(raw.members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"json member is not valid UTF-8 JSON: {e}") from None
        except RecursionError:  # json nested thousands deep: not a ValueError, would kill the reader
            raise ValueError("json member is nested too deeply to parse") from None
        if not isinstance(meta, dict):
            raise ValueError("json member is not an object")
    caption = ""
    if "txt" in raw.members:
        try:
            caption = raw.members["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption (.txt) is not valid UTF-8: {e}") from None
    if not caption and isinstance(meta.get("caption"), str):  # no .txt, or a blank one
        caption = meta["caption"].strip()
    conv = meta.get("conversations")
    if conv is not None:
        ok = isinstance(conv, list) and conv and all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in conv)
        if not ok:
            raise ValueError("conversations must be a non-empty list of {from, value} objects")
    if not caption and not conv:
        raise ValueError("missing caption (no .txt member and no caption/conversations in .json)")
    return {
        "media": raw.members[media_ext], "media_ext": media_ext, "caption": caption,
        "conversations": json.dumps(conv) if conv else "", "meta": json.dumps(meta) if meta else "",
    }


class ReadShard:
    """shard item -> rows (flat_map). Never raises for bad data: it becomes error rows."""

    def __init__(self, storage: StorageConfig | None = None):
        self.storage = storage

    def __call__(self, item: dict) -> Iterator[dict]:
        shard, uri = item["shard"], item["uri"]
        n = 0
        t0 = time.perf_counter()
        try:
            fs, path = get_fs(uri, self.storage)
            f = fs.open(path, "rb", block_size=8 << 20) if "://" in uri else open(path, "rb")
        except Exception as e:  # missing shard, bad credentials, unreachable store
            yield make_row(shard=shard, key="<shard>", kind="error", stage="open", error=describe_storage_error(uri, e))
            yield make_row(shard=shard, key="<end>", kind="end", expected=1)
            return
        with f:
            for item_ in iter_tar_samples(f):
                n += 1
                dt = time.perf_counter() - t0
                if isinstance(item_, TarProblem):
                    yield make_row(shard=shard, key=item_.key, kind="error", stage="read", error=item_.reason, t_read=dt)
                else:
                    try:
                        fields = parse_sample(item_)
                    except Exception as e:  # ValueError(reason) by design; anything else is still bad data
                        reason = str(e) if isinstance(e, ValueError) else f"cannot parse sample: {type(e).__name__}: {e}"
                        yield make_row(shard=shard, key=item_.key, kind="error", stage="read", error=reason,
                                       bytes_in=item_.size, ignored=",".join(item_.ignored), t_read=dt)
                    else:
                        yield make_row(shard=shard, key=item_.key, kind="sample", bytes_in=item_.size,
                                       ignored=",".join(item_.ignored), t_read=dt, **fields)
                t0 = time.perf_counter()
        yield make_row(shard=shard, key="<end>", kind="end", expected=n)


# ------------------------------------------------------------------------------------------------ decode

def batch_rows(batch: dict[str, np.ndarray]) -> list[dict]:
    """A numpy batch of the stages (column -> array) -> one plain-Python dict per row."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    return v


def _batch(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for k in ROW_FIELDS:
        vals = [r[k] for r in rows]
        arr = np.empty(len(vals), dtype=object)
        arr[:] = vals
        if isinstance(ROW_FIELDS[k], (int, float)) and not isinstance(ROW_FIELDS[k], bool):
            arr = np.asarray(vals, dtype=np.int64 if isinstance(ROW_FIELDS[k], int) else np.float64)
        out[k] = arr
    return out


class DecodeFrames:
    """Batch stage: media bytes -> sampled, resized, centre-cropped uint8 frames (T, 3, S, S)."""

    def __init__(self, sampling: SamplingConfig, decode: DecodeConfig, size: int, pad_to_square: bool = False,
                 mean=(0.48145466, 0.4578275, 0.40821073)):
        self.sampling, self.decode, self.size, self.pad, self.mean = sampling, decode, size, pad_to_square, mean

    def decode_row(self, r: dict) -> dict:
        if r["kind"] != "sample":
            return r
        t0 = time.perf_counter()
        try:
            mtype, dec = decode_media(r["media"], r["media_ext"], self.sampling, self.decode)
            frames = resize_crop(dec.frames, self.size, self.pad, self.mean).numpy()  # (T, 3, S, S) uint8
        except MediaError as e:
            return {**r, "kind": "error", "stage": "decode", "error": str(e), "media": b"",
                    "t_decode": time.perf_counter() - t0}
        except Exception as e:
            if isinstance(e, RuntimeError) and "decode.device=cuda" in str(e):
                raise  # a config error (no GPU decord), not bad data: the job must stop
            # a decoder bug on one odd file must not kill the whole job: record it like any decode failure
            return {**r, "kind": "error", "stage": "decode", "media": b"", "t_decode": time.perf_counter() - t0,
                    "error": f"unexpected decode failure: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        return {**r, "media": b"", "media_type": mtype, "frames": frames.tobytes(),
                "frames_shape": ",".join(map(str, frames.shape)), "timestamps": ",".join(f"{t:.4f}" for t in dec.timestamps),
                "n_source_frames": dec.n_source_frames, "decoder": dec.decoder, "t_decode": time.perf_counter() - t0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _batch([self.decode_row(r) for r in batch_rows(batch)])


# ------------------------------------------------------------------------------------------------ encode

def shape_of(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",")) if s else ()


class EncodeFeatures:
    """Actor stage: uint8 frames -> frozen-tower features (fp16), pooled per ``mode``. Normalises with
    ``mean``/``std`` (the driver's resolved values, see pipeline.plan_stages); None = the tower's own."""

    def __init__(self, tower_cfg, mode: str, max_frames_per_forward: int = 256, mean=None, std=None):
        from ..models.towers import build_vision_tower

        self.tower = build_vision_tower(tower_cfg)
        self.mean = tuple(mean) if mean is not None else self.tower.mean
        self.std = tuple(std) if std is not None else self.tower.std
        self.mode = mode
        self.chunk = max_frames_per_forward

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        rows = batch_rows(batch)
        todo = [i for i, r in enumerate(rows) if r["kind"] == "sample"]
        if todo:
            t0 = time.perf_counter()
            stacks = [np.frombuffer(rows[i]["frames"], np.uint8).reshape(shape_of(rows[i]["frames_shape"])) for i in todo]
            lens = [s.shape[0] for s in stacks]
            x = torch.from_numpy(np.concatenate(stacks))  # (sum T, 3, S, S) uint8
            feats = []
            for s in range(0, x.shape[0], self.chunk):
                px = normalize(x[s:s + self.chunk].to(self.tower.device), self.mean, self.std, self.tower.dtype)
                feats.append(self.tower.features(px))  # (n, 3, S, S) -> (n, 1 + P, D)
            allf = torch.cat(feats)  # (sum T, 1 + P, D)
            dt = (time.perf_counter() - t0) / len(todo)
            for i, f in zip(todo, torch.split(allf, lens)):
                out = valley_pool(f) if self.mode == "valley_pooled" else f  # (P + T, D) or (T, 1 + P, D)
                out = out.to(torch.float16).cpu().contiguous().numpy()
                rows[i].update(features=out.tobytes(), features_shape=",".join(map(str, out.shape)),
                               frames=b"", t_encode=dt)
        return _batch(rows)


# ------------------------------------------------------------------------------------------------ write

META_FIELDS = {"shard": "", "kind": "", "n_ok": 0, "n_err": 0, "expected": -1, "part": "", "errors": "",
               "frames": 0, "bytes_in": 0, "bytes_out": 0, "t_read": 0.0, "t_decode": 0.0, "t_encode": 0.0,
               "ignored": "", "media_counts": ""}


def feature_table(rows: list[dict], mode: str):
    import pyarrow as pa

    return pa.table({
        "uid": [f"{r['shard']}/{r['key']}" for r in rows],  # unique across a feature set
        "key": [r["key"] for r in rows],
        "shard": [r["shard"] for r in rows],
        "media_type": [r["media_type"] for r in rows],
        "caption": [r["caption"] for r in rows],
        "conversations": [r["conversations"] for r in rows],
        "meta": [r["meta"] for r in rows],
        "timestamps": pa.array([[float(t) for t in r["timestamps"].split(",")] if r["timestamps"] else [] for r in rows],
                               pa.list_(pa.float32())),
        "num_frames": pa.array([shape_of(r["frames_shape"])[0] if r["frames_shape"] else len(r["timestamps"].split(","))
                                for r in rows], pa.int32()),
        "n_source_frames": pa.array([r["n_source_frames"] for r in rows], pa.int32()),
        "features": pa.array([r["features"] for r in rows], pa.binary()),
        "shape": pa.array([list(shape_of(r["features_shape"])) for r in rows], pa.list_(pa.int32())),
        "mode": [mode] * len(rows),
    })


class WriteParts:
    """Batch stage: feature rows -> one Parquet part per shard in the batch, error rows -> JSONL.

    Returns only small metadata rows for the driver, which commits shards when complete. Parts are
    invisible to readers until their shard's commit marker lists them.
    """

    def __init__(self, out_uri: str, storage: StorageConfig | None, mode: str):
        self.layout, self.mode = FeatureSetLayout(out_uri, storage), mode

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        import io

        import pyarrow.parquet as pq

        rows = batch_rows(batch)
        by_shard: dict[str, list[dict]] = {}
        metas = []
        for r in rows:
            if r["kind"] == "end":
                metas.append({**META_FIELDS, "shard": r["shard"], "kind": "end", "expected": r["expected"]})
            else:
                by_shard.setdefault(r["shard"], []).append(r)
        for shard, rs in by_shard.items():
            ok = [r for r in rs if r["kind"] == "sample"]
            bad = [r for r in rs if r["kind"] == "error"]
            part_id = uuid.uuid4().hex[:12]
            m = {**META_FIELDS, "shard": shard, "kind": "part", "n_ok": len(ok), "n_err": len(bad)}
            if ok:
                buf = io.BytesIO()
                pq.write_table(feature_table(ok, self.mode), buf, compression="zstd")
                m["part"] = self.layout.part(shard, part_id)
                self.layout.write(m["part"], buf.getvalue())
                m["bytes_out"] = buf.tell()
            if bad:
                lines = "".join(json.dumps({"shard": r["shard"], "key": r["key"], "stage": r["stage"],
                                            "reason": r["error"]}) + "\n" for r in bad)
                m["errors"] = self.layout.error_part(shard, part_id)
                self.layout.write(m["errors"], lines)
            media_counts: dict[str, int] = {}
            for r in ok:
                media_counts[r["media_type"]] = media_counts.get(r["media_type"], 0) + 1
            ign: dict[str, int] = {}
            for r in rs:
                for e in filter(None, r["ignored"].split(",")):
                    ign[e] = ign.get(e, 0) + 1
            m.update(frames=sum(shape_of(r["frames_shape"])[0] if r["frames_shape"] else 0 for r in ok),
                     bytes_in=sum(r["bytes_in"] for r in rs), t_read=sum(r["t_read"] for r in rs),
                     t_decode=sum(r["t_decode"] for r in rs), t_encode=sum(r["t_encode"] for r in rs),
                     ignored=json.dumps(ign), media_counts=json.dumps(media_counts))
            metas.append(m)
        return {k: [m[k] for m in metas] for k in META_FIELDS}
