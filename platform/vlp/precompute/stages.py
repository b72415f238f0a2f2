"""The precompute stages: plain functions / callable classes over rows and batches, testable without Ray.

Row kinds flowing through the graph (one schema for all, so Arrow blocks stay uniform):
  ``sample``  a usable sample (0..N media items; none = text-only); gains ``frames`` after decode and
              ``features`` after encode
  ``error``   a sample (or a whole shard) that cannot be used; carries ``stage`` and ``error``
  ``end``     one per shard, last out of the reader, with ``expected`` = rows the shard produced;
              the driver commits a shard once it has seen that many sample+error rows for it.

Per-item fields (:data:`ITEM_FIELDS`) are lists with one entry per media item, in placeholder order
(``vlp.data.sample``); the decode and encode stages return Arrow tables of :func:`row_schema`, so a batch of
text-only rows (empty lists) has the same column types as any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

from ..data.audio import AudioFeaturizer
from ..data.media import DecodeConfig, DecoderUnavailable, MediaError, SamplingConfig, decode_media, decoder_chain
from ..data.preprocess import normalize, resize_crop
from ..data.sample import SampleConfig, parse_sample
from ..data.tario import TarProblem, iter_tar_samples
from ..formats.featureset import FeatureSetLayout
from ..models.poolers.valley import valley_pool  # output.mode=valley_pooled is the Valley pooler's own pooling
from ..storage import StorageConfig, describe_storage_error, get_fs

if TYPE_CHECKING:
    import torch

ROW_FIELDS: dict[str, Any] = {
    "shard": "", "key": "", "kind": "", "caption": "", "conversations": "", "meta": "", "error": "", "stage": "",
    "expected": -1, "bytes_in": 0, "ignored": "", "media_type": "", "t_read": 0.0, "t_decode": 0.0, "t_encode": 0.0,
}
# per item (lists): media bytes, container ext, member name / reference, modality, reference ("" for a member),
# then what decode adds (uint8 frames, "T,3,S,S", "t0,t1,...", source frame count, decoder, why a GPU decode fell
# back to CPU) and encode adds
ITEM_FIELDS: dict[str, str] = {
    "media": "binary", "media_ext": "string", "item_names": "string", "modalities": "string", "item_refs": "string",
    "frames": "binary", "frames_shape": "string", "timestamps": "string", "n_source_frames": "int64",
    "decoder": "string", "fallback": "string", "features": "binary", "features_shape": "string",
}
ALL_FIELDS = [*ROW_FIELDS, *ITEM_FIELDS]


def make_row(**kw) -> dict:
    row = {**ROW_FIELDS, **{k: [] for k in ITEM_FIELDS}}
    unknown = set(kw) - set(row)
    if unknown:
        raise KeyError(f"unknown row fields {unknown}")
    row.update(kw)
    return row


def media_type_of(modalities: list[str]) -> str:
    """The row's ``media_type``: the one modality of all its items, ``text`` for none, ``mixed`` otherwise."""
    kinds = set(modalities)
    return "text" if not kinds else kinds.pop() if len(kinds) == 1 else "mixed"


# ------------------------------------------------------------------------------------------------ read

def sample_fields(sample) -> dict[str, Any]:
    """A :class:`vlp.data.sample.Sample` -> the read stage's row fields (conversations as resolved)."""
    items = sample.items
    return {
        "caption": sample.caption, "conversations": json.dumps(sample.conversations) if sample.conversations else "",
        "meta": json.dumps(sample.meta) if sample.meta else "", "media_type": media_type_of(sample.modalities),
        "media": [it.data if it.data is not None else b"" for it in items], "media_ext": [it.ext for it in items],
        "item_names": [it.name for it in items], "modalities": list(sample.modalities),
        "item_refs": [it.ref or "" for it in items],
    }


