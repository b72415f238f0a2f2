"""Audio items through precompute: decode (PyAV -> 16 kHz mono -> AST fbank segments), the audio tower's features
per item beside the vision tower's, the fingerprint/manifest record of the audio tower, and the error records of
bad audio or of audio without an audio tower. Real files made with PyAV; the tiny AST and CLIP presets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from featrows import feature_rows
from media_makers import audio_bytes, frames_of, shard_file, tone
from vlp.config import ConfigError, validate
from vlp.data.audio import AudioConfig, AudioFeaturizer
from vlp.data.media import DecodeConfig, SamplingConfig
from vlp.data.tario import RawSample
from vlp.models.presets import resolve_model_path
from vlp.precompute.stages import DecodeFrames, EncodeFeatures, ReadShard, batch_rows, rows_batch
from vlp.synth.shards import encode_jpeg

AST_TOKENS = 2 + 12 * 101  # tiny-ast keeps AST's geometry: CLS + distillation token + 12 x 101 patches


def conv(question: str, answer: str = "Yes.") -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}).encode()


def wav(hz: float, seconds: float = 1.0, rate: int = 22050) -> bytes:
    return audio_bytes(tone([hz], seconds, rate), rate)


CLIP = audio_bytes(tone([660.0], 1.0, 48000), 48000, "mp4", "aac", video=frames_of(8))  # a video with a soundtrack
SAMPLES = [
    ("beep", {"wav": wav(440.0), "txt": b"A beep."}),
    ("pair", {"jpg": encode_jpeg(frames_of(1)[0]), "flac": audio_bytes(tone([880.0], 0.5, 16000), 16000, "flac", "flac"),
              "json": conv("<image> and <audio>: same thing?", "No.")}),
    ("movie", {"mp4": CLIP, "json": json.dumps({"videos": ["mp4"], "audios": ["mp4"], "conversations": [
        {"from": "human", "value": "<video>\nWhat do you hear? <audio>"}, {"from": "gpt", "value": "A tone."}]}).encode()}),
    ("silent", {"wav": audio_bytes(np.zeros((1, 8000), np.float32), 16000), "txt": b"Nothing."}),
]


def featurizer(**kw) -> AudioFeaturizer:
    return AudioFeaturizer(AudioConfig(**kw), resolve_model_path("preset:tiny-ast"))


def decode_rows(audio=None, size: int = 32) -> dict[str, dict]:
    rows = [ReadShard().row("s", RawSample(k, m), 0.0) for k, m in SAMPLES]
    stage = DecodeFrames(SamplingConfig(num_frames=4), DecodeConfig(), size, audio=audio)
    return {r["key"]: r for r in batch_rows(stage(rows_batch(rows)))}


def test_decode_makes_fbank_segments_per_audio_item_and_errors_for_bad_audio():
    dec = decode_rows(featurizer(max_segments=2))
    beep = dec["beep"]
    assert beep["kind"] == "sample" and beep["modalities"] == ["audio"] and beep["media_type"] == "audio"
    assert beep["frames_shape"] == ["1,1024,128"] and beep["decoder"] == ["pyav-audio"]  # 1 s: one padded segment
    assert beep["timestamps"] == ["0.0000"] and abs(beep["n_source_frames"][0] - 16000) < 1600
    fb = np.frombuffer(beep["frames"][0], np.float32).reshape(1, 1024, 128)
    assert np.isfinite(fb).all() and fb[0, :90].std() > 0.1  # the tone's frames carry energy, then padding
    assert dec["pair"]["modalities"] == ["image", "audio"] and dec["pair"]["frames_shape"][0] == "1,3,32,32"
    movie = dec["movie"]  # the same mp4 as a video item and as its soundtrack
    assert movie["modalities"] == ["video", "audio"] and movie["frames_shape"] == ["4,3,32,32", "1,1024,128"]
    assert json.loads(movie["conversations"])[0]["value"] == "<video>\nWhat do you hear? <audio>"
    silent = dec["silent"]
    assert silent["kind"] == "error" and silent["stage"] == "decode" and silent["error"] == "item 0 (wav): silent audio"


def test_audio_without_an_audio_tower_is_an_error_record_not_a_crash():
    dec = decode_rows(None)
    assert dec["beep"]["kind"] == "error"
    assert dec["beep"]["error"] == "item 0 (wav): an audio item, but no audio tower is set (encoder.audio_tower)"
    assert dec["pair"]["error"].startswith("item 1 (flac): an audio item")


def test_encode_gives_each_item_its_towers_features_in_placeholder_order():
    dec = decode_rows(featurizer(), size=224)
    rows = [dec[k] for k in ("beep", "pair", "movie")]
    enc = EncodeFeatures({"type": "clip", "path": "preset:tiny-clip"}, "valley_pooled",
                         audio_tower_cfg={"type": "ast", "path": "preset:tiny-ast"})
    out = {r["key"]: r for r in batch_rows(enc(rows_batch(rows)))}
    assert out["beep"]["features_shape"] == [f"1,{AST_TOKENS},64"]
    assert out["pair"]["features_shape"] == ["257,64", f"1,{AST_TOKENS},64"]
    assert out["movie"]["features_shape"] == ["260,64", f"1,{AST_TOKENS},64"]  # 256 patches + 4 CLS; the audio
    beep = np.frombuffer(out["beep"]["features"][0], np.float16)
    pair = np.frombuffer(out["pair"]["features"][1], np.float16)
    assert np.isfinite(beep).all() and not np.allclose(beep, pair, atol=1e-2)  # 440 Hz vs 880 Hz


@pytest.fixture(scope="module")
def audio_shard(tmp_path_factory):
    return shard_file(tmp_path_factory.mktemp("audio") / "audio-00000.tar", SAMPLES)


def test_audio_tower_mistakes_are_config_errors_before_any_work():
    from vlp.precompute.pipeline import plan_stages
    from vlp.precompute import PrecomputeConfig

    cfg = validate(PrecomputeConfig, {"data": {"shards": ["x.tar"], "audio": {"sample_rate": 22050}},
                                      "encoder": {"audio_tower": {"type": "ast"}}, "output": {"uri": "o"}})
    with pytest.raises(ConfigError, match=r"data.audio.sample_rate: 22050 Hz, but the audio tower's feature "
                                          r"extractor \(preset:tiny-ast\) expects 16000 Hz"):
        plan_stages(cfg)
    bad = validate(PrecomputeConfig, {"data": {"shards": ["x.tar"]}, "output": {"uri": "o"},
                                      "encoder": {"audio_tower": {"type": "ast", "layer": 7}}})
    with pytest.raises(ConfigError, match=r"encoder.audio_tower.layer: 7 is out of range for a 2-layer tower"):
        plan_stages(bad)
    clip = validate(PrecomputeConfig, {"data": {"shards": ["x.tar"]}, "output": {"uri": "o"},
                                       "encoder": {"audio_tower": {"type": "ast", "path": "preset:tiny-clip"}}})
    with pytest.raises(ConfigError, match=r"encoder.audio_tower.path: preset:tiny-clip is not an ast audio tower"):
        plan_stages(clip)


@pytest.mark.ray
def test_precompute_writes_audio_items_and_records_the_audio_tower(ray_local, audio_shard, tmp_path):
    from vlp.formats.featureset import read_feature_set
    from vlp.precompute import PrecomputeConfig, run_precompute
    from vlp.precompute.pipeline import FeatureSetMismatch

    spec = {"data": {"shards": [str(audio_shard)], "sampling": {"num_frames": 4}},
            "encoder": {"tower": {"path": "preset:tiny-clip"}, "audio_tower": {"type": "ast"}},
            "output": {"uri": str(tmp_path / "feat")}, "ray": {"progress_bars": False}}
    s = run_precompute(validate(PrecomputeConfig, spec), log=lambda *_: None)
    assert s["samples_ok"] == 3 and s["samples_failed"] == 1
    assert s["items_by_modality"] == {"image": 1, "video": 1, "audio": 3}
    assert s["this_run"]["frames"] == 1 + 4  # audio segments are not frames
    rows = {r["key"]: r for r in feature_rows(str(tmp_path / "feat"))}
    assert rows["movie"]["shape"] == [[260, 64], [1, AST_TOKENS, 64]] and rows["movie"]["num_frames"] == [4, 1]
    assert rows["beep"]["modalities"] == ["audio"] and rows["beep"]["media_type"] == "audio"
    info = read_feature_set(str(tmp_path / "feat"))
    assert info.audio_hidden_size == 64 and info.fingerprint.audio.tokens_per_segment == AST_TOKENS
    assert info.manifest.audio.decode["max_segments"] == 1
    assert info.manifest.format == "vlp-features/3"  # rows with audio items: a reader without audio refuses them
    spec["data"]["audio"] = {"max_segments": 3}  # other audio cuts: not the same features
    with pytest.raises(FeatureSetMismatch, match="holds features made with a different audio"):
        run_precompute(validate(PrecomputeConfig, spec), log=lambda *_: None)


def test_inspect_counts_audio_items_and_names_bad_audio(audio_shard):
    from vlp.inspect_ import inspect_shards

    rep = inspect_shards([str(audio_shard)])
    assert rep["items_by_modality"] == {"audio": 3, "image": 1, "video": 1} and rep["ok"] == 3
    assert rep["media_types"]["audio"] == 3 and rep["media_types"]["video"] == 1
    assert [e["reason"] for e in rep["error_records"]] == ["item 0 (wav): silent audio"]
