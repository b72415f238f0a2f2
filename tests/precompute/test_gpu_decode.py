"""Where GPU decoding is placed on Ray, on a machine without a GPU: the decode stage's resource requests (GPU
fractions when decoding on cuda, CPUs otherwise), decoding inside the encoder actor (frames handed to the tower
without a host copy), and a real local Ray run whose cluster declares one (fake) GPU, decoding with the stand-in
GPU decoder ``fake-nvdec`` (tests/fake_nvdec.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fake_nvdec import FakeNvdec  # registers fake-nvdec
from conftest import ROOT, dotted
from media_makers import encode, frames_of, shard_file
from vlp.cli import main
from vlp.config import ConfigError, validate
from vlp.data.media import DecodeConfig, SamplingConfig
from vlp.precompute import PrecomputeConfig
from vlp.precompute.pipeline import decode_map_args, decode_placement, stage_resources
from vlp.precompute.stages import (DecodeActor, DecodeEncode, DecodeFrames, EncodeFeatures, batch_rows, frames_on,
                                   make_row, rows_batch)
from vlp.synth.shards import encode_jpeg

GPU_DECODE = {"data.decode.backend": "fake-nvdec", "data.decode.device": "cuda"}


def cfg_of(**kw) -> PrecomputeConfig:
    return validate(PrecomputeConfig, dotted({"data": {"shards": ["x.tar"]}, "output": {"uri": "o"}}, **kw))


def test_the_precompute_config_says_where_decoding_runs():
    with pytest.raises(ConfigError, match="decode_placement=encoder shares the encoder's GPU and needs "
                                          "decode.device=cuda"):
        cfg_of(**{"data.decode_placement": "encoder"})
    with pytest.raises(ConfigError, match="data.decode.backend: .*unknown video decoder type 'nvdecc'"):
        cfg_of(**{"data.decode.backend": "nvdecc"})


def test_decode_placement_follows_the_decode_device_and_the_encoder():
    assert decode_placement(cfg_of(), on_gpu=True) == "tasks"  # CPU decode: stateless tasks, as before
    assert decode_placement(cfg_of(**GPU_DECODE), on_gpu=True) == "encoder"  # the encoder's GPU decodes
    assert decode_placement(cfg_of(**GPU_DECODE), on_gpu=False) == "actors"  # a GPU actor pool of its own
    no_gpu_actors = cfg_of(**GPU_DECODE, **{"encoder.num_gpus_per_actor": 0})
    assert decode_placement(no_gpu_actors, on_gpu=True) == "actors"
    assert decode_placement(cfg_of(**GPU_DECODE, **{"data.decode_placement": "tasks"}), on_gpu=True) == "tasks"
    with pytest.raises(ConfigError, match="data.decode_placement: encoder decodes on the encoder actors' GPU, but "
                                          "they hold none"):
        decode_placement(cfg_of(**GPU_DECODE, **{"data.decode_placement": "encoder"}), on_gpu=False)


def test_decode_asks_ray_for_a_gpu_fraction_only_when_decoding_on_gpu():
    cpu = stage_resources(cfg_of(), on_gpu=True)
    assert cpu["decode"] == {"num_cpus": 1.0, "memory": 512 << 20}  # no num_gpus key at all
    gpu = cfg_of(**GPU_DECODE, **{"data.decode_gpus": 0.125, "data.decode_cpus": 2})
    for placement in ("tasks", "actors"):
        assert stage_resources(gpu, on_gpu=False, placement=placement)["decode"] == {
            "num_cpus": 2.0, "memory": 512 << 20, "num_gpus": 0.125}
    fused = stage_resources(gpu, on_gpu=True)  # auto -> encoder: decode holds nothing of its own
    assert fused["decode"] == {} and fused["encode"] == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_the_decode_stage_map_batches_arguments():
    cfg = cfg_of(**GPU_DECODE, **{"data.decode_concurrency": 3, "data.decode_batch_size": 2})
    stage = DecodeFrames(cfg.data.sampling, cfg.data.decode, 32)
    assert stage.chain[0] == (FakeNvdec, "cuda")
    res = stage_resources(cfg, on_gpu=False, placement="actors")["decode"]
    fn, kw = decode_map_args(cfg, stage, "actors", res)
    pool = kw.pop("compute")
    assert fn is DecodeActor and (pool.min_size, pool.max_size) == (3, 3)
    assert kw == {"batch_size": 2, "batch_format": "numpy", "num_cpus": 1.0, "memory": 512 << 20, "num_gpus": 0.25,
                  "fn_constructor_kwargs": {"stage": stage}}
    fn, kw = decode_map_args(cfg, stage, "tasks", res)
    assert fn is stage and kw == {"batch_size": 2, "batch_format": "numpy", "num_cpus": 1.0, "memory": 512 << 20,
                                  "num_gpus": 0.25}
    with pytest.raises(ValueError, match="no decode stage of its own"):
        decode_map_args(cfg, stage, "encoder", res)


def test_frames_decoded_on_a_device_are_joined_there_not_on_the_host():
    """The ``meta`` device stands in for a GPU: numpy items (CPU-decoded fallbacks) go up to the tensors' device;
    the device tensors are never brought down."""
    on_dev = torch.empty(2, 3, 8, 8, dtype=torch.uint8, device="meta")  # (T, 3, S, S)
    host = np.zeros((3, 3, 8, 8), np.uint8)
    x = frames_on([on_dev, host, on_dev])
    assert x.device.type == "meta" and tuple(x.shape) == (7, 3, 8, 8)
    y = frames_on([host, host])
    assert y.device.type == "cpu" and tuple(y.shape) == (6, 3, 8, 8)


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"h264": encode(frames_of(12), codec="libx264"), "mpeg4": encode(frames_of(12, seed=1), codec="mpeg4"),
            "jpg": encode_jpeg(frames_of(1, seed=2)[0])}


def test_decoding_in_the_encoder_actor_gives_the_features_of_separate_stages(clips, tiny_clip_path):
    from vlp.models.towers import TowerConfig

    rows = [make_row(shard="s", key=k, kind="sample", media=[d], media_ext=["jpg" if k == "jpg" else "mp4"],
                     item_names=[k], modalities=["image" if k == "jpg" else "video"], item_refs=[""])
            for k, d in clips.items()]
    decode = DecodeFrames(SamplingConfig(num_frames=4), DecodeConfig(backend="fake-nvdec", device="cuda"), 224)
    enc = dict(tower_cfg=TowerConfig(type="clip", path="preset:tiny-clip", device="cpu"), mode="valley_pooled")
    split = batch_rows(EncodeFeatures(**enc)(decode(rows_batch(rows))))
    fused = batch_rows(DecodeEncode(decode, **enc)(rows_batch(rows)))
    assert [r["decoder"] for r in fused] == [["fake-nvdec"], ["pyav"], ["pillow"]]
    assert fused[1]["fallback"][0].startswith("fake-nvdec: codec mpeg4")
    for a, b in zip(split, fused):
        assert a["kind"] == b["kind"] == "sample" and a["features_shape"] == b["features_shape"]
        assert a["features"] == b["features"] and b["frames"] == [] and b["frames_shape"] == a["frames_shape"]


def test_a_missing_gpu_decoder_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch, tiny_clip_path):
    import vlp.runtime

    monkeypatch.setattr(vlp.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    shard = shard_file(tmp_path / "s-00000.tar", [("a", {"jpg": encode_jpeg(frames_of(1)[0]), "txt": b"x"})])
    (tmp_path / "p.yaml").write_text(json.dumps({
        "data": {"shards": [str(shard)], "decode": {"device": "cuda"}}, "output": {"uri": str(tmp_path / "out")},
        "encoder": {"tower": {"type": "clip", "path": "preset:tiny-clip"}}}))
    rc = main(["precompute", "--config", str(tmp_path / "p.yaml")])
    text = "".join(capsys.readouterr())
    assert rc == 2 and "Traceback" not in text, text
    err = text[text.index("vlp precompute: error: "):].strip()
    assert "\n" not in err and "data.decode.backend=torchcodec (device cuda)" in err, err


RAY_RUN = r"""
import json, sys
import ray
import fake_nvdec
from vlp.config import validate
from vlp.precompute import PrecomputeConfig, run_precompute

