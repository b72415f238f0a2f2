"""Media sniffing, video/image decoding and frame sampling.

All functions are plain and Ray-free. Decoders return ``(frames, timestamps, n_source_frames)`` where
``frames`` is uint8 ``(T, H, W, 3)`` RGB and timestamps are seconds from the clip start. Video decoders are
registered by name in :data:`VIDEO_DECODERS` (``data.decode.backend``): PyAV and decord here, torchcodec (CPU or
NVDEC) in :mod:`vlp.data.nvdec`; :func:`decoder_chain` says which run, in which order, on which device.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import numpy as np
from pydantic import Field, field_validator, model_validator

from ..config import Cfg
from ..errors import UserError
from ..registry import Registry

VIDEO_EXTS = ("mp4", "webm", "avi", "mkv", "mov", "m4v", "mpeg", "mpg", "gif")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
AUDIO_EXTS = ("wav", "flac", "mp3", "m4a", "aac", "ogg", "opus")  # decoded by vlp.data.audio


class SamplingConfig(Cfg):
    """How frames are picked from a clip. Images always give one frame."""

    mode: Literal["uniform", "fps"] = Field("uniform", description="uniform: num_frames spread over the clip; "
                                            "fps: one frame every 1/fps seconds, at most max_frames")
    num_frames: int = Field(8, ge=1, le=512, description="T for uniform mode (Valley uses 8)")
    fps: float = Field(1.0, gt=0, description="target frame rate for fps mode")
    max_frames: int = Field(32, ge=1, le=512, description="cap on frames in fps mode (uniformly thinned)")


class DecodeConfig(Cfg):
    """Which decoder runs, where."""

    backend: str = Field(
        "auto", description="video decoder, a name in vlp.data.media.VIDEO_DECODERS (pyav, decord, torchcodec) or "
        "auto: on cpu PyAV first (selective decode), decord for what it refuses; on cuda torchcodec (NVDEC)")
    device: Literal["cpu", "cuda"] = Field(
        "cpu", description="where video is decoded; cuda: the GPU's NVDEC through torchcodec (pip install "
        "'vlp[gpu]') or a CUDA build of decord, and the precompute decode stage asks Ray for GPUs "
        "(data.decode_gpus, data.decode_placement)")
    cpu_fallback: bool = Field(True, description="device=cuda: a clip the GPU decoder refuses (a codec NVDEC "
                               "lacks, ...) is decoded on CPU (PyAV, then decord) and counted in summary.json "
                               "(this_run.decode_fallbacks); false: it becomes an error record")
    threads: int = Field(1, ge=0, le=64, description="decoder threads per task (0 = library default)")
    selective: bool = Field(True, description="PyAV: skip decoding frames that are neither sampled nor "
                            "referenced (same pixels; ~30% less decode CPU on libx264 clips with B-frames); needs threads=1")
    max_pixels: int = Field(4096 * 4096, ge=1, description="refuse frames larger than this (decompression bombs)")
    max_aspect_ratio: float = Field(20.0, ge=1, description="refuse frames longer than this many times their width")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        return v if v == "auto" else VIDEO_DECODERS.validate(v)

    @model_validator(mode="after")
    def _backend_decodes_on_device(self):
        if self.backend != "auto" and self.device not in VIDEO_DECODERS.get(self.backend).devices:
            able = [n for n in VIDEO_DECODERS.names() if self.device in VIDEO_DECODERS.get(n).devices]
            raise ValueError(f"device={self.device} needs a backend that decodes there (auto, {', '.join(able)}); "
                             f"{self.backend} decodes on {', '.join(VIDEO_DECODERS.get(self.backend).devices)} only")
        return self


class MediaError(Exception):
    """A sample's media cannot be used; ``str(e)`` is the recorded reason."""


class DecoderUnavailable(UserError, RuntimeError):
    """The configured decoder cannot run in this process at all (its package is not installed, no GPU is visible):
    a config problem, not bad data, so the job stops instead of turning every sample into an error record."""