class ReadShard:
    """shard item -> rows (flat_map). Never raises for bad data: it becomes error rows."""

    def __init__(self, storage: StorageConfig | None = None, sample: SampleConfig | None = None):
        self.storage, self.sample = storage, sample or SampleConfig()

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
            for item_ in iter_tar_samples(f, max_sample_bytes=self.sample.max_sample_bytes):
                n += 1
                dt = time.perf_counter() - t0
                if isinstance(item_, TarProblem):
                    yield make_row(shard=shard, key=item_.key, kind="error", stage="read", error=item_.reason, t_read=dt)
                else:
                    yield self.row(shard, item_, dt)
                t0 = time.perf_counter()
        yield make_row(shard=shard, key="<end>", kind="end", expected=n)

    def row(self, shard: str, raw, dt: float) -> dict:
        """One raw sample -> its ``sample`` row, or a ``stage: read`` error row (its key names the sample)."""
        try:
            sample = parse_sample(raw, self.sample)
        except Exception as e:  # ValueError(reason) by design; anything else is still bad data
            reason = str(e) if isinstance(e, ValueError) else f"cannot parse sample: {type(e).__name__}: {e}"
            return make_row(shard=shard, key=raw.key, kind="error", stage="read", error=reason, bytes_in=raw.size,
                            ignored=",".join(raw.ignored), t_read=dt)
        ignored = [*raw.ignored, *(x for x in sample.ignored if x not in raw.ignored)]
        return make_row(shard=shard, key=raw.key, kind="sample", bytes_in=raw.size, ignored=",".join(ignored),
                        t_read=dt, **sample_fields(sample))


# ------------------------------------------------------------------------------------------------ batches