shard, out = sys.argv[1], sys.argv[2]
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=1 << 28, log_to_driver=False)
res = {}
for placement in ("auto", "tasks"):
    cfg = validate(PrecomputeConfig, {
        "data": {"shards": [shard], "decode": {"backend": "fake-nvdec", "device": "cuda"}, "decode_cpus": 0.5,
                 "decode_placement": placement, "sampling": {"num_frames": 4}},
        "encoder": {"tower": {"type": "clip", "path": "preset:tiny-clip"}, "num_gpus_per_actor": 0.5,
                    "cpus_per_actor": 0.5},
        "output": {"uri": f"{out}/{placement}"}, "ray": {"progress_bars": False}})
    logs = []
    s = run_precompute(cfg, log=logs.append)
    res[placement] = {"ok": s["samples_ok"], "failed": s["samples_failed"], "decoders": s["this_run"]["decoders"],
                      "fallbacks": s["this_run"]["decode_fallbacks"], "logs": logs}
cfg = validate(PrecomputeConfig, {  # installed on the driver, unusable in the decode tasks
    "data": {"shards": [shard], "decode": {"backend": "no-gpu-in-worker", "device": "cuda"}, "decode_cpus": 0.5,
             "decode_placement": "tasks"},
    "encoder": {"tower": {"type": "clip", "path": "preset:tiny-clip", "device": "cpu"}, "cpus_per_actor": 0.5},
    "output": {"uri": f"{out}/no-gpu"}, "ray": {"progress_bars": False}})
