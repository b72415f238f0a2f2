"""model.frame_times=text / text_before: each video frame's time as text after (before) its tokens (LEGO's
grounding). The marks are the LLM's own embeddings of the time text, put beside each frame's group of tokens
(Valley's CLS tokens, or a frame's patches); images, audio and frame_times=none are unchanged; the count made
before any feature loads is the forward's; a layout that mixes frames is refused at setup, one line per problem.
No Ray."""

from __future__ import annotations

import pytest
import torch

from vlp.config import validate
from vlp.models.videollm import (ModelConfig, VideoLLM, frame_mark_ids, frame_time_marks, frame_times_problems,
                                 visual_token_count)

D, P, T = 48, 9, 4  # vision width, patches per frame, frames


@pytest.fixture(scope="module")
def llm():
    from transformers import AutoModelForCausalLM

    from vlp.models.presets import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("preset:tiny-llama"))


def model_cfg(frame_times: str = "text", **kw) -> ModelConfig:
    return validate(ModelConfig, {"vision_hidden_size": D, "connector": {"type": "mlp2x_gelu"},
                                  "frame_times": frame_times, **kw})


def test_the_marks_are_each_frames_start_as_a_fraction_of_the_clip():
    assert frame_time_marks(4) == ["0.00", "0.25", "0.50", "0.75"]
    assert frame_time_marks(8)[1] == "0.12" and len(frame_time_marks(16)) == 16


@pytest.mark.parametrize("where", ["text", "text_before"])
def test_each_frames_time_text_comes_after_or_before_its_cls_token(llm, where):
    torch.manual_seed(0)
    with_marks = VideoLLM(model_cfg(where), llm=llm)
    plain = VideoLLM(model_cfg("none"), llm=llm)
    plain.connector.load_state_dict(with_marks.connector.state_dict())
    feats = torch.randn(P + T, D)  # valley_pooled: P time-averaged patches, then T CLS tokens
    base = plain.visual_tokens(feats, "valley_pooled", T)  # (P + T, d)
    got = with_marks.visual_tokens(feats, "valley_pooled", T)
    ids = frame_mark_ids(model_cfg().llm.tokenizer_source(), T)
    assert got.shape[0] == P + T + sum(len(m) for m in ids)
    assert got.shape[0] == visual_token_count(model_cfg(where), (P + T, D), "valley_pooled", T, "video")
    emb = llm.get_input_embeddings()
    assert torch.equal(got[:P], base[:P])
    pos = P
    for t, m in enumerate(ids):
        cls_at, mark_at = (pos, pos + 1) if where == "text" else (pos + len(m), pos)
        assert torch.equal(got[cls_at], base[P + t])  # the frame's CLS token, then its time (or the reverse)
        assert torch.allclose(got[mark_at:mark_at + len(m)], emb(torch.tensor(m))), t
        pos += len(m) + 1
    assert pos == got.shape[0]


def test_frames_mode_puts_the_time_beside_each_frames_patches(llm):
    torch.manual_seed(0)
    cfg = model_cfg(pooler={"type": "none"})
    model = VideoLLM(cfg, llm=llm)
    feats = torch.randn(T, 1 + P, D)  # frames: CLS + P patches per frame; pooler none keeps the patches
    got = model.visual_tokens(feats, "frames", T)
    n_marks = sum(len(m) for m in frame_mark_ids(cfg.llm.tokenizer_source(), T))
    assert got.shape[0] == T * P + n_marks == visual_token_count(cfg, (T, 1 + P, D), "frames", T)


def test_images_and_frame_times_none_are_unchanged(llm):
    torch.manual_seed(0)
    model = VideoLLM(model_cfg(), llm=llm)
    img = torch.randn(P + 1, D)
    assert model.visual_tokens(img, "valley_pooled", 1).shape[0] == P + 1  # T=1: an image, no time
    assert visual_token_count(model_cfg(), (P + T, D), "valley_pooled", T, "image") == P + T
    assert visual_token_count(model_cfg("none"), (P + T, D), "valley_pooled", T, "video") == P + T


def test_layouts_that_mix_frames_are_refused_by_name():
    assert frame_times_problems(model_cfg()) == [] and frame_times_problems(model_cfg("none")) == []
    perceiver = {"type": "perceiver", "num_queries": 3, "num_layers": 1, "hidden_size": 32, "num_heads": 4,
                 "intermediate_size": 40, "max_frames": 8}
    (one,) = frame_times_problems(model_cfg(connector=perceiver))
    assert "model.connector.type=perceiver makes 3 tokens" in one and "mlp2x_gelu" in one
    (two,) = frame_times_problems(model_cfg(pooler={"type": "patch_mean"}))
    assert "model.pooler.type=patch_mean keeps no per-frame tokens" in two
    per_modality = {"type": "per_modality", "image": {"type": "mlp2x_gelu"}, "video": {"type": "mlp2x_gelu"}}
    assert frame_times_problems(model_cfg(connector=per_modality)) == []