def batch_rows(batch) -> list[dict]:
    """A batch of the stages (an Arrow table, or column -> numpy array) -> one plain-Python dict per row."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):  # a list column (Arrow list<...> -> numpy)
        return [_py(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    return v


def row_schema():
    import pyarrow as pa

    scalar = {str: pa.string(), int: pa.int64(), float: pa.float64()}
    items = {"binary": pa.binary(), "string": pa.string(), "int64": pa.int64()}
    return pa.schema([*((k, scalar[type(v)]) for k, v in ROW_FIELDS.items()),
                      *((k, pa.list_(items[t])) for k, t in ITEM_FIELDS.items())])


def rows_batch(rows: list[dict]):
    """Rows -> an Arrow table of :func:`row_schema` (what the decode and encode stages return)."""
    import pyarrow as pa

    return pa.Table.from_pylist([{k: r[k] for k in ALL_FIELDS} for r in rows], schema=row_schema())


# ------------------------------------------------------------------------------------------------ decode

@dataclass
class DecodedItem:
    """One decoded item: ``array`` (T, 3, S, S) uint8 frames, or (n, F, M) float32 fbank segments for audio. Frames
    decoded on a GPU stay a torch tensor there (:meth:`DecodeFrames.decode_arrays`); numpy otherwise."""

    array: Any
    modality: str  # as decoded (a one-frame "mp4" is an image)
    timestamps: list[float]  # frame times, or segment starts, in seconds
    n_source: int  # frames in the source, or audio samples decoded
    decoder: str
    fallback: str = ""  # why the GPU decoder did not decode it ("" when it did, or on CPU)


def host_array(a) -> np.ndarray:
    """A decoded array as numpy: a GPU tensor is copied to the host (what a Ray Data block must hold)."""
    return a if isinstance(a, np.ndarray) else a.cpu().numpy()


def retag(r: dict, decoded: list[str]) -> dict:
    """The decoded media types win over the container's name (a one-frame "mp4" is an image, an mp4 named "jpg" a
    video): -> ``media_type`` and, when the row has a conversation, it with each item's placeholder renamed (the
    conversation holds one placeholder per item, in item order)."""
    out: dict[str, Any] = {"media_type": media_type_of(decoded)}
    if decoded == list(r["modalities"]) or not r["conversations"]:
        return out
    from ..data.conversation import PLACEHOLDER_RE

    names = iter(decoded)
    conv = json.loads(r["conversations"])
    for t in conv:
        t["value"] = PLACEHOLDER_RE.sub(lambda _: f"<{next(names)}>", t["value"])
    return {**out, "conversations": json.dumps(conv)}


class DecodeFrames:
    """Batch stage: each item's media bytes -> sampled, resized, centre-cropped uint8 frames (T, 3, S, S); an audio
    item's -> float32 fbank segments (n, frames, mel_bins) through ``audio`` (None: audio items are errors)."""

    def __init__(self, sampling: SamplingConfig, decode: DecodeConfig, size: int, pad_to_square: bool = False,
                 mean=(0.48145466, 0.4578275, 0.40821073), audio: Optional[AudioFeaturizer] = None,
                 no_audio: str = "an audio item, but no audio tower is set (encoder.audio_tower)"):
        self.sampling, self.decode, self.size, self.pad, self.mean = sampling, decode, size, pad_to_square, mean
        self.audio, self.no_audio = audio, no_audio  # no_audio: the reason an audio item gets without ``audio``
        # resolved here (the driver) and pickled with the stage: a worker imports the backend classes by reference,
        # so a backend registered by a module the driver imported works in every worker
        self.chain = decoder_chain(decode)

    def decode_item(self, data: bytes, ext: str, ref: str, modality: str = "") -> DecodedItem:
        """One item -> its decoded arrays and how they were made. Raises MediaError for bad media."""
        if ref:
            raise MediaError("media references are not supported yet")
        if modality == "audio":
            if self.audio is None:
                raise MediaError(self.no_audio)
            a = self.audio(data)
            return DecodedItem(a.fbank, "audio", a.starts, a.n_samples, "pyav-audio")  # (n, F, M) float32
        mtype, dec = decode_media(data, ext, self.sampling, self.decode, self.chain)
        frames = resize_crop(dec.frames, self.size, self.pad, self.mean)  # (T, 3, S, S) uint8 where decoded
        frames = frames.numpy() if frames.device.type == "cpu" else frames
        return DecodedItem(frames, mtype, list(dec.timestamps), dec.n_source_frames, dec.decoder, dec.fallback)

    def decode_one(self, i: int, data: bytes, ext: str, name: str, ref: str, mod: str) -> DecodedItem | str:
        """Item ``i`` decoded, or the reason it cannot be (the row's error)."""
        try:
            return self.decode_item(data, ext, ref, mod)
        except MediaError as e:
            return f"item {i} ({name}): {e}"
        except DecoderUnavailable:
            raise  # a config problem (decoder not installed, no GPU), not bad data: the job must stop
        except Exception as e:
            # a decoder bug on one odd file must not kill the whole job: record it like any decode failure
            first = str(e).splitlines()[0][:300] if str(e) else ""
            return f"item {i} ({name}): unexpected decode failure: {type(e).__name__}: {first}"

    def decode_arrays(self, r: dict) -> tuple[dict, list]:
        """(the row with every per-item field decode adds except ``frames``, the decoded arrays in item order). A
        row with an item that cannot be decoded becomes an error row (no arrays); ``media`` is dropped."""
        if r["kind"] != "sample" or not r["media"]:
            return {**r, "media": []}, []
        t0 = time.perf_counter()
        items = []
        for i, item in enumerate(zip(r["media"], r["media_ext"], r["item_names"], r["item_refs"], r["modalities"])):
            d = self.decode_one(i, *item)
            if isinstance(d, str):
                return {**r, "kind": "error", "stage": "decode", "error": d, "media": [],
                        "t_decode": time.perf_counter() - t0}, []
            items.append(d)
        out = {"frames_shape": [",".join(map(str, d.array.shape)) for d in items],
               "timestamps": [",".join(f"{t:.4f}" for t in d.timestamps) for d in items],
               "n_source_frames": [d.n_source for d in items], "decoder": [d.decoder for d in items],
               "fallback": [d.fallback for d in items], "modalities": [d.modality for d in items]}
        return {**r, **retag(r, out["modalities"]), **out, "media": [], "t_decode": time.perf_counter() - t0}, \
            [d.array for d in items]

    def decode_row(self, r: dict) -> dict:
        """:meth:`decode_arrays` with the arrays as bytes in ``frames`` (copied to the host when decoded on a GPU):
        what a decode task hands to the encoder through Ray's object store."""
        row, arrays = self.decode_arrays(r)
        return {**row, "frames": [host_array(a).tobytes() for a in arrays]} if arrays else row

    def __call__(self, batch):
        return rows_batch([self.decode_row(r) for r in batch_rows(batch)])


