"""The torchcodec video backend: FFmpeg decoding on CPU, or NVDEC on a CUDA GPU (``data.decode.device: cuda``).

torchcodec is an optional dependency (``pip install 'vlp[gpu]'``): imported only when a decode first needs it, so
vlp imports and runs without it. Its wheels load FFmpeg's shared libraries (4 to 8) and the torch they were built
for; on a GPU the frames come back as a CUDA tensor, which the precompute stage resizes there and, when decode
runs in the encoder actor (``data.decode_placement: encoder``), hands to the vision tower without a host copy.

Written against torchcodec 0.17's documented API (``torchcodec.decoders.VideoDecoder``: bytes source,
``device``, ``dimension_order``, ``num_ffmpeg_threads``, ``seek_mode``, ``get_frames_at``, ``metadata``,
``cpu_fallback``). Tested here through the registry with a stand-in class only (this machine has no GPU, and the
PyPI wheel needs a CUDA torch); ``bench/gpu_check.sh`` runs it for real on a GPU machine.
"""

from __future__ import annotations

import numpy as np

from .media import (VIDEO_DECODERS, Decoded, DecodeConfig, DecoderUnavailable, MediaError, SamplingConfig,
                    VideoDecoder, check_pixels, sample_indices)

INSTALL = ("pip install 'vlp[gpu]': torchcodec built for this torch (a CUDA torch for NVDEC) and FFmpeg 4-8 "
           "with shared libraries")


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


@VIDEO_DECODERS.register("torchcodec")
class TorchCodecDecoder(VideoDecoder):
    """torchcodec's ``VideoDecoder`` on ``cpu`` or ``cuda`` (NVDEC; torchcodec's default CUDA backend).

    A clip NVDEC cannot decode either raises (-> :class:`MediaError`, so vlp decodes it on CPU) or is decoded by
    torchcodec's own CPU fallback, which it reports in ``cpu_fallback``: both are recorded as fallbacks."""

    name = "torchcodec"
    devices = ("cpu", "cuda")
    package = "torchcodec"
    install = INSTALL

    def __init__(self, device: str):
        super().__init__(device)
        try:
            import torch
            from torchcodec.decoders import VideoDecoder as TorchCodecVideoDecoder
        except Exception as e:  # OSError: no FFmpeg libraries, or a wheel built for another torch / CUDA
            raise DecoderUnavailable(f"data.decode.backend=torchcodec cannot load torchcodec ({first_line(e)}); "
                                     f"{INSTALL}") from None
        if device == "cuda" and not torch.cuda.is_available():
            raise DecoderUnavailable("data.decode.device=cuda but this process sees no CUDA GPU (in Ray, the decode "
                                     "stage holds data.decode_gpus of one; is there a GPU node?)")
        self.reader = TorchCodecVideoDecoder
        self.label = "torchcodec-cuda" if device == "cuda" else "torchcodec"

    def decode(self, data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
        try:
            return self.read(data, sampling, cfg)
        except MediaError:
            raise
        except Exception as e:  # unsupported codec, corrupt stream, NVDEC refusing the profile/size, ...
            raise MediaError(f"{self.label}: {first_line(e)}") from None

    def read(self, data: bytes, sampling: SamplingConfig, cfg: DecodeConfig) -> Decoded:
        """Open, check the size before decoding, decode only the sampled frames. fps sampling uses the stream's
        average rate for frame times (torchcodec gives no per-frame times without decoding); the returned
        timestamps are the decoded frames' own."""
        dec = self.reader(data, dimension_order="NHWC", num_ffmpeg_threads=cfg.threads, device=self.device,
                          seek_mode="exact")
        md = dec.metadata
        n = len(dec)
        if n <= 0:
            raise MediaError(f"{self.label}: clip has no frames")
        if md.height and md.width:
            check_pixels(md.height, md.width, cfg)  # before any frame is decoded (decompression bombs)
        idx = sample_indices(n, sampling, None, md.average_fps)
        batch = dec.get_frames_at(idx.tolist())
        frames = batch.data  # (T, H, W, 3) uint8 on self.device
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise MediaError(f"{self.label} returned frames of shape {tuple(frames.shape)}")
        check_pixels(frames.shape[1], frames.shape[2], cfg)
        stamps = batch.pts_seconds.double().cpu().numpy() - float(md.begin_stream_seconds or 0.0)  # (T,)
        fell_back = getattr(dec, "cpu_fallback", None)  # torchcodec >= 0.9
        return Decoded(frames if self.device == "cuda" else frames.numpy(), np.asarray(stamps, dtype=np.float64), n,
                       self.label, fallback=f"{self.label}: {fell_back}" if fell_back else "")
