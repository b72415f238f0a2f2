"""Training data: feature-set mixtures, tokenisation with label masks, length-grouped micro-batches.

The Ray Data graph (built on the driver, executed per epoch as workers iterate):

    each feature set --Mixture(weight, seed, epoch)--> union --DropSeen (resume)--> Tokenize --> split per worker

``Mixture`` and ``DropSeen`` read the run's ``data_state.json`` at execution time, which rank 0 writes
at the start of every epoch (epoch number + samples already trained on in it, restored from the
checkpoint). So a resumed epoch streams exactly the samples not yet seen, and a mixture is replayed
exactly from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Iterator, Optional

import numpy as np

from ..data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX, caption_conversation, tokenize_conversation
from ..precompute.features import get_json
from ..storage import StorageConfig, get_fs

_STATE_CACHE: dict[str, tuple[float, dict]] = {}


def read_state(path: str) -> dict:
    """The data state file (cached per process for a second; re-read when a new epoch may have begun)."""
    now = time.time()
    hit = _STATE_CACHE.get(path)
    if hit and now - hit[0] < 1.0:
        return hit[1]
    fs, p = get_fs(path)
    state = {"epoch": 0, "seen": []}
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            state = json.loads(f.read())
    state["_seen_set"] = set(state.get("seen", []))
    _STATE_CACHE[path] = (now, state)
    return state


def write_state(path: str, epoch: int, seen: list[str]) -> None:
    fs, p = get_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    data = json.dumps({"epoch": epoch, "seen": seen}).encode()
    tmp = p + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, p)
    _STATE_CACHE.pop(path, None)


def _u01(*parts) -> float:
    h = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


class Mixture:
    """Rows of one feature set -> its share of the epoch: floor(w) copies + one more with prob frac(w),
    decided by a hash of (seed, epoch, uid). Copies get uids ``uid#k``."""

    def __init__(self, set_name: str, weight: float, seed: int, state_path: str, fmt: str):
        self.set_name, self.weight, self.seed, self.state_path, self.fmt = set_name, weight, seed, state_path, fmt

    def __call__(self, batch: dict) -> dict:
        epoch = read_state(self.state_path)["epoch"]
        whole, frac = int(self.weight), self.weight - int(self.weight)
        idx, uids = [], []
        base = batch["uid"] if "uid" in batch else [f"{s}/{k}" for s, k in zip(batch["shard"], batch["key"])]
        for i, uid in enumerate(base):
            n = whole + (1 if frac and _u01(self.seed, epoch, self.set_name, uid) < frac else 0)
            for k in range(n):
                idx.append(i)
                uids.append(f"{self.set_name}:{uid}" + (f"#{k}" if k else ""))
        out = {k: v[idx] if len(idx) else v[:0] for k, v in batch.items()}
        out["uid"] = np.asarray(uids, dtype=object)
        out["format"] = np.asarray([self.fmt] * len(idx), dtype=object)
        return out


class DropSeen:
    """Drops samples already trained on in the current epoch (read from the data state at run time)."""

    def __init__(self, state_path: str):
        self.state_path = state_path

    def __call__(self, batch: dict) -> dict:
        seen = read_state(self.state_path)["_seen_set"]
        if not seen:
            return batch
        keep = np.asarray([u not in seen for u in batch["uid"]], dtype=bool)
        return {k: v[keep] for k, v in batch.items()}


def visual_token_count(shape, mode: str, num_frames: int, pooler: str) -> int:
    shape = [int(s) for s in shape]
    if pooler == "valley":
        return shape[0] if mode == "valley_pooled" else (shape[1] - 1) + shape[0]
    if pooler == "patch_mean":
        return shape[0] - num_frames if mode == "valley_pooled" else shape[1] - 1
    return shape[0] * (shape[1] - 1)  # none: T * P


