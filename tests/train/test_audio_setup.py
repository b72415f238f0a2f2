"""What training checks of audio feature sets before Ray starts (vlp.train.trainer.fill_widths, mixed_encoders):
widths filled from the sets, a connector that cannot take them, a perceiver without audio queries or with too few
frame positions, sets cut with other audio settings, and a stage-1 connector whose weights do not fit. Each is a
line of TrainSetupError instead of a crash in every worker."""

from __future__ import annotations


from vlp.config import validate
from vlp.formats.featureset import (AudioEncoderInfo, EncoderInfo, FeatureSetInfo, Fingerprint, Manifest, Totals)
from vlp.train import TrainConfig
from vlp.train.trainer import fill_widths, mixed_encoders

PERCEIVER = {"type": "perceiver", "num_queries": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2,
             "intermediate_size": 32, "max_frames": 8}


def info(audio_width: int | None = 32, segments: int = 1, items=("video", "audio")) -> FeatureSetInfo:
    audio = {} if audio_width is None else {"audio": AudioEncoderInfo(
        type="ast", path="preset:tiny-ast", layer=-1, hidden_size=audio_width, tokens_per_segment=1214,
        num_mel_bins=128, max_length=1024, decode={"max_segments": segments})}
    fp = Fingerprint(encoder=EncoderInfo(type="clip", path="preset:tiny-clip", layer=-2, hidden_size=64,
                                         image_size=224), mode="valley_pooled",
                     sampling={"mode": "uniform", "num_frames": 8}, **audio)
    return FeatureSetInfo("s", fp, Manifest(totals=Totals(samples_ok=1, items_by_modality={m: 1 for m in items})))


def cfg(connector: dict, **model) -> TrainConfig:
    return validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "s"}]},
                                  "model": {"connector": connector, **model}})


def test_widths_are_filled_from_the_sets_and_checked_against_the_connector():
    c = cfg(PERCEIVER)
    assert fill_widths(c, [info(), info(None, items=("video",))]) == []
    assert (c.model.vision_hidden_size, c.model.audio_hidden_size) == (64, 32)
    assert fill_widths(cfg({"type": "mlp2x_gelu"}), [info()]) == [
        "model.connector.type=mlp2x_gelu takes features of one width, but they differ (image 64, video 64, audio "
        "32); use a connector with an input projection per modality (perceiver)"]
    assert fill_widths(cfg({"type": "linear"}), [info(64)]) == []  # same width: a per-token projector takes it
    assert fill_widths(cfg(PERCEIVER), [info(32), info(48)]) == [
        "data.sets: feature sets have different audio feature widths [32, 48]"]
    assert fill_widths(cfg(PERCEIVER, audio_hidden_size=16), [info()]) == [
        "model.audio_hidden_size=16 does not match the feature set's hidden size 32"]


def test_a_perceiver_without_audio_queries_or_frame_positions_for_the_items_is_refused():
    assert fill_widths(cfg({**PERCEIVER, "modalities": ["image", "video"]}), [info()]) == [
        "model.connector.modalities: the feature sets hold audio items, which the perceiver has no queries for (it "
        "has image, video)"]
    assert fill_widths(cfg({**PERCEIVER, "max_frames": 4}), [info(segments=2)]) == [
        "model.connector.max_frames: the feature sets hold video items of up to 8 frames, more than max_frames=4 "
        "(raise it, or set frame_positions: false)"]
    assert fill_widths(cfg({**PERCEIVER, "max_frames": 8}), [info(segments=12)])[0].startswith(
        "model.connector.max_frames: the feature sets hold audio items of up to 12 segments")
    assert fill_widths(cfg({**PERCEIVER, "max_frames": 4, "frame_positions": False}), [info(segments=12)]) == []
    abstractor = {"type": "abstractor", "num_queries": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2,
                  "intermediate_size": 32, "max_frames": 4}
    assert fill_widths(cfg(abstractor), [info(64, items=("video",))])[0].startswith("model.connector.max_frames")


def test_sets_cut_with_other_audio_settings_are_not_mixed():
    assert mixed_encoders([info(), info(None, items=("video",)), info(segments=1)]) == []
    out = mixed_encoders([info(), info(None, items=("video",)), info(segments=3)])
    assert out == ["data.sets[2]: made with another audio tower or audio cuts than data.sets[0] "
                   "(decode.max_segments: 1 vs 3)"]


def test_stage_one_weights_that_do_not_fit_the_widths_are_refused(tmp_path):
    """A stage-1 perceiver trained without audio features built its audio projection at the vision width: a
    stage 2 on 32-wide audio cannot load it (a size mismatch in every worker, found here instead)."""
    import torch
    from safetensors.torch import save_file

    from vlp.models.connectors import CONNECTORS

    part = CONNECTORS.part(cfg(PERCEIVER).model.connector)
    save_file(part.build_for({"image": 64, "video": 64}, 64).state_dict(), str(tmp_path / "connector.safetensors"))
    c = cfg({**PERCEIVER, "init_from": str(tmp_path)})
    out = fill_widths(c, [info()])
    assert len(out) == 1 and "do not fit this connector (other shapes: inp.audio.0.weight (64,) vs (32,)" in out[0]
    assert fill_widths(cfg({**PERCEIVER, "init_from": str(tmp_path)}), [info(64)]) == []  # same widths: it fits
    assert torch.is_tensor(part.build_for({"image": 64}, 64).queries["audio"])
