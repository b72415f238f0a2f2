"""The ``per_modality`` connector (LEGO's adapter per modality): items routed by modality, each adapter with its own
width and token count (counted as the forward makes them), mixed batches, typed config errors, a state dict that
exports and reloads, and setup problems for items without an adapter."""

from __future__ import annotations

import pytest
import torch

from vlp.config import ConfigError, validate
from vlp.data.conversation import VISUAL_TOKEN_INDEX
from vlp.models.connectors import CONNECTORS, ItemContext
from vlp.models.videollm import ModelConfig, VideoLLM, visual_token_count

D, D_A = 64, 24
LEGO = {"type": "per_modality", "image": {"type": "mlp2x_gelu"},
        "video": {"type": "perceiver", "num_queries": 5, "num_layers": 1, "hidden_size": 32, "num_heads": 4,
                  "intermediate_size": 40, "max_frames": 8, "modalities": ["video"]},
        "audio": {"type": "linear"}}


def cfg(connector=LEGO, audio=D_A) -> ModelConfig:
    return validate(ModelConfig, {"vision_hidden_size": D, "audio_hidden_size": audio, "connector": connector,
                                  "pooler": {"type": "none"}})


def test_items_go_through_their_modalitys_adapter_with_its_own_width_and_tokens():
    torch.manual_seed(0)
    model = VideoLLM(cfg())
    ads = model.connector.adapters
    assert set(ads) == {"image", "video", "audio"}
    assert ads["audio"].weight.shape == (64, D_A) and ads["image"][0].weight.shape == (64, D)
    image = torch.randn(1, 1 + 256, D)   # (T=1, 1 + P, D) frames
    video = torch.randn(4, 1 + 256, D)
    audio = torch.randn(2, 3, D_A)       # (segments, tokens, D_a)
    with torch.no_grad():
        ti = model.visual_tokens(image, "frames", 1, "image")
        tv = model.visual_tokens(video, "frames", 4, "video")
        ta = model.visual_tokens(audio, "frames", 2, "audio")
    assert ti.shape == (256, 64) and tv.shape == (5, 64)  # pooler none: every patch (no CLS) and ta.shape == (6, 64)
    for feats, t, m, out in ((image, 1, "image", ti), (video, 4, "video", tv), (audio, 2, "audio", ta)):
        assert visual_token_count(model.cfg, feats.shape, "frames", t, m) == out.shape[0]
    # a mixed batch: an image sample, a video + audio sample, a text-only sample; every adapter gets a gradient
    ids = [torch.tensor([1, VISUAL_TOKEN_INDEX, 5]), torch.tensor([1, VISUAL_TOKEN_INDEX, VISUAL_TOKEN_INDEX, 6]),
           torch.tensor([1, 7, 8])]
    out = model(ids, [i.clamp(min=0) for i in ids], [[image], [video, audio], None], ["frames"] * 3,
                [[1], [4, 2], []], [["image"], ["video", "audio"], None])
    out.loss.backward()
    assert all(p.grad is not None for p in model.connector.parameters())


def test_an_item_without_an_adapter_is_refused_by_name():
    part = CONNECTORS.part({"type": "per_modality", "image": {"type": "linear"}})
    assert part.item_problems({"image": 1}) == []
    assert "hold video items, which per_modality has no adapter for" in part.item_problems({"video": 8})[0]
    with pytest.raises(ValueError, match="no adapter for video"):
        part.num_tokens(10, ItemContext(modality="video", num_frames=8))
    video_part = CONNECTORS.part(LEGO)
    assert "model.connector.video" in video_part.item_problems({"video": 16})[0]  # over the perceiver's max_frames


@pytest.mark.parametrize("bad,where", [
    ({"type": "per_modality"}, "name at least one adapter"),
    ({"type": "per_modality", "image": {"type": "per_modality", "video": {"type": "linear"}}}, "cannot itself be"),
    ({"type": "per_modality", "image": {"type": "linear", "trainable": False}}, "not on an adapter"),
    ({"type": "per_modality", "image": {"type": "qformer"}}, "unknown connector type"),
])
def test_bad_adapter_configs_are_config_errors(bad, where):
    with pytest.raises(ConfigError, match=where):
        validate(ModelConfig, {"connector": bad})


def test_the_adapters_export_and_load_together(tmp_path):
    from transformers import AutoTokenizer

    from vlp.formats.export import export_model, load_model
    from vlp.models.presets import resolve_model_path

    torch.manual_seed(0)
    model = VideoLLM(cfg())
    exp = export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")),
                       tmp_path / "exp", {"template": "plain"})
    back, _, _ = load_model(exp)
    a, b = model.connector.state_dict(), back.connector.state_dict()
    assert set(a) == set(b) and any(k.startswith("adapters.video.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