class Tokenize:
    """Rows -> input_ids / labels / length; over-long samples truncated at text or marked skipped.

    Truncation never cuts the visual span: text after it is cut; a sample whose prefix + visual span
    alone exceed max_length is skipped (counted by the trainer).
    """

    def __init__(self, tokenizer_path: str, template: str, max_length: int, overlong: str, pooler: str):
        self.tokenizer_path, self.template, self.max_length = tokenizer_path, template, max_length
        self.overlong, self.pooler = overlong, pooler
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from ..models.presets import resolve_model_path

            self._tok = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        return self._tok

    def one(self, row: dict) -> tuple[list[int], list[int], int, str]:
        fmt = row["format"]
        conv = json.loads(row["conversations"]) if row["conversations"] else None
        if fmt == "caption" or (fmt == "auto" and not conv):
            if not row["caption"]:
                return [], [], 0, "no caption"
            conv = caption_conversation(row["caption"], row["media_type"])
        ids, labels = tokenize_conversation(conv, self.tok, self.template)
        n_vis = visual_token_count(row["shape"], row["mode"], int(row["num_frames"]), self.pooler)
        has_vis = VISUAL_TOKEN_INDEX in ids
        length = len(ids) - (1 if has_vis else 0) + (n_vis if has_vis else 0)
        if length > self.max_length:
            end_vis = (ids.index(VISUAL_TOKEN_INDEX) + n_vis) if has_vis else 0
            if self.overlong == "skip" or end_vis >= self.max_length:
                return [], [], length, "over max_length"
            cut = len(ids) - (length - self.max_length)
            ids, labels = ids[:cut], labels[:cut]
            if all(l == IGNORE_INDEX for l in labels):
                return [], [], length, "over max_length (no answer left after truncation)"
            length = self.max_length
        return ids, labels, length, ""

    def __call__(self, batch: dict) -> dict:
        n = len(batch["uid"])
        ids_l, lab_l, lens, skip = [], [], [], []
        for i in range(n):
            row = {k: batch[k][i] for k in ("format", "conversations", "caption", "media_type", "shape", "mode",
                                             "num_frames")}
            try:
                ids, labels, length, reason = self.one(row)
            except ValueError as e:
                ids, labels, length, reason = [], [], 0, f"bad conversation: {e}"
            ids_l.append(np.asarray(ids, dtype=np.int64))
            lab_l.append(np.asarray(labels, dtype=np.int64))
            lens.append(length)
            skip.append(reason)
        keep = ("uid", "media_type", "features", "shape", "mode", "num_frames")
        out = {k: batch[k] for k in keep}
        for name, vals in (("input_ids", ids_l), ("labels", lab_l)):
            arr = np.empty(n, dtype=object)
            arr[:] = vals
            out[name] = arr
        out["length"] = np.asarray(lens, dtype=np.int64)
        out["skip"] = np.asarray(skip, dtype=object)
        return out


def feature_set_info(uri: str, storage: Optional[StorageConfig]) -> dict:
    fp = get_json(uri, "fingerprint.json", storage)
    man = get_json(uri, "manifest.json", storage)
    if fp is None or man is None:
        raise FileNotFoundError(f"feature set {uri} is missing or incomplete (no manifest.json); run vlp precompute")
    return {"hidden_size": fp["encoder"]["hidden_size"], "mode": fp["mode"], "samples": man["totals"]["samples_ok"],
            "fingerprint": fp}


def length_grouped(rows: list[dict], micro: int, rng: np.random.Generator, group: bool,
                   by_modality: bool = False) -> list[list[dict]]:
    """Split a window of rows into micro-batches; with ``group`` sort by length first (and by modality before
    length with ``by_modality``, as LLaVA's group_by_modality_length) so that padding stays small, then
    shuffle the micro-batch order."""
    if group:
        key = (lambda r: (r["media_type"], r["length"])) if by_modality else (lambda r: r["length"])
        rows = sorted(rows, key=key)
    mbs = [rows[i:i + micro] for i in range(0, len(rows) - micro + 1, micro)]
    order = rng.permutation(len(mbs))
    return [mbs[i] for i in order]


def padding_fraction(micro_batches: list[list[dict]]) -> float:
    total = sum(len(mb) * max(r["length"] for r in mb) for mb in micro_batches)
    real = sum(r["length"] for mb in micro_batches for r in mb)
    return 1 - real / total if total else 0.0


def iter_rows(batches: Iterator[dict]) -> Iterator[dict]:
    for b in batches:
        keys = list(b)
        for i in range(len(b[keys[0]])):
            yield {k: b[k][i] for k in keys}