# ------------------------------------------------------------------------------------------------ encode

def shape_of(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",")) if s else ()


class EncodeFeatures:
    """Actor stage: uint8 frames -> frozen-tower features (fp16), pooled per ``mode`` and item (mode ``pixels``: the
    uint8 frames themselves, no vision tower built); audio items' fbank segments -> the audio tower's features
    (fp16, (n, tokens, D_a), never pooled). Normalises frames with ``mean``/``std`` (the driver's resolved values,
    see pipeline.plan_stages); None = the tower's own."""

    def __init__(self, tower_cfg, mode: str, max_frames_per_forward: int = 256, mean=None, std=None,
                 audio_tower_cfg=None, max_segments_per_forward: int = 32):
        from ..models.audio_towers import build_audio_tower
        from ..models.towers import build_vision_tower

        self.tower = build_vision_tower(tower_cfg) if mode != "pixels" else None
        self.audio = build_audio_tower(audio_tower_cfg) if audio_tower_cfg is not None else None
        self.mean = tuple(mean) if mean is not None else self.tower.mean if self.tower else None
        self.std = tuple(std) if std is not None else self.tower.std if self.tower else None
        self.mode = mode
        self.chunk, self.audio_chunk = max_frames_per_forward, max_segments_per_forward

    def encode(self, stacks: list[np.ndarray]) -> list[np.ndarray]:
        """Per item (T_j, 3, S, S) uint8 -> per item fp16 (P + T_j, D) valley_pooled or (T_j, 1 + P, D) frames, or
        the uint8 (T_j, 3, S, S) frames unchanged (pixels)."""
        import torch

        if not stacks or self.mode == "pixels":
            return [np.ascontiguousarray(s) for s in stacks]
        lens = [s.shape[0] for s in stacks]
        x = frames_on(stacks)  # (sum T_j, 3, S, S) uint8
        feats = []
        for s in range(0, x.shape[0], self.chunk):
            px = normalize(x[s:s + self.chunk].to(self.tower.device), self.mean, self.std, self.tower.dtype)
            feats.append(self.tower.features(px))  # (n, 3, S, S) -> (n, 1 + P, D)
        allf = torch.cat(feats)  # (sum T_j, 1 + P, D)
        out = []
        for f in torch.split(allf, lens):  # (T_j, 1 + P, D)
            f = valley_pool(f) if self.mode == "valley_pooled" else f  # (P + T_j, D) or (T_j, 1 + P, D)
            out.append(f.to(torch.float16).cpu().contiguous().numpy())
        return out

    def encode_audio(self, stacks: list[np.ndarray]) -> list[np.ndarray]:
        """Per item (n_j, F, M) float32 fbank -> per item fp16 (n_j, tokens, D_a)."""
        import torch

        if not stacks:
            return []
        if self.audio is None:
            raise RuntimeError("audio items reached the encoder without an audio tower")
        x = torch.from_numpy(np.concatenate(stacks))  # (sum n_j, F, M)
        step = self.audio_chunk
        allf = torch.cat([self.audio.features(x[s:s + step]) for s in range(0, x.shape[0], step)])  # (sum n_j, N, D_a)
        return [f.to(torch.float16).cpu().contiguous().numpy() for f in torch.split(allf, [s.shape[0] for s in stacks])]

    def encode_rows(self, rows: list[dict], arrays: list[list]) -> list[dict]:
        """Sample rows and their items' decoded arrays (``arrays[i][j]``: row i, item j; frames may be GPU tensors)
        -> the rows with ``features`` and ``features_shape``, ``frames`` emptied. Items are encoded together,
        vision and audio apart."""
        todo = [i for i, r in enumerate(rows) if r["kind"] == "sample"]
        items = [(i, j) for i in todo for j in range(len(arrays[i]))]
        if not items:
            return rows
        t0 = time.perf_counter()
        feats = {}
        for audio, fn in ((False, self.encode), (True, self.encode_audio)):
            mine = [(i, j) for i, j in items if (rows[i]["modalities"][j] == "audio") == audio]
            feats.update(zip(mine, fn([arrays[i][j] for i, j in mine])))
        dt = (time.perf_counter() - t0) / len(todo)
        for i in todo:
            out = [feats[(i, j)] for j in range(len(arrays[i]))]
            rows[i].update(features=[f.tobytes() for f in out], features_shape=[",".join(map(str, f.shape))
                                                                                 for f in out], frames=[], t_encode=dt)
        return rows

    def encode_decoded(self, rows: list[dict]) -> list[dict]:
        """Rows as the decode stage returns them (``frames`` as bytes) -> :meth:`encode_rows`' rows."""
        arrays = [[np.frombuffer(b, np.float32 if m == "audio" else np.uint8).reshape(shape_of(s))
                   for b, s, m in zip(r["frames"], r["frames_shape"], r["modalities"])] if r["kind"] == "sample"
                  else [] for r in rows]
        return self.encode_rows(rows, arrays)

    def __call__(self, batch):
        return rows_batch(self.encode_decoded(batch_rows(batch)))