MediaKind = Literal["video", "image", "unknown"]


def sniff(data: bytes) -> tuple[MediaKind, str]:
    """Container type from magic bytes, whatever the file is called."""
    h = data[:16]
    if h.startswith(b"\xff\xd8\xff"):
        return "image", "jpeg"
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if h[:4] == b"RIFF" and h[8:12] == b"WEBP":
        return "image", "webp"
    if h.startswith(b"BM"):
        return "image", "bmp"
    if h.startswith((b"GIF87a", b"GIF89a")):
        return "video", "gif"
    if h[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "video", "mp4"
    if h.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "matroska"
    if h[:4] == b"RIFF" and h[8:12] == b"AVI ":
        return "video", "avi"
    if h.startswith(b"FLV"):
        return "video", "flv"
    if h[:1] == b"\x47" and len(data) > 188 and data[188:189] == b"\x47":
        return "video", "mpegts"
    return "unknown", "unknown"


# ---------------------------------------------------------------------------------------------- sampling

def sample_indices(n_frames: int, cfg: SamplingConfig, timestamps: Optional[np.ndarray] = None,
                   avg_fps: Optional[float] = None) -> np.ndarray:
    """Frame indices to keep.

    uniform: the centres of T equal segments (repeats when the clip has fewer than T frames, so every
    video yields exactly T frames). fps: nearest frame to each multiple of 1/fps seconds, using real
    timestamps when given (variable frame rate), capped to max_frames by uniform thinning.
    """
    if n_frames <= 0:
        raise MediaError("clip has no frames")
    if cfg.mode == "uniform":
        t = cfg.num_frames
        idx = np.floor((np.arange(t) + 0.5) * n_frames / t).astype(np.int64)
        return np.clip(idx, 0, n_frames - 1)
    if timestamps is None:
        rate = avg_fps if avg_fps and avg_fps > 0 else 25.0
        timestamps = np.arange(n_frames) / rate
    timestamps = np.asarray(timestamps, dtype=np.float64)
    duration = float(timestamps[-1]) + 1e-9
    targets = np.arange(0.0, duration + 1e-9, 1.0 / cfg.fps)
    if len(targets) == 0:
        targets = np.zeros(1)
    if len(targets) > cfg.max_frames:
        keep = np.floor((np.arange(cfg.max_frames) + 0.5) * len(targets) / cfg.max_frames).astype(np.int64)
        targets = targets[keep]
    idx = np.searchsorted(timestamps, targets)
    idx = np.clip(idx, 0, n_frames - 1)
    prev = np.clip(idx - 1, 0, n_frames - 1)
    closer_prev = np.abs(timestamps[prev] - targets) < np.abs(timestamps[idx] - targets)
    return np.where(closer_prev, prev, idx)


# ---------------------------------------------------------------------------------------------- decoders

@dataclass
class Decoded:
    frames: Any  # (T, H, W, 3) uint8: numpy from a CPU decoder, a torch tensor on the GPU that decoded it
    timestamps: np.ndarray  # (T,) float64 seconds
    n_source_frames: int
    decoder: str
    n_decoded: Optional[int] = None  # frames the decoder produced, when it skipped some (selective PyAV)
    fallback: str = ""  # why the GPU decoder did not decode this clip ("" when it did, or on CPU)


def check_pixels(h: int, w: int, cfg: DecodeConfig) -> None:
    if h <= 0 or w <= 0:
        raise MediaError(f"frame has no pixels ({w}x{h})")
    if h * w > cfg.max_pixels:
        raise MediaError(f"frame {w}x{h} exceeds decode.max_pixels={cfg.max_pixels}")
    if max(h, w) > cfg.max_aspect_ratio * min(h, w):
        # resizing the short side to 224 would blow the long side up (a 1 x N strip -> 224 x 224N floats)
        raise MediaError(f"frame {w}x{h} has an aspect ratio over decode.max_aspect_ratio={cfg.max_aspect_ratio}")


def decode_image(data: bytes, cfg: DecodeConfig) -> Decoded:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_pixels(im.height, im.width, cfg)
            arr = np.asarray(im.convert("RGB"))
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"image decode failed: {type(e).__name__}: {e}") from None
    return Decoded(arr[None], np.zeros(1), 1, "pillow")


