"""Training data: feature-set mixtures, tokenisation with label masks, length-grouped micro-batches.

The Ray Data graph (built on the driver, executed per epoch as workers iterate):

    each feature set x pass k < ceil(weight) --Mixture(weight, seed, epoch, k)--> union --DropSeen (resume)
        --> Tokenize --> split per worker --> local shuffle buffer --> length-grouped windows

``Mixture`` and ``DropSeen`` read the run's ``data_state.json`` at execution time, which rank 0 writes
at the start of every epoch (epoch number + what of it was consumed, restored from the checkpoint: the units,
one mixture pass over one feature-set part, all of whose rows were consumed, and the uids consumed of the
others; :mod:`vlp.train.progress`). Mixture tags each row with its unit (``unit`` column, from the part's path
that ``read_parquet(include_paths=True)`` adds), so a resumed epoch streams exactly the samples not yet
consumed, and a mixture is replayed exactly from (seed, epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Iterator, Optional

import numpy as np

from ..data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX, caption_conversation, encode_conversation
from ..formats.featureset import FeatureSetInfo, part_num_rows, part_uids, read_feature_set
from ..storage import StorageConfig, get_fs, write_atomic
from .progress import done_units, open_uids, split_unit, unit_of

_STATE_CACHE: dict[str, tuple[float, dict]] = {}
_OPEN_CACHE: dict[tuple, set[str]] = {}  # (state path, epoch, open ranges) -> their uids, per process


def read_state(path: str) -> dict:
    """The data state file (cached per process for a second; re-read when a new epoch may have begun), with
    ``_seen`` (a set of ``seen``), ``_done_units`` (the units of ``parts``' ``done``) and ``_open`` (``parts``'
    ``open``: unit -> ranges of row positions) for DropSeen."""
    now = time.time()
    hit = _STATE_CACHE.get(path)
    if hit and now - hit[0] < 1.0:
        return hit[1]
    fs, p = get_fs(path)
    state = {"epoch": 0}
    if fs.exists(p):
        with fs.open(p, "rb") as f:
            state = json.loads(f.read())
    parts = state.get("parts") or {}
    state["_seen"] = set(state.get("seen", []))
    state["_done_units"] = done_units(parts.get("done", {}))
    state["_open"] = parts.get("open", {})
    _STATE_CACHE[path] = (now, state)
    return state


def write_state(path: str, epoch: int, seen: Optional[list[str]] = None, parts: Optional[dict] = None) -> None:
    """Write the data state atomically (readers in Ray Data tasks see the old state or the new one, never a torn
    file) and drop this process's cached copy. ``parts``: :meth:`vlp.train.progress.PartProgress.state`;
    ``seen``: uids consumed (a checkpoint of the format before parts)."""
    state: dict = {"epoch": epoch}
    if seen:
        state["seen"] = list(seen)
    if parts:
        state["parts"] = parts
    write_atomic(path, json.dumps(state))
    _STATE_CACHE.pop(path, None)


def _u01(*parts) -> float:
    h = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def mixture_passes(weight: float) -> int:
    """How many passes over a feature set its weight takes: ceil(weight) (2 -> 2 full passes, 2.5 -> 2 full
    passes and a seeded half in a third, 0.5 -> one seeded half)."""
    return max(1, math.ceil(weight - 1e-9))


def copies_of(weight: float, seed: int, epoch: int, set_name: str, uid: str) -> int:
    """Copies of one sample in an epoch: floor(w), one more with probability frac(w) (a hash of seed, epoch, uid)."""
    whole, frac = int(weight), weight - int(weight)
    return whole + (1 if frac and _u01(seed, epoch, set_name, uid) < frac else 0)


class Mixture:
    """One pass ``copy`` (0-based) over a feature set -> the rows whose copy count (:func:`copies_of`) is larger
    than ``copy``, with uid ``set:uid`` in pass 0 and ``set:uid#k`` in pass k. The data graph unions the
    :func:`mixture_passes` passes, so copy k of a sample streams in pass k, a whole pass away from copy k-1 (not
    next to it, where it would land in the same micro-batch), and the uids stay unique per copy for resume.
    With ``parts`` (the set's part paths as ``read_parquet`` got them, which adds each row's ``path``), each row
    also gets its ``unit`` (:func:`vlp.train.progress.unit_of`: this pass over the row's part) for resume."""

    def __init__(self, set_name: str, weight: float, seed: int, state_path: str, fmt: str, copy: int = 0,
                 parts: Optional[list[str]] = None):
        if not 0 <= copy < mixture_passes(weight):
            raise ValueError(f"pass {copy} of a set with weight {weight} does not exist "
                             f"({mixture_passes(weight)} passes)")
        self.set_name, self.weight, self.seed, self.state_path, self.fmt = set_name, weight, seed, state_path, fmt
        self.copy = copy
        self.part_index = {str(p).lstrip("/"): i for i, p in enumerate(parts)} if parts is not None else None

    def __call__(self, batch: dict) -> dict:
        epoch = read_state(self.state_path)["epoch"]
        base = row_uids(batch)
        idx = [i for i, uid in enumerate(base)
               if copies_of(self.weight, self.seed, epoch, self.set_name, uid) > self.copy]
        suffix = f"#{self.copy}" if self.copy else ""
        out = {k: v[idx] if len(idx) else v[:0] for k, v in batch.items() if k != "path"}
        out["uid"] = np.asarray([f"{self.set_name}:{base[i]}{suffix}" for i in idx], dtype=object)
        out["format"] = np.asarray([self.fmt] * len(idx), dtype=object)
        if self.part_index is not None:
            out["unit"] = np.asarray([unit_of(self.set_name, self.copy, self.part_of(batch["path"][i]))
                                      for i in idx], dtype=object)
        return out

    def part_of(self, path: str) -> int:
        part = self.part_index.get(str(path).lstrip("/"))
        if part is None:
            raise RuntimeError(f"row from {path}, which is not one of {self.set_name}'s parts")
        return part


def row_uids(batch: dict) -> list:
    """A feature-set batch's sample uids: its ``uid`` column, else ``shard/key`` (feature sets before /2)."""
    return list(batch["uid"]) if "uid" in batch else [f"{s}/{k}" for s, k in zip(batch["shard"], batch["key"])]


class TagSet:
    """One feature set's rows -> uid ``set:uid`` and the set's format: Mixture's pass 0 without the sampling.
    The held path (:mod:`vlp.train.held`) tokenises these once; which copies an epoch holds and what resume
    drops are then decided per epoch on the workers."""

    def __init__(self, set_name: str, fmt: str):
        self.set_name, self.fmt = set_name, fmt

    def __call__(self, batch: dict) -> dict:
        base = row_uids(batch)
        out = dict(batch)
        out["uid"] = np.asarray([f"{self.set_name}:{u}" for u in base], dtype=object)
        out["format"] = np.asarray([self.fmt] * len(base), dtype=object)
        return out


def base_uid(uid: str) -> str:
    """``set:uid#k`` -> ``set:uid`` (the sample a copy was made from)."""
    return str(uid).rsplit("#", 1)[0]


class DropSeen:
    """Drops samples already consumed in the current epoch (read from the data state at run time): rows of the
    units done (by their ``unit`` column), the rows consumed of the open units (their positions turned into uids
    through :class:`EpochUnits`: ``sets``, ``parts`` and ``seed`` as the trainer has them; read once per process
    and state) and the uids ``seen`` (a checkpoint of the format before)."""

    def __init__(self, state_path: str, sets: Optional[list] = None, parts: Optional[list[list[str]]] = None,
                 seed: int = 0):
        self.state_path, self.sets, self.parts, self.seed = state_path, sets, parts, seed

    def __call__(self, batch: dict) -> dict:
        st = read_state(self.state_path)
        uids, units = (st["_seen"] | self.open_uids(st)) if st["_open"] else st["_seen"], st["_done_units"]
        if not uids and not units:
            return batch
        unit_col = batch["unit"] if "unit" in batch else [None] * len(batch["uid"])
        keep = np.asarray([u not in uids and p not in units for u, p in zip(batch["uid"], unit_col)], dtype=bool)
        return {k: v[keep] for k, v in batch.items()}

    def open_uids(self, st: dict) -> set[str]:
        key = (self.state_path, st["epoch"], json.dumps(st["_open"], sort_keys=True))
        if key not in _OPEN_CACHE:
            units = EpochUnits(self.sets, self.parts, self.seed, st["epoch"])
            _OPEN_CACHE.clear()  # one state at a time
            _OPEN_CACHE[key] = set().union(*(open_uids(units.uids(u), r) for u, r in st["_open"].items()))
        return _OPEN_CACHE[key]


class EpochUnits:
    """The units of one epoch of a streaming run: how many rows each gives the epoch (what
    :class:`vlp.train.progress.PartProgress` needs to call it done) and which uids (a resume that converts a
    streaming checkpoint to uids). Pass k < floor(weight) of a set holds every row of a part: counted from the
    Parquet footer; the fractional pass holds the rows Mixture's rule keeps: counted on the part's uid column
    (only that column is read). ``sets``: the run's ``data.sets``; ``parts``: their part URIs in the order
    Mixture numbers them."""

    def __init__(self, sets: list, parts: list[list[str]], seed: int, epoch: int):
        self.sets, self.parts, self.seed, self.epoch = sets, parts, seed, epoch
        self.rows: dict[str, int] = {}

    def __call__(self, unit: str) -> int:
        if unit not in self.rows:
            name, copy, part = split_unit(unit)
            s = self.sets[int(name[1:])]
            if copy < int(s.weight):
                self.rows[unit] = part_num_rows(self.parts[int(name[1:])][part], s.storage)
            else:
                self.rows[unit] = len(self.uids(unit))
        return self.rows[unit]

    def uids(self, unit: str) -> list[str]:
        """The uids (``s<i>:<uid>`` or ``s<i>:<uid>#k``) of the rows ``unit`` gives the epoch."""
        name, copy, part = split_unit(unit)
        s = self.sets[int(name[1:])]
        suffix = f"#{copy}" if copy else ""
        return [f"{name}:{u}{suffix}" for u in part_uids(self.parts[int(name[1:])][part], s.storage)
                if copies_of(s.weight, self.seed, self.epoch, name, u) > copy]


class Tokenize:
    """/2 rows (per-item lists) -> input_ids / labels / length; over-long samples truncated at text or marked skipped.

    Each placeholder costs its item's visual tokens (pooler, then connector; summed over items); a text-only row
    costs its text. A row whose placeholders (their modalities, in order) differ from its items is skipped
    ("placeholders do not match the media items"). Truncation never cuts a visual span: text after the last one
    is cut; a sample whose text up to the end of its last visual span exceeds max_length is skipped (counted by
    the trainer).
    """

    def __init__(self, tokenizer_path: str, template: str, max_length: int, overlong: str, model: dict | str):
        """``model``: the run's ModelConfig as a JSON dump (its pooler and connector count the visual tokens;
        validated where the rows are tokenised, which imports its plugins there), or just a pooler type."""
        self.tokenizer_path, self.template, self.max_length = tokenizer_path, template, max_length
        self.overlong = overlong
        self.model = {"pooler": {"type": model}} if isinstance(model, str) else model
        self._tok = self._model_cfg = None

    @property
    def model_cfg(self):
        if self._model_cfg is None:
            from ..config import validate
            from ..models.videollm import ModelConfig

            self._model_cfg = validate(ModelConfig, self.model, "model config of the training rows")
        return self._model_cfg

    @property
    def tok(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            from ..models.presets import resolve_model_path

            self._tok = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        return self._tok

    def visual_counts(self, row: dict) -> list[int]:
        """Visual tokens of each media item of a /2 row (what the pooler, then the connector, make of its features),
        reserved in the sequence before any feature is loaded; [] for a text-only row."""
        from ..models.videollm import visual_token_count  # torch: imported where rows are tokenised

        return [visual_token_count(self.model_cfg, shape, row["mode"], int(nf), str(m))
                for shape, nf, m in zip(row["shape"], row["num_frames"], row["modalities"])]

    def one(self, row: dict) -> tuple[list[int], list[int], int, str]:
        """A /2 row -> (input_ids, labels, length, skip reason or ""). ``length`` counts each placeholder as its
        item's visual tokens: ``len(ids) - k + sum(n_vis)`` for k placeholders."""
        fmt = row["format"]
        modalities = [str(m) for m in row["modalities"]]
        conv = json.loads(row["conversations"]) if row["conversations"] else None
        if fmt == "caption" or (fmt == "auto" and not conv):
            if not row["caption"]:
                return [], [], 0, "no caption"
            conv = caption_conversation(row["caption"], modalities)
        enc = encode_conversation(conv, self.tok, self.template)
        ids, labels = enc.input_ids, enc.labels
        if enc.modalities != modalities:
            return [], [], 0, "placeholders do not match the media items"
        n_vis = self.visual_counts(row)
        k = len(n_vis)
        length = len(ids) - k + sum(n_vis)
        if length > self.max_length:
            # end of the last visual span in the expanded sequence: text after it may be cut, nothing before it
            end_vis = (len(ids) - 1 - ids[::-1].index(VISUAL_TOKEN_INDEX) - (k - 1) + sum(n_vis)) if k else 0
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
        _ = self.model_cfg  # a config that fails here (e.g. a plugin workers cannot import) fails the task
        ids_l, lab_l, lens, skip = [], [], [], []
        for i in range(n):
            row = {k: batch[k][i] for k in ("format", "conversations", "caption", "media_type", "modalities", "shape",
                                             "mode", "num_frames")}
            try:
                ids, labels, length, reason = self.one(row)
            except ValueError as e:
                ids, labels, length, reason = [], [], 0, f"bad conversation: {e}"
            ids_l.append(np.asarray(ids, dtype=np.int64))
            lab_l.append(np.asarray(labels, dtype=np.int64))
            lens.append(length)
            skip.append(reason)
        keep = ("uid", "media_type", "modalities", "features", "shape", "mode", "num_frames")
        out = {k: batch[k] for k in keep}
        if "unit" in batch:  # the streaming path's (Mixture), for resume
            out["unit"] = batch["unit"]
        for name, vals in (("input_ids", ids_l), ("labels", lab_l)):
            arr = np.empty(n, dtype=object)
            arr[:] = vals
            out[name] = arr
        out["length"] = np.asarray(lens, dtype=np.int64)
        out["skip"] = np.asarray(skip, dtype=object)
        return out


def feature_set_info(uri: str, storage: Optional[StorageConfig]) -> FeatureSetInfo:
    """Fingerprint + manifest of a completed feature set (hidden size, mode, samples). FileNotFoundError when
    it is missing or incomplete, FeatureSetFormatError when this vlp does not read its format."""
    return read_feature_set(uri, storage)


def length_grouped(rows: list[dict], micro: int, rng: np.random.Generator, group: bool,
                   by_modality: bool = False) -> list[list[dict]]:
    """Split a window of rows into micro-batches; with ``group`` sort by length first (and by modality before
    length with ``by_modality``, as LLaVA's group_by_modality_length: on ``media_type``, so text-only rows,
    image rows, video rows and mixed rows each sort together) so that padding stays small, then
    shuffle the micro-batch order. Two copies of one sample (uids ``x`` and ``x#1``) that meet in a window sort
    next to each other (same length); they are moved to different micro-batches (:func:`spread_copies`)."""
    if group:
        key = (lambda r: (str(r["media_type"]), r["length"])) if by_modality else (lambda r: r["length"])
        rows = sorted(rows, key=key)
    mbs = [rows[i:i + micro] for i in range(0, len(rows) - micro + 1, micro)]
    spread_copies(mbs)
    order = rng.permutation(len(mbs))
    return [mbs[i] for i in order]


def spread_copies(mbs: list[list[dict]]) -> None:
    """In place: swap a row whose sample already is in its micro-batch with the nearest row (in micro-batch
    order, so of a similar length) of another micro-batch where neither sample is yet. Rows without a ``uid``
    are left alone; a copy stays put only when no swap exists (a window of copies of one sample)."""
    if not mbs or "uid" not in mbs[0][0]:
        return
    bases = [[base_uid(r["uid"]) for r in mb] for mb in mbs]
    for i, mb in enumerate(mbs):
        for j in range(len(mb)):
            b = bases[i][j]
            if bases[i].index(b) == j:
                continue  # the first of its sample in this micro-batch
            partner = _swap_partner(bases, i, b)
            if partner is not None:
                o, q = partner
                mbs[i][j], mbs[o][q] = mbs[o][q], mbs[i][j]
                bases[i][j], bases[o][q] = bases[o][q], b


def _swap_partner(bases: list[list[str]], i: int, b: str) -> Optional[tuple[int, int]]:
    """(micro-batch o, row q) nearest to micro-batch ``i`` whose micro-batch lacks sample ``b`` and whose
    row's sample is not yet in micro-batch ``i``; None when there is none."""
    for dist in range(1, len(bases)):
        for o in (i + dist, i - dist):
            if not 0 <= o < len(bases) or b in bases[o]:
                continue
            for q, ob in enumerate(bases[o]):
                if ob not in bases[i]:
                    return o, q
    return None


def padding_fraction(micro_batches: list[list[dict]]) -> float:
    total = sum(len(mb) * max(r["length"] for r in mb) for mb in micro_batches)
    real = sum(r["length"] for mb in micro_batches for r in mb)
    return 1 - real / total if total else 0.0


def iter_rows(batches: Iterator[dict]) -> Iterator[dict]:
    for b in batches:
        keys = list(b)
        for i in range(len(b[keys[0]])):
            yield {k: b[k][i] for k in keys}
