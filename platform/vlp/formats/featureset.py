"""The feature-set format: committed shards, manifest, and readers.

Layout under the output URI::

    fingerprint.json        what the features depend on (encoder, weights hash, layer, mode, sampling...)
    config.yaml             the resolved config of the latest run
    parts/<shard>/<id>.parquet   feature rows (invisible until committed)
    errors/<shard>/<id>.jsonl    error records (idem)
    shards/<shard>.json     commit marker of one input shard: its parts, errors and counts
    manifest.json           written at the end of a run: inputs, per-shard counts, encoder, config, version
    errors.jsonl            every error record of the committed shards
    summary.json            throughput and timings of the latest run

A reader trusts only ``shards/*.json``: a run killed at any moment leaves parts that no marker lists,
and the next run deletes and redoes those shards.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

import numpy as np

from ..storage import StorageConfig, get_fs, join


def put_json(uri: str, rel: str, obj: Any, storage: StorageConfig | None = None) -> None:
    """Write JSON atomically: temp file + rename locally, a single PUT on object stores."""
    put_bytes(uri, rel, json.dumps(obj, indent=2).encode(), storage)


def put_bytes(uri: str, rel: str, data: bytes, storage: StorageConfig | None = None) -> None:
    fs, root = get_fs(uri, storage)
    path = join(root, rel)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if "://" in uri:
        with fs.open(path, "wb") as f:
            f.write(data)
    else:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def get_json(uri: str, rel: str, storage: StorageConfig | None = None) -> Optional[Any]:
    fs, root = get_fs(uri, storage)
    path = join(root, rel)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def committed_shards(uri: str, storage: StorageConfig | None = None) -> dict[str, dict]:
    """{shard name: commit record} of every shard whose marker exists."""
    fs, root = get_fs(uri, storage)
    d = join(root, "shards")
    if not fs.exists(d):
        return {}
    out = {}
    for p in sorted(fs.ls(d, detail=False)):
        if p.endswith(".json"):
            with fs.open(p, "rb") as f:
                rec = json.loads(f.read())
            out[rec["shard"]] = rec
    return out


def feature_parts(uri: str, storage: StorageConfig | None = None) -> list[str]:
    """Full URIs of every committed Parquet part."""
    parts = []
    for rec in committed_shards(uri, storage).values():
        parts += [join(uri, p) for p in rec["parts"]]
    return parts


def decode_features(features: bytes, shape) -> np.ndarray:
    """Stored fp16 bytes -> array of ``shape``: (P + T, D) for valley_pooled, (T, 1 + P, D) for frames."""
    return np.frombuffer(features, dtype=np.float16).reshape(tuple(int(s) for s in shape))


def iter_feature_rows(uri: str, storage: StorageConfig | None = None) -> Iterator[dict]:
    """Plain-Python reader (no Ray): every committed row with ``features`` decoded."""
    import pyarrow.parquet as pq

    for part in feature_parts(uri, storage):
        fs, path = get_fs(part, storage)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for r in table.to_pylist():
            r["features"] = decode_features(r["features"], r["shape"])
            yield r


def _decode_batch(batch: dict) -> dict:
    feats = [decode_features(f, s) for f, s in zip(batch["features"], batch["shape"])]
    arr = np.empty(len(feats), dtype=object)
    arr[:] = feats
    batch["features"] = arr
    return batch


def open_feature_dataset(uri: str, storage: StorageConfig | None = None, decode: bool = True):
    """A Ray Dataset over the committed rows of a feature set (what training streams).

    Columns: uid (``shard/key``, unique), key, shard, media_type, caption, conversations (JSON), meta (JSON), timestamps, num_frames,
    n_source_frames, features (float16 array when ``decode``), shape, mode.
    """
    import pyarrow.fs as pafs
    import ray

    manifest = get_json(uri, "manifest.json", storage)
    parts = feature_parts(uri, storage)
    if not parts:
        state = "has no manifest (never completed)" if manifest is None else "holds no committed features"
        raise FileNotFoundError(f"feature set {uri} {state}")
    fs, _ = get_fs(uri, storage)
    filesystem = None if "://" not in uri else pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    paths = [get_fs(p, storage)[1] for p in parts]
    ds = ray.data.read_parquet(paths, filesystem=filesystem)
    if decode:
        ds = ds.map_batches(_decode_batch, batch_format="numpy", batch_size=64)
    return ds
