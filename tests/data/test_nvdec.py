"""GPU video decoding on a machine without a GPU: which backend each clip gets, the per-clip CPU fallback when the
GPU decoder refuses a clip, and the one-line error when the configured decoder cannot run at all.

The GPU decoder here is ``fake-nvdec`` (tests/fake_nvdec.py), registered through vlp's decoder registry like any
backend: it claims ``cuda``, refuses MPEG-4 Part 2 as NVDEC does a codec it lacks, and decodes the rest with PyAV.
The real torchcodec backend (vlp.data.nvdec) is not installed here; bench/gpu_check.sh runs it on a GPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fake_nvdec import FakeNvdec  # registers fake-nvdec and needs-missing-package
from media_makers import encode, frames_of
from vlp.data.media import (VIDEO_DECODERS, DecodeConfig, DecoderUnavailable, MediaError, SamplingConfig,
                            check_chain, decode_media, decode_video_pyav, decoder_chain)
from vlp.data.nvdec import TorchCodecDecoder
from vlp.precompute.stages import DecodeFrames, make_row, shard_counts

UNIFORM8 = SamplingConfig(num_frames=8)
GPU = DecodeConfig(backend="fake-nvdec", device="cuda")


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    """An h264 clip the fake GPU decodes and an MPEG-4 Part 2 clip it refuses."""
    return {"h264": encode(frames_of(12), codec="libx264"), "mpeg4": encode(frames_of(12, seed=1), codec="mpeg4")}


def names(chain) -> list[tuple[str, str]]:
    return [(cls.name, device) for cls, device in chain]


def test_which_backends_run_where():
    assert names(decoder_chain(DecodeConfig())) == [("pyav", "cpu"), ("decord", "cpu")]
    assert names(decoder_chain(DecodeConfig(backend="torchcodec"))) == [("torchcodec", "cpu")]
    cpu_tail = [("pyav", "cpu"), ("decord", "cpu")]  # a GPU decode's per-clip fallback
    assert names(decoder_chain(DecodeConfig(device="cuda"))) == [("torchcodec", "cuda"), *cpu_tail]
    assert names(decoder_chain(DecodeConfig(backend="decord", device="cuda"))) == [("decord", "cuda"), *cpu_tail]
    assert names(decoder_chain(DecodeConfig(device="cuda", cpu_fallback=False))) == [("torchcodec", "cuda")]
    assert {"pyav", "decord", "torchcodec", "fake-nvdec"} <= set(VIDEO_DECODERS.names())
    assert decoder_chain(GPU)[0] == (FakeNvdec, "cuda")  # a registered backend is chosen by its name


def test_a_backend_must_exist_and_decode_on_the_device():
    with pytest.raises(ValueError, match="unknown video decoder type 'nvdecc'; known: .*torchcodec"):
        DecodeConfig(backend="nvdecc")
    with pytest.raises(ValueError, match=r"device=cuda needs a backend that decodes there \(auto, .*torchcodec\); "
                                         "pyav decodes on cpu only"):
        DecodeConfig(backend="pyav", device="cuda")
    with pytest.raises(ValueError, match="fake-nvdec decodes on cuda only"):
        DecodeConfig(backend="fake-nvdec")


def test_gpu_decoder_keeps_the_clips_it_can_and_cpu_takes_the_rest(clips):
    mtype, d = decode_media(clips["h264"], "mp4", UNIFORM8, GPU)
    assert mtype == "video" and d.decoder == "fake-nvdec" and d.fallback == ""
    assert isinstance(d.frames, torch.Tensor) and tuple(d.frames.shape) == (8, 64, 96, 3)  # as decoded on the GPU
    mtype, d = decode_media(clips["mpeg4"], "mp4", UNIFORM8, GPU)
    assert mtype == "video" and d.decoder == "pyav"  # the first CPU backend of the fallback chain
    assert d.fallback == "fake-nvdec: codec mpeg4 is not supported by this GPU's NVDEC"
    np.testing.assert_array_equal(d.frames, decode_video_pyav(clips["mpeg4"], UNIFORM8, DecodeConfig()).frames)


def test_without_cpu_fallback_a_refused_clip_is_an_error(clips):
    strict = DecodeConfig(backend="fake-nvdec", device="cuda", cpu_fallback=False)
    with pytest.raises(MediaError, match="^fake-nvdec: codec mpeg4 is not supported"):
        decode_media(clips["mpeg4"], "mp4", UNIFORM8, strict)
    assert decode_media(clips["h264"], "mp4", UNIFORM8, strict)[1].decoder == "fake-nvdec"


def test_a_clip_no_backend_decodes_names_every_reason(clips):
    half = clips["mpeg4"][: len(clips["mpeg4"]) // 2]  # no index: nothing can read it
    with pytest.raises(MediaError, match=r"^fake-nvdec: .* \| pyav: .* \| decord: "):
        decode_media(half, "mp4", UNIFORM8, GPU)


def test_decode_rows_record_the_decoder_and_the_fallback_and_shards_count_them(clips):
    stage = DecodeFrames(UNIFORM8, GPU, 32)
    rows = [stage.decode_row(make_row(shard="s", key=k, kind="sample", media=[data], media_ext=["mp4"],
                                      item_names=["mp4"], modalities=["video"], item_refs=[""]))
            for k, data in clips.items()]
    assert [r["kind"] for r in rows] == ["sample", "sample"]
    assert [r["decoder"] for r in rows] == [["fake-nvdec"], ["pyav"]]
    assert rows[0]["fallback"] == [""] and rows[1]["fallback"][0].startswith("fake-nvdec: codec mpeg4")
    assert all(r["frames_shape"] == ["8,3,32,32"] and len(r["frames"][0]) == 8 * 3 * 32 * 32 for r in rows)
    counts = shard_counts(rows, rows)
    assert json.loads(counts["decoders"]) == {"fake-nvdec": 1, "pyav": 1}
    assert json.loads(counts["fallbacks"]) == {rows[1]["fallback"][0]: 1}


def test_a_decoder_that_is_not_installed_stops_with_one_line(clips):
    cfg = DecodeConfig(backend="needs-missing-package", device="cuda")
    with pytest.raises(DecoderUnavailable, match=r"^data.decode.backend=needs-missing-package \(device cuda\): the "
                       r"'vlp_test_no_such_package' package is not installed \(pip install vlp-test-no-such-package\); "
                       r"or set data.decode.device=cpu$"):
        check_chain(decoder_chain(cfg))
    with pytest.raises(DecoderUnavailable):  # not a MediaError: no sample becomes an error record for it
        decode_media(clips["h264"], "mp4", UNIFORM8, cfg)
    row = make_row(shard="s", key="k", kind="sample", media=[clips["h264"]], media_ext=["mp4"], item_names=["mp4"],
                   modalities=["video"], item_refs=[""])
    with pytest.raises(DecoderUnavailable):
        DecodeFrames(UNIFORM8, cfg, 32).decode_row(row)


def test_torchcodec_on_a_gpu_less_machine_is_a_config_error(clips):
    """torchcodec is not installed here (its PyPI wheel needs a CUDA torch); installed, there is still no GPU."""
    cfg = DecodeConfig(device="cuda")  # auto on cuda: torchcodec (NVDEC)
    assert not torch.cuda.is_available()
    with pytest.raises(DecoderUnavailable, match="torchcodec") as ei:
        decode_media(clips["h264"], "mp4", UNIFORM8, cfg)
    assert ("pip install 'vlp[gpu]'" in str(ei.value)) == (TorchCodecDecoder.missing() is not None)