def frames_on(stacks: list) -> torch.Tensor:
    """Per item (T_j, 3, S, S) uint8 frames -> one (sum T_j, 3, S, S) tensor: on the host when all are numpy (the
    encoder moves it chunk by chunk), else on the device of the tensors a GPU decoded (numpy items, clips that fell
    back to CPU decoding, are copied up): frames decoded on the encoder's GPU never touch the host."""
    import torch

    gpu = [s for s in stacks if not isinstance(s, np.ndarray)]
    if not gpu:
        return torch.from_numpy(np.concatenate(stacks))  # one host copy, as before
    return torch.cat([torch.from_numpy(np.array(s)).to(gpu[0].device) if isinstance(s, np.ndarray) else s
                      for s in stacks])


class DecodeActor:
    """Actor wrapper of a :class:`DecodeFrames` stage (``data.decode_placement: actors``): a decoder that keeps its
    GPU context between batches. Frames leave it as host bytes, like a decode task's."""

    def __init__(self, stage: DecodeFrames):
        self.stage = stage

    def __call__(self, batch):
        return self.stage(batch)


class DecodeEncode:
    """Actor stage for ``data.decode_placement: encoder``: decode on the encoder actor's own GPU, then encode, in one
    process. Frames decoded there (``data.decode.device: cuda``) are resized on the GPU and go to the tower as
    the same CUDA tensors: no host copy and no trip through Ray's object store; a clip that fell back to CPU
    decoding is copied up once, as any CPU-decoded frames are."""

    def __init__(self, decode: DecodeFrames, **encode_kwargs):
        self.decode = decode
        self.encoder = EncodeFeatures(**encode_kwargs)

    def __call__(self, batch):
        decoded = [self.decode.decode_arrays(r) for r in batch_rows(batch)]
        rows = self.encoder.encode_rows([r for r, _ in decoded], [a for _, a in decoded])
        return rows_batch(rows)

# ------------------------------------------------------------------------------------------------ write

META_FIELDS = {"shard": "", "kind": "", "n_ok": 0, "n_err": 0, "expected": -1, "part": "", "errors": "",
               "frames": 0, "bytes_in": 0, "bytes_out": 0, "t_read": 0.0, "t_decode": 0.0, "t_encode": 0.0,
               "ignored": "", "media_counts": "", "item_counts": "", "decoders": "", "fallbacks": ""}


def _floats(s: str) -> list[float]:
    return [float(t) for t in s.split(",")] if s else []