_decord_ctx_checked: dict[str, object] = {}


def _decord_ctx(device: str):
    import decord

    if device == "cpu":
        return decord.cpu(0)
    if "cuda" not in _decord_ctx_checked:
        try:
            ctx = decord.gpu(0)
            decord.nd.array(np.zeros(1, dtype=np.uint8), ctx=ctx)
        except Exception as e:  # CPU-only wheel or no GPU
            raise DecoderUnavailable(
                "decode.device=cuda but decord cannot use a GPU here "
                f"({type(e).__name__}: {e}); build decord with CUDA (NVDEC) or set decode.device=cpu") from None
        _decord_ctx_checked["cuda"] = ctx
    return _decord_ctx_checked["cuda"]


def decode_video_decord(data: bytes, sampling: SamplingConfig, cfg: DecodeConfig,
                        device: Optional[str] = None) -> Decoded:
    """decord on ``device`` (default ``cfg.device``; the CPU fallback of a GPU decode passes ``cpu``)."""
    import decord

    try:
        vr = decord.VideoReader(io.BytesIO(data), ctx=_decord_ctx(device or cfg.device), num_threads=cfg.threads)
        n = len(vr)
        if n <= 0:
            raise MediaError("decord: clip has no frames")
        avg_fps = vr.get_avg_fps()
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n))[:, 0], dtype=np.float64)
        if not (np.isfinite(ts).all() and (ts >= -1e-3).all() and (np.diff(ts) >= 0).all()):
            # containers without per-frame pts (h264 in AVI) give decord AV_NOPTS_VALUE-derived garbage
            # (about -1e18 s); fall back to constant-rate times from the average frame rate
            ts = np.arange(n) / (avg_fps if avg_fps and avg_fps > 0 else 25.0)
        ts = ts - ts[0]
        idx = sample_indices(n, sampling, ts if sampling.mode == "fps" else None, avg_fps)
        frames = vr.get_batch(idx).asnumpy()
        stamps = ts[idx]
    except (MediaError, DecoderUnavailable):
        raise
    except RuntimeError as e:
        raise MediaError(f"decord: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:
        raise MediaError(f"decord: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"decord returned frames of shape {frames.shape}")
    check_pixels(frames.shape[1], frames.shape[2], cfg)
    return Decoded(frames, np.asarray(stamps, dtype=np.float64), n, "decord")


_REAL_PTS_FORMATS = {"mov", "mp4", "matroska", "webm"}


def _to_rgb(fr, size0: tuple[int, int]) -> np.ndarray:
    """PyAV frame -> (H, W, 3) uint8; a stream that changes resolution mid-way is scaled to its first
    size ``size0`` = (width, height), as decord does."""
    if (fr.width, fr.height) == size0:
        return fr.to_ndarray(format="rgb24")
    return fr.to_ndarray(format="rgb24", width=size0[0], height=size0[1])


def _pyav_selective(data: bytes, pts: list[int], want_ranks: set[int], cfg: DecodeConfig
                    ) -> Optional[tuple[dict[int, np.ndarray], int]]:
    """Decode only what the wanted frames need. Returns ({display rank: (H, W, 3) uint8}, frames the
    decoder produced) or None.

    Packets are fed one by one; a packet whose frame is not wanted is sent with ``skip_frame=NONREF``,
    so the decoder drops it if no other frame references it (h264/hevc non-reference pictures, MPEG-4
    B-VOPs) and decodes it as usual otherwise. Wanted frames and every reference frame decode exactly as
    in a full decode, so the kept pixels are identical; decoding stops once every wanted frame is out.
    Frames are identified by their pts (its rank among all packet pts = the display index), so this
    needs unique pts on every packet, and a decoder that handles one packet at a time (no frame
    threading). None means "could not be sure": the caller does a full decode instead.
    """
    import av

    rank_of = {p: r for r, p in enumerate(sorted(pts))}
    if len(rank_of) != len(pts):
        return None  # duplicate pts: ranks would be ambiguous
    kept: dict[int, np.ndarray] = {}
    size0: Optional[tuple[int, int]] = None
    last, n_out = -1, 0
    with av.open(io.BytesIO(data), mode="r") as c:
        st = c.streams.video[0]
        st.thread_type = "SLICE"  # frame threading would decode packets after we changed skip_frame
        ctx = st.codec_context
        if ctx is None:
            return None  # no decoder for this codec: the full path reports it
        for pkt in c.demux(st):
            if pkt.size > 0:
                if pkt.pts is None or pkt.pts not in rank_of:
                    return None
                ctx.skip_frame = "DEFAULT" if rank_of[pkt.pts] in want_ranks else "NONREF"
            else:
                ctx.skip_frame = "DEFAULT"  # flush: whatever is buffered comes out
            for fr in pkt.decode():
                n_out += 1
                if size0 is None:
                    size0 = (fr.width, fr.height)
                r = rank_of.get(fr.pts)
                if r is None or r <= last:
                    return None  # frames leave the decoder in display order: anything else means bad pts
                last = r
                if r in want_ranks and r not in kept:
                    check_pixels(fr.height, fr.width, cfg)
                    kept[r] = _to_rgb(fr, size0)
            if len(kept) == len(want_ranks):
                return kept, n_out
    return None  # a wanted frame never came out (corrupt stream?): let the full decode judge


def _pyav_probe(data: bytes) -> tuple[Optional[list[int]], float, bool]:
    """Pass 1, demux only (no decoding): (packet pts or None when the container carries none, time base, whether
    the pts are true presentation times)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as c:
        if not c.streams.video:
            raise MediaError("pyav: no video stream")
        st = c.streams.video[0]
        tb = float(st.time_base) if st.time_base else 1.0
        pts = [p.pts for p in c.demux(st) if p.size > 0 and p.pts is not None]
        # containers whose packets carry true presentation times (ISO BMFF via ctts, Matroska);
        # AVI and raw streams may carry decode-order stamps, which would make pts ranks lie
        real_pts = bool(_REAL_PTS_FORMATS & set((c.format.name or "").split(",")))
    return pts or None, tb, real_pts


def _pyav_full(data: bytes, tb: float, want: Optional[set[int]], cfg: DecodeConfig
               ) -> tuple[list[float], dict[int, np.ndarray]]:
    """Pass 2, a full decode: (time of every decoded frame, {decode index: (H, W, 3) uint8} of the frames in
    ``want``, or of every frame when ``want`` is None)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO" if cfg.threads != 1 else "SLICE"
        rate = float(st.average_rate or st.guessed_rate or 0) or 25.0  # for frames without pts
        decoded_pts: list[float] = []
        kept: dict[int, np.ndarray] = {}
        size0: Optional[tuple[int, int]] = None
        for i, fr in enumerate(c.decode(st)):
            decoded_pts.append(float(fr.pts * tb) if fr.pts is not None else i / rate)
            if size0 is None:
                size0 = (fr.width, fr.height)
            if want is None or i in want:
                if want is not None:
                    check_pixels(fr.height, fr.width, cfg)
                kept[i] = _to_rgb(fr, size0)
    return decoded_pts, kept


def _pick_decoded(decoded_pts: list[float], kept: dict[int, np.ndarray], want: Optional[set[int]],
                  n_hint: Optional[int], sampling: SamplingConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames (T, H, W, 3), their times, frames decoded) from a full decode's output."""
    n = len(decoded_pts)
    if n == 0:
        raise MediaError("pyav: no decodable frames (unsupported codec or corrupt stream)")
    # frames come out of the decoder in presentation order, but their pts can be out of order when the
    # container has no real pts (h264 in AVI) or timestamps restart: the i-th frame gets the i-th time
    times = np.sort(np.asarray(decoded_pts, dtype=np.float64))
    times = times - times[0]
    idx = sample_indices(n, sampling, times, None)
    if want is not None and n != n_hint:
        # counts disagreed (corrupt tail, b-frames dropped): map each wanted index to the nearest kept frame
        if not kept:
            raise MediaError("pyav: none of the sampled frames decoded")
        arr_av = np.asarray(sorted(kept))
        idx = arr_av[np.abs(arr_av[None, :] - idx[:, None]).argmin(1)]
    elif want is not None:
        missing = [i for i in idx.tolist() if i not in kept]
        if missing:
            raise MediaError(f"pyav: frames {missing[:5]} did not decode")
    return np.stack([kept[i] for i in idx.tolist()]), times[idx], n


def decode_video_pyav(data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
    """PyAV: probe the packets' times, sample from them, then decode selectively (only what the sampled frames
    need, :func:`_pyav_selective`) where the container allows, else fully (:func:`_pyav_full`)."""
    try:
        pts, tb, real_pts = _pyav_probe(data)
        n_hint = len(pts) if pts else None
        want: Optional[set[int]] = None
        if n_hint:  # frames to keep, by display index, from the packets' presentation times
            sorted_ts = np.sort(np.asarray(pts, dtype=np.float64) * tb)
            times = sorted_ts - sorted_ts[0]
            idx = sample_indices(n_hint, sampling, times, None)
            want = set(idx.tolist())
        if want is not None and real_pts and cfg.selective and cfg.threads == 1:
            got = _pyav_selective(data, pts, want, cfg)
            if got is not None:
                frames = np.stack([got[0][i] for i in idx.tolist()])
                check_pixels(frames.shape[1], frames.shape[2], cfg)
                return Decoded(frames, times[idx], n_hint, "pyav", n_decoded=got[1])
        decoded_pts, kept = _pyav_full(data, tb, want, cfg)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"pyav: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}") from None
    frames, stamps, n = _pick_decoded(decoded_pts, kept, want, n_hint, sampling)
    check_pixels(frames.shape[1], frames.shape[2], cfg)
    return Decoded(frames, stamps, n, "pyav")


# ---------------------------------------------------------------------------------------------- backends

class VideoDecoder:
    """A video decoding backend, registered by name in :data:`VIDEO_DECODERS` (``data.decode.backend``).

    ``devices`` says where it can decode; ``package`` is the module it needs, checked by :meth:`missing` without
    importing it, so a driver can refuse a config before any work starts. One instance per (class, device) per
    process (:func:`video_decoder`): the constructor does the one-off checks (the library loads, a GPU is
    visible) and raises :class:`DecoderUnavailable`; :meth:`decode` raises :class:`MediaError` for a clip it
    cannot decode, which on a GPU sends that clip to the CPU decoders (:func:`decode_media`)."""

    name: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    package: ClassVar[str] = ""
    install: ClassVar[str] = ""  # how to get ``package``, for the error message

    def __init__(self, device: str):
        self.device = device

    @classmethod
    def missing(cls) -> Optional[str]:
        """Why this backend cannot be used here (its package is not installed), or None."""
        if cls.package and importlib.util.find_spec(cls.package) is None:
            return f"the {cls.package!r} package is not installed ({cls.install})"
        return None

    def decode(self, data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
        raise NotImplementedError


VIDEO_DECODERS: Registry[type[VideoDecoder]] = Registry("video decoder")
CPU_CHAIN = ("pyav", "decord")  # backend auto on cpu, and the per-clip fallback of a GPU decode


@VIDEO_DECODERS.register("pyav")
class PyAVDecoder(VideoDecoder):
    name = "pyav"

    def decode(self, data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
        return decode_video_pyav(data, sampling, cfg)


@VIDEO_DECODERS.register("decord")
class DecordDecoder(VideoDecoder):
    name = "decord"
    devices = ("cpu", "cuda")  # cuda: only with a decord built from source with NVDEC

    def decode(self, data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
        return decode_video_decord(data, sampling, cfg, self.device)


Chain = list[tuple[type[VideoDecoder], str]]


def decoder_chain(cfg: DecodeConfig) -> Chain:
    """The (backend class, device) pairs tried in order for each clip. cpu: ``backend`` alone, or PyAV then decord
    for auto. cuda: the GPU backend (auto: torchcodec), then, with ``cpu_fallback``, PyAV and decord on CPU."""
    if cfg.device == "cpu":
        return [(VIDEO_DECODERS.get(n), "cpu") for n in (CPU_CHAIN if cfg.backend == "auto" else (cfg.backend,))]
    gpu = [(VIDEO_DECODERS.get("torchcodec" if cfg.backend == "auto" else cfg.backend), "cuda")]
    return gpu + ([(VIDEO_DECODERS.get(n), "cpu") for n in CPU_CHAIN] if cfg.cpu_fallback else [])


def check_chain(chain: Chain) -> None:
    """Raise :class:`DecoderUnavailable` when a backend of the chain is not installed (no import, no GPU needed:
    the driver calls this before starting any work)."""
    for cls, device in chain:
        problem = cls.missing()
        if problem:
            hint = "; or set data.decode.device=cpu" if device == "cuda" else ""
            raise DecoderUnavailable(f"data.decode.backend={cls.name} (device {device}): {problem}{hint}")


_instances: dict[tuple[type[VideoDecoder], str], VideoDecoder] = {}


def video_decoder(cls: type[VideoDecoder], device: str) -> VideoDecoder:
    """This process's instance of backend ``cls`` on ``device``, made (and checked) on first use."""
    key = (cls, device)
    if key not in _instances:
        check_chain([key])
        _instances[key] = cls(device)
    return _instances[key]


def decode_video(data: bytes, sampling: SamplingConfig, cfg: DecodeConfig, chain: Chain) -> Decoded:
    """The first decode of the chain that succeeds; a clip decoded on CPU after a GPU backend refused it carries the
    GPU's reason in ``fallback``. Raises MediaError with every backend's reason when none can."""
    errors: list[str] = []
    for cls, device in chain:
        try:
            dec = video_decoder(cls, device).decode(data, sampling, cfg)
        except MediaError as e:
            errors.append(str(e))
            continue
        if errors and device == "cpu" and chain[0][1] == "cuda":
            dec.fallback = errors[0]
        return dec
    raise MediaError(" | ".join(errors))


def decode_media(data: bytes, name_ext: str, sampling: SamplingConfig, cfg: DecodeConfig,
                 chain: Optional[Chain] = None) -> tuple[str, Decoded]:
    """Decode one media member with ``chain`` (default :func:`decoder_chain` of ``cfg``; a Ray stage passes the one
    resolved on its driver). Returns (media_type, Decoded). Raises MediaError with the reason."""
    if len(data) == 0:
        raise MediaError("empty media file (0 bytes)")
    kind, fmt = sniff(data)
    if kind == "image":
        return "image", decode_image(data, cfg)
    try:
        dec = decode_video(data, sampling, cfg, chain if chain is not None else decoder_chain(cfg))
    except MediaError as e:
        if kind != "unknown":
            raise
        # not a known container: maybe an image with a wrong name that PIL knows
        try:
            return "image", decode_image(data, cfg)
        except MediaError:
            pass
        raise MediaError(f"unrecognised media (.{name_ext}, magic {data[:8].hex()}): {e}") from None
    if dec.n_source_frames == 1:  # a single-frame "video" (e.g. an MJPEG still named .mp4) is an image
        return "image", Decoded(dec.frames[:1], dec.timestamps[:1], 1, dec.decoder, fallback=dec.fallback)
    return "video", dec


importlib.import_module(".nvdec", __package__)  # registers the torchcodec backend (it imports this module's names)
