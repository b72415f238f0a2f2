"""``output.mode: pixels``: precompute stores the tower's input frames (uint8 (T, 3, S, S), resized, not normalised)
instead of features, for runs that train the vision tower (mPLUG-Owl's stage 1). No vision tower is built or
placed on a GPU for them; the fingerprint still records the tower whose size and mean/std define the frames; the
readers decode the blocks as uint8; training and evaluation refuse them for models that take tower features."""

from __future__ import annotations

import json

import numpy as np
import pytest

from media_makers import frames_of, shard_file
from vlp.config import validate
from vlp.data.media import DecodeConfig, SamplingConfig
from vlp.formats.featureset import decode_features
from vlp.precompute import PrecomputeConfig
from vlp.precompute.stages import DecodeFrames, EncodeFeatures, ReadShard, batch_rows, rows_batch
from vlp.synth.shards import encode_jpeg, encode_mp4

SAMPLES = [("clip", {"mp4": encode_mp4(frames_of(12, color="blue"), 8), "txt": b"A blue square."}),
           ("still", {"jpg": encode_jpeg(frames_of(1, color="red", shape="circle")[0]), "txt": b"A red circle."})]


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return shard_file(tmp_path_factory.mktemp("pixels") / "px-00000.tar", SAMPLES)


def _cfg(shard, out, **output) -> PrecomputeConfig:
    return validate(PrecomputeConfig, {"data": {"shards": [str(shard)]}, "output": {"uri": str(out), **output},
                                       "ray": {"progress_bars": False}})


def test_the_encode_stage_passes_frames_through_without_a_tower(shard, tiny_clip_path):
    from vlp.models.towers import TOWERS
    from vlp.precompute.pipeline import encoder_on_gpu

    stage = EncodeFeatures(TOWERS.config(path="preset:tiny-clip"), "pixels")
    assert stage.tower is None
    frames = [np.random.default_rng(0).integers(0, 255, (4, 3, 224, 224), dtype=np.uint8)]
    assert np.array_equal(stage.encode(frames)[0], frames[0])
    gpu = {"encoder": {"tower": {"device": "cuda"}}}
    assert not encoder_on_gpu(validate(PrecomputeConfig, {**gpu, "data": {"shards": ["x.tar"]}, "output": {
        "uri": "o", "mode": "pixels"}}), 1)
    assert encoder_on_gpu(validate(PrecomputeConfig, {**gpu, "data": {"shards": ["x.tar"]}, "output": {"uri": "o"}}), 1)
    with pytest.raises(ValueError, match="does not fit shape"):
        decode_features(b"\0" * 10, [2, 2])


@pytest.mark.ray
def test_pixels_sets_hold_the_decoded_frames_and_are_refused_where_features_are_needed(ray_local, shard, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from vlp.eval.synthetic import ModelDoesNotFit, evaluate
    from vlp.formats.export import export_model
    from vlp.formats.featureset import feature_parts
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM
    from vlp.precompute import run_precompute
    from vlp.train import TrainConfig, TrainSetupError
    from vlp.train.trainer import check_inputs

    out = tmp_path / "px"
    s = run_precompute(_cfg(shard, out, mode="pixels"), log=lambda *_: None)
    assert s["samples_ok"] == 2 and s["samples_failed"] == 0
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp["mode"] == "pixels" and fp["encoder"]["path"] == "preset:tiny-clip" and fp["encoder"]["hidden_size"] == 64
    rows = {r["key"]: r for p in feature_parts(str(out)) for r in pq.read_table(p).to_pylist()}
    assert rows["clip"]["shape"] == [[8, 3, 224, 224]] and rows["still"]["shape"] == [[1, 3, 224, 224]]
    # exactly the decode stage's frames (what the encoder would have normalised and encoded)
    read = [r for r in ReadShard()({"shard": "px", "uri": str(shard)}) if r["kind"] == "sample"]
    dec = {r["key"]: r for r in batch_rows(DecodeFrames(SamplingConfig(), DecodeConfig(), 224)(rows_batch(read)))}
    for key in ("clip", "still"):
        block = decode_features(rows[key]["features"][0], rows[key]["shape"][0])
        assert block.dtype == np.uint8
        want = np.frombuffer(dec[key]["frames"][0], np.uint8).reshape(block.shape)
        assert np.array_equal(block, want), key

    train = validate(TrainConfig, {"run_name": "t", "data": {"sets": [{"uri": str(out)}]}})
    with pytest.raises(TrainSetupError, match="output.mode=pixels"):
        check_inputs(train)
    torch.manual_seed(0)
    exp = export_model(VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64})), AutoTokenizer.from_pretrained(
        resolve_model_path("preset:tiny-tokenizer")), tmp_path / "export", extra={"template": "vicuna_v1", **{
            k: fp[k] for k in ("encoder", "sampling", "preprocess")}, "feature_mode": "valley_pooled"})
    with pytest.raises(ModelDoesNotFit, match="output.mode=pixels holds frames for a model that runs its vision tower: set model.tower"):
        evaluate(str(exp), str(out))