try:
    run_precompute(cfg, log=lambda *_: None)
except Exception as e:
    res["no_gpu"] = {"type": type(e).__name__, "message": str(e)}
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
def test_a_local_ray_with_a_gpu_runs_gpu_decoding_where_it_was_placed(clips, tmp_path, tiny_clip_path):
    """A local Ray declaring one GPU (none is there): decode placed in the encoder actors (auto) and as tasks
    asking for 0.25 GPU each. ``fake-nvdec`` labels each clip with the GPU ids Ray gave its process, so the
    summary shows that the process that decoded held a GPU, and counts the MPEG-4 clip's CPU fallback. Then a
    backend the decode tasks cannot make stops the run with its own error."""
    shard = shard_file(tmp_path / "gpu-00000.tar", [
        ("v1", {"mp4": clips["h264"], "txt": b"a"}), ("v2", {"mp4": clips["mpeg4"], "txt": b"b"}),
        ("i1", {"jpg": clips["jpg"], "txt": b"c"})])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "tests")])}
    p = subprocess.run([sys.executable, "-c", RAY_RUN, str(shard), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=600)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    for placement, where in (("auto", "encoder"), ("tasks", "tasks")):
        r = res[placement]
        assert (r["ok"], r["failed"]) == (3, 0), r
        assert r["decoders"] == {"fake-nvdec@gpu0": 1, "pyav": 1, "pillow": 1}, r
        assert r["fallbacks"] == {"fake-nvdec: codec mpegN is not supported by this GPU's NVDEC": 1}, r
        assert f"[vlp] decode on cuda (fake-nvdec, pyav, decord), placement {where}" in r["logs"], r["logs"]
        assert any("GPU decode fell back to CPU for 1 item(s)" in x for x in r["logs"]), r["logs"]
    # a decoder the driver has but the decode tasks cannot make: the run stops with its message, in one line
    assert res["no_gpu"] == {"type": "DecoderUnavailable", "message": "data.decode.device=cuda but this process "
                                                                      "sees no CUDA GPU (test stand-in)"}, res



def test_the_driver_finds_a_workers_decoder_error_in_what_ray_hands_it():
    """Ray Data keeps a task's exception only as traceback text (what ``str()`` of the RayTaskError the driver gets
    reads like, from a real run): the decoder's one line is found in it; anything else is not a decoder problem."""
    from vlp.precompute.pipeline import decoder_problem

    class Wrapped(Exception):  # stands in for ray.exceptions.RayTaskError(UserCodeException)
        pass

    text = ('ray::ReadRange->MapBatches(f)() (pid=1, ip=192.0.2.2)\n  File "x.py", line 5, in f\n'
            '    raise DecoderUnavailable("no gpu")\nvlp.data.media.DecoderUnavailable: data.decode.device=cuda but '
            'this process sees no CUDA GPU\n\nThe above exception was the direct cause of the following exception:\n'
            '\nray.exceptions.UserCodeException: UDF failed to process a data block.')
    assert decoder_problem(Wrapped(text)) == "data.decode.device=cuda but this process sees no CUDA GPU"
    outer = RuntimeError("iteration failed")
    outer.__cause__ = Wrapped(text)
    assert decoder_problem(outer) == "data.decode.device=cuda but this process sees no CUDA GPU"
    from vlp.data.media import DecoderUnavailable

    assert decoder_problem(DecoderUnavailable("torchcodec does not load")) == "torchcodec does not load"
    assert decoder_problem(Wrapped("ValueError: something else")) is None
