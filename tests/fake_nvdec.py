"""A stand-in GPU video decoder for machines without one: ``fake-nvdec``, registered in vlp's decoder registry.

It decodes on ``cuda`` only, as far as the config and the Ray placement know, but does the work with PyAV on the
CPU. Like NVDEC with a codec it lacks, it refuses MPEG-4 Part 2 clips (so vlp must decode those on CPU), and it
returns frames as a torch tensor, as a GPU decoder does. Its decoder label names the GPUs Ray gave the process
(``fake-nvdec@gpu0``), so a pipeline run shows which stage held a GPU. Importable by Ray workers: the tests put
this folder on their PYTHONPATH; vlp's stages pickle the class by reference.
"""

from __future__ import annotations

import io
import sys

import av
import torch

from vlp.data.media import VIDEO_DECODERS, Decoded, DecoderUnavailable, MediaError, VideoDecoder, decode_video_pyav

REFUSED = ("mpeg4",)


def ray_gpus() -> str:
    """``@gpu<ids>`` in a Ray worker holding GPUs, else ""."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    ids = ray.get_gpu_ids()
    return f"@gpu{','.join(map(str, ids))}" if ids else ""


@VIDEO_DECODERS.register("fake-nvdec")
class FakeNvdec(VideoDecoder):
    name = "fake-nvdec"
    devices = ("cuda",)

    def decode(self, data, sampling, cfg) -> Decoded:
        try:
            with av.open(io.BytesIO(data)) as c:
                codec = c.streams.video[0].codec_context.name if c.streams.video else "none"
        except av.FFmpegError as e:
            raise MediaError(f"fake-nvdec: {e}") from None
        if codec in REFUSED:
            raise MediaError(f"fake-nvdec: codec {codec} is not supported by this GPU's NVDEC")
        dec = decode_video_pyav(data, sampling, cfg)
        frames = torch.from_numpy(dec.frames)  # (T, H, W, 3) uint8, a tensor as from a GPU decoder
        return Decoded(frames, dec.timestamps, dec.n_source_frames, f"fake-nvdec{ray_gpus()}")


@VIDEO_DECODERS.register("needs-missing-package")
class NeedsMissingPackage(VideoDecoder):
    """A backend whose package is not installed: what a config naming torchcodec gets on a machine without it."""

    name = "needs-missing-package"
    devices = ("cpu", "cuda")
    package = "vlp_test_no_such_package"
    install = "pip install vlp-test-no-such-package"


@VIDEO_DECODERS.register("no-gpu-in-worker")
class NoGpuInWorker(VideoDecoder):
    """Installed (the driver's check passes), but no process can use it: what a worker without a visible GPU, or
    with a torchcodec whose libraries do not load, meets when the decode stage first needs its decoder."""

    name = "no-gpu-in-worker"
    devices = ("cuda",)

    def __init__(self, device: str):
        raise DecoderUnavailable("data.decode.device=cuda but this process sees no CUDA GPU (test stand-in)")
