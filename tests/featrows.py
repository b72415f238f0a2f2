"""Read the rows of a feature set with pyarrow only (no vlp reader): what precompute wrote, per item decoded."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from vlp.formats.featureset import FeatureSetLayout, committed_shards
from vlp.storage import get_fs


def feature_rows(uri: str, storage=None) -> list[dict]:
    """Every committed row; ``blocks`` = the per-item fp16 feature arrays decoded from ``features``/``shape``."""
    layout = FeatureSetLayout(uri, storage)
    rows = []
    for rec in committed_shards(layout).values():
        for part in rec.parts:
            fs, path = get_fs(layout.uri_of(part), storage)
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
            for r in table.to_pylist():
                r["blocks"] = [np.frombuffer(b, np.float16).reshape(s) for b, s in zip(r["features"], r["shape"])]
                rows.append(r)
    return rows


def tokenise(cols: dict[str, list], tokenize) -> list[dict]:
    """Feature-row columns (one list per column, equal lengths) through a ``vlp.train.data.Tokenize`` stage as Ray
    Data's numpy batches hand them (object arrays) -> one dict per tokenised row."""
    n = len(next(iter(cols.values())))
    batch = {}
    for k, v in cols.items():
        batch[k] = np.empty(n, dtype=object)
        batch[k][:] = v
    out = tokenize(batch)
    return [{k: out[k][i] for k in out} for i in range(n)]
