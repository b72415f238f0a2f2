"""Audio decoding (PyAV) and AST-style log-mel filterbank features: the audio modality's data stage.

ChatBridge and the AST family take audio as 16 kHz mono, cut into 10.24 s segments, each a Kaldi-style
128-bin log-mel filterbank of 1024 frames (10 ms hop), normalised with the tower's constants. Here:

- :func:`decode_audio`: bytes of any container PyAV reads (wav, flac, mp3, m4a/aac, ogg/opus, and the
  soundtrack of a video file such as mp4) -> float32 (S,) mono (mean over channels) at ``sample_rate``, resampled
  with ``av.AudioResampler``. Decoding stops once ``max_segments`` segments are filled, so memory is bounded by
  the config, not by what the file claims or holds. Bad audio raises :class:`~vlp.data.media.MediaError`
  with the reason a record gets: no audio stream, a sample rate above ``max_source_rate``, undecodable data,
  no samples, or silence.
- :func:`segments`: the waveform -> at most ``max_segments`` chunks of ``segment_seconds``.
- :func:`fbank_features`: segments -> (n_segments, frames, mel_bins) through transformers'
  ``ASTFeatureExtractor`` (its Kaldi fbank; torchaudio's when installed), i.e. the tower's own preprocessing.

- :class:`AudioFeaturizer`: all three for one item's bytes with the audio tower's own extractor (what the
  precompute decode stage and chat run for an audio item).

Plain functions, no Ray; imports av, numpy, transformers (lazily).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from ..config import Cfg
from .media import MediaError


class AudioConfig(Cfg):
    """How audio items are decoded and cut (ChatBridge / AST defaults)."""

    sample_rate: int = Field(16000, ge=1000, le=192000, description="rate the tower expects (AST: 16 kHz)")
    segment_seconds: float = Field(10.24, gt=0, le=600, description="length of one segment (AST: 1024 frames "
                                   "of 10 ms)")
    max_segments: int = Field(1, ge=1, le=64, description="segments kept per item, from the start; decoding "
                              "stops after them")
    max_source_rate: int = Field(384000, ge=8000, description="refuse streams with a higher sample rate")
    min_rms: float = Field(1e-4, ge=0, description="an item whose RMS is below this is refused as silent")


def decode_audio(data: bytes, cfg: AudioConfig) -> np.ndarray:
    """The first audio stream of ``data`` -> float32 (S,) mono at ``cfg.sample_rate``, at most
    ``max_segments * segment_seconds`` long. Raises MediaError for bad audio (module docstring)."""
    import av

    try:
        container = av.open(io.BytesIO(data))
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(f"undecodable audio: {type(e).__name__}") from None
    with container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        if stream.rate and stream.rate > cfg.max_source_rate:
            raise MediaError(f"audio sample rate {stream.rate} Hz is above max_source_rate {cfg.max_source_rate}")
        limit = int(round(cfg.max_segments * cfg.segment_seconds * cfg.sample_rate))
        wave = read_mono(container, stream, cfg.sample_rate, limit)
    if wave.size == 0:
        raise MediaError("no audio samples")
    if float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) < cfg.min_rms:
        raise MediaError("silent audio")
    return wave


def read_mono(container: Any, stream: Any, rate: int, limit: int) -> np.ndarray:
    """Decode ``stream`` until ``limit`` samples at ``rate`` are held: (S,) float32, the mean of the channels."""
    import av

    resampler = av.AudioResampler(format="fltp", rate=rate)  # keeps the layout: channels are averaged here
    parts: list[np.ndarray] = []
    held = 0
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().mean(axis=0))  # (C, n) planar float -> (n,)
                held += parts[-1].size
            if held >= limit:
                break
        else:
            for out in resampler.resample(None):  # flush what the resampler holds back
                parts.append(out.to_ndarray().mean(axis=0))
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(f"undecodable audio: {type(e).__name__}") from None
    wave = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return wave[:limit].astype(np.float32)


def segments(wave: np.ndarray, cfg: AudioConfig) -> list[np.ndarray]:
    """(S,) -> chunks of ``segment_seconds`` (the last may be shorter), at most ``max_segments``."""
    n = int(round(cfg.segment_seconds * cfg.sample_rate))
    return [wave[i:i + n] for i in range(0, wave.size, n)][:cfg.max_segments]


def fbank_features(chunks: list[np.ndarray], extractor: Any) -> np.ndarray:
    """Segments -> (n_segments, extractor.max_length, extractor.num_mel_bins) float32: the extractor's own
    fbank, padding or cutting each segment to its ``max_length`` frames and normalising with its mean/std."""
    out = extractor(chunks, sampling_rate=extractor.sampling_rate, return_tensors="np")
    return np.asarray(out["input_values"], dtype=np.float32)  # (n_seg, 1024, 128) with AST's defaults


@dataclass
class DecodedAudio:
    fbank: np.ndarray  # (n_segments, frames, mel_bins) float32, normalised as the tower expects
    starts: list[float]  # each segment's start in seconds
    n_samples: int  # samples decoded (at the target rate)


@functools.lru_cache(maxsize=4)
def load_extractor(path: str) -> Any:
    """The tower's ``ASTFeatureExtractor`` (its preprocessor_config.json), loaded once per process. ``path`` as the
    config writes it (a folder, hub id or ``preset:NAME``): resolved here, in the process that decodes (a preset's
    folder exists on the node that builds it, not necessarily on the driver's)."""
    import warnings

    from transformers import ASTFeatureExtractor

    from ..models.presets import resolve_model_path

    path = resolve_model_path(path)
    with warnings.catch_warnings():  # AST's 128 mel bins over a 400-sample window leave one filter empty, by design
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        return ASTFeatureExtractor.from_pretrained(path)


class AudioFeaturizer:
    """One audio item's bytes -> :class:`DecodedAudio` with the tower's extractor at ``extractor_path`` (the audio
    tower's path as configured: folder, hub id or preset). Raises MediaError for bad audio."""

    def __init__(self, cfg: AudioConfig, extractor_path: str):
        self.cfg, self.path = cfg, extractor_path

    def __call__(self, data: bytes) -> DecodedAudio:
        wave = decode_audio(data, self.cfg)
        chunks = segments(wave, self.cfg)
        fbank = fbank_features(chunks, load_extractor(self.path))  # (n_seg, F, M)
        return DecodedAudio(fbank, [i * self.cfg.segment_seconds for i in range(len(chunks))], int(wave.size))