def feature_table(rows: list[dict], mode: str):
    """Encoded sample rows -> the Parquet table of format ``vlp-features/2`` (per-item columns are lists, one
    entry per media item in placeholder order; all empty for a text-only sample)."""
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    return pa.table({
        "uid": [f"{r['shard']}/{r['key']}" for r in rows],  # unique across a feature set
        "key": [r["key"] for r in rows],
        "shard": [r["shard"] for r in rows],
        "media_type": [r["media_type"] for r in rows],
        "modalities": pa.array([list(r["modalities"]) for r in rows], pa.list_(pa.string())),
        "items": pa.array([list(r["item_names"]) for r in rows], pa.list_(pa.string())),
        "caption": [r["caption"] for r in rows],
        "conversations": [r["conversations"] for r in rows],
        "meta": [r["meta"] for r in rows],
        "timestamps": pa.array([[_floats(t) for t in r["timestamps"]] for r in rows], pa.list_(pa.list_(pa.float32()))),
        "num_frames": pa.array([[shape_of(s)[0] for s in r["frames_shape"]] for r in rows], ints),
        "n_source_frames": pa.array([list(r["n_source_frames"]) for r in rows], ints),
        "features": pa.array([list(r["features"]) for r in rows], pa.list_(pa.binary())),
        "shape": pa.array([[list(shape_of(s)) for s in r["features_shape"]] for r in rows], pa.list_(ints)),
        "mode": pa.array([mode] * len(rows), pa.string()),
    })


def shard_counts(ok: list[dict], rs: list[dict]) -> dict:
    """The counting part of one shard's metadata row: samples by media_type (``text`` included), items by modality,
    frames summed over items, bytes, stage times, ignored members, items per decoder and GPU-to-CPU fallbacks per
    reason (JSON dicts where they are maps)."""
    media: dict[str, int] = {}
    items: dict[str, int] = {}
    for r in ok:
        media[r["media_type"]] = media.get(r["media_type"], 0) + 1
        for m in r["modalities"]:
            items[m] = items.get(m, 0) + 1
    ign: dict[str, int] = {}
    for r in rs:
        for e in filter(None, r["ignored"].split(",")):
            ign[e] = ign.get(e, 0) + 1
    decoders: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for r in ok:
        for d, f in zip(r["decoder"], r["fallback"]):
            decoders[d] = decoders.get(d, 0) + 1
            if f:
                fallbacks[f] = fallbacks.get(f, 0) + 1
    return dict(frames=sum(shape_of(s)[0] for r in ok for s, m in zip(r["frames_shape"], r["modalities"])
                           if m != "audio"),  # video/image frames; audio segments are not frames
                bytes_in=sum(r["bytes_in"] for r in rs), t_read=sum(r["t_read"] for r in rs),
                t_decode=sum(r["t_decode"] for r in rs), t_encode=sum(r["t_encode"] for r in rs),
                ignored=json.dumps(ign), media_counts=json.dumps(media), item_counts=json.dumps(items),
                decoders=json.dumps(decoders), fallbacks=json.dumps(fallbacks))


class WriteParts:
    """Batch stage: feature rows -> one Parquet part per shard in the batch, error rows -> JSONL.

    Returns only small metadata rows for the driver, which commits shards when complete. Parts are
    invisible to readers until their shard's commit marker lists them.
    """

    def __init__(self, out_uri: str, storage: StorageConfig | None, mode: str):
        self.layout, self.mode = FeatureSetLayout(out_uri, storage), mode

    def __call__(self, batch) -> dict[str, list]:
        metas = self.write_rows(batch_rows(batch))
        return {k: [m[k] for m in metas] for k in META_FIELDS}

    def write_rows(self, rows: list[dict]) -> list[dict]:
        """Encoded rows -> their parts and error records written; -> one metadata dict per part and per ``end``."""
        import io
        import uuid

        import pyarrow.parquet as pq

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
            m.update(shard_counts(ok, rs))
            metas.append(m)
        return metas
