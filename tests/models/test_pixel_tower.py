"""``model.tower``: a vision tower inside the VideoLLM, run on pixel rows (output.mode pixels). Its features are the
frozen precompute tower's on the same frames; token counts agree with the forward; a trained tower gets gradients
(with and without gradient checkpointing, and zero ones on a text-only batch); the export saves it where
transformers and vlp load it back."""

from __future__ import annotations

import json

import pytest
import torch

from vlp.config import ConfigError, validate
from vlp.data.conversation import VISUAL_TOKEN_INDEX
from vlp.data.preprocess import CLIP_MEAN, CLIP_STD, normalize
from vlp.models.pixel_tower import features_shape, tower_problems
from vlp.models.videollm import ModelConfig, VideoLLM, feature_mode_problems, visual_token_count

T, S = 2, 224


def cfg(**tower) -> ModelConfig:
    return validate(ModelConfig, {"vision_hidden_size": 64, "pooler": {"type": "valley"},
                                  "tower": {"path": "preset:tiny-clip", **tower}})


def pixels(seed: int = 0, t: int = T) -> torch.Tensor:
    return torch.randint(0, 256, (t, 3, S, S), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_the_model_tower_makes_the_frozen_towers_features_and_counts_its_tokens(tiny_clip_path):
    from vlp.models.towers import build_vision_tower

    torch.manual_seed(0)
    model = VideoLLM(cfg(trainable=False)).eval()
    px = pixels()
    frozen = build_vision_tower({"path": "preset:tiny-clip", "device": "cpu", "dtype": "float32"})
    want = frozen.features(normalize(px, CLIP_MEAN, CLIP_STD))  # what precompute stores as frames
    with torch.no_grad():
        got = model.tower(px.float())  # pixel rows reach the model as float
    assert got.shape == (T, 1 + 256, 64) and torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        via_pixels = model.visual_tokens(px.float(), "pixels", T)
        via_frames = model.visual_tokens(want, "frames", T)
    assert torch.allclose(via_pixels, via_frames, atol=1e-5)
    assert visual_token_count(model.cfg, (T, 3, S, S), "pixels", T) == via_pixels.shape[0] == 256 + T
    assert features_shape(model.cfg.tower, (T, 3, S, S)) == (T, 257, 64)
    with pytest.raises(ValueError, match=r"is not \(T, 3, 224, 224\)"):
        features_shape(model.cfg.tower, (T, 3, 112, 112))
    with pytest.raises(ValueError, match="need a model with model.tower"):
        VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64})).visual_tokens(px.float(), "pixels", T)


def _loss_and_grads(model: VideoLLM, feats) -> dict[str, torch.Tensor]:
    ids = torch.tensor([1, VISUAL_TOKEN_INDEX, 5, 6, 7]) if feats is not None else torch.tensor([1, 5, 6, 7])
    out = model([ids], [ids.clamp(min=0)], [feats], ["pixels"], [[T] if feats is not None else []], [None])
    model.zero_grad()
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.tower.named_parameters() if p.grad is not None}


def test_a_trainable_tower_gets_gradients_with_and_without_checkpointing(tiny_clip_path):
    torch.manual_seed(0)
    plain = VideoLLM(cfg(trainable=True))
    torch.manual_seed(0)
    ckpt = VideoLLM(cfg(trainable=True, gradient_checkpointing=True))
    names = [n for n, p in plain.tower.named_parameters() if p.requires_grad]
    # hidden state -2 of 2 layers is layer 0's output: layer 1 and the final norm are frozen (nothing depends on them)
    late = [n for n, p in plain.tower.named_parameters() if not p.requires_grad]
    assert late and all("layers.1." in n or "post_layernorm" in n for n in late)
    assert all("layers.1." not in n and "post_layernorm" not in n for n in names)
    assert ckpt.tower.encoder.is_activation_checkpointing and not plain.tower.encoder.is_activation_checkpointing
    px = [pixels().float()]
    g1, g2 = _loss_and_grads(plain.train(), px), _loss_and_grads(ckpt.train(), px)
    assert set(g1) == set(names) and all(g1[n].abs().sum() > 0 for n in names)  # every trained one moves
    assert set(g1) == set(g2) and all(torch.allclose(g1[n], g2[n], atol=1e-6) for n in g1)
    # a text-only micro-batch: every trainable tower parameter still gets a (zero) gradient (ZeRO's buckets)
    g0 = _loss_and_grads(plain, None)
    assert set(g0) == set(names) and all(g.abs().sum() == 0 for g in g0.values())
    frozen = VideoLLM(cfg(trainable=False))
    assert not any(p.requires_grad for p in frozen.tower.parameters())


def test_the_export_saves_the_trained_tower_and_loads_it_back(tiny_clip_path, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel

    from vlp.formats.export import export_model, load_model, probe_logits
    from vlp.models.presets import resolve_model_path
    from vlp.online import OnlineEncoder

    torch.manual_seed(0)
    model = VideoLLM(cfg(trainable=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    with torch.no_grad():
        for p in model.tower.parameters():
            p.add_(0.01 * torch.randn_like(p))  # "trained"
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    enc = {"type": "clip", "path": "preset:tiny-clip", "layer": -2, "hidden_size": 64, "image_size": S}
    out = export_model(model, tok, tmp_path / "export", extra={
        "template": "vicuna_v1", "feature_mode": "pixels", "encoder": enc, "sampling": {"num_frames": T},
        "preprocess": {"size": S, "mean": [0.5] * 3, "std": [0.25] * 3}})
    info = json.loads((out / "vlp_model.json").read_text())
    assert info["model"]["tower"]["path"] == str(out / "tower") and info["model"]["tower"]["trainable"] is False
    hf = CLIPVisionModel.from_pretrained(out / "tower")  # transformers loads the trained tower as such
    assert torch.equal(hf.embeddings.patch_embedding.weight,
                       model.tower.encoder.embeddings.patch_embedding.weight)
    assert list(CLIPImageProcessorPil.from_pretrained(out / "tower").image_std) == [0.25] * 3
    back, _, _ = load_model(out)
    assert back.tower.mean == (0.5, 0.5, 0.5) and back.tower.std == (0.25, 0.25, 0.25)
    ids = [1, VISUAL_TOKEN_INDEX, 5]
    probe = {"input_ids": ids, "shape": [[T, 3, S, S]], "mode": "pixels", "num_frames": [T], "modalities": ["video"]}
    assert torch.allclose(probe_logits(model, probe), probe_logits(back, probe), atol=1e-5)
    # stage 2 starts from it: model.tower.init_from (the export or its tower/ folder), frozen
    for src in (out, out / "tower"):
        nxt = VideoLLM(cfg(trainable=False, init_from=str(src)))
        assert all(torch.equal(a, b) for a, b in zip(nxt.tower.parameters(), model.tower.parameters()))
    assert "no tower at" in tower_problems(cfg(init_from=str(tmp_path)).tower, S, 64)[0]
    online = OnlineEncoder(back_info(out), str(out), "cpu", back.tower)  # chat and infer encode with it
    assert online.tower is None and online.geom.std == (0.25, 0.25, 0.25)
    px = pixels(1)
    with torch.no_grad():
        assert torch.allclose(online.frames(px), back.tower(px.float()))


def back_info(out):
    from vlp.formats.export import ExportInfo

    return ExportInfo.read(out)


def test_modes_and_tower_problems_are_named(tiny_clip_path):
    from vlp.models.poolers import POOLERS

    with_tower = cfg()
    assert feature_mode_problems(with_tower, ["pixels"]) == []
    assert "this one has output.mode=frames" in feature_mode_problems(with_tower, ["pixels", "frames"])[0]
    plain = validate(ModelConfig, {"vision_hidden_size": 64})
    assert "set model.tower" in feature_mode_problems(plain, ["pixels"])[0]
    assert feature_mode_problems(plain, ["pixels"], POOLERS.part("patch_mean"))  # eval's ablation pooler too
    assert tower_problems(with_tower.tower, S, 64) == []
    bad = tower_problems(validate(ModelConfig, {"tower": {"layer": 7}}).tower, 112, 32)
    assert len(bad) == 3 and "takes 224 px frames" in bad[0] and "64-wide" in bad[1] and "model.tower.layer=7" in bad[2]
    with pytest.raises(ConfigError) as e:
        validate(ModelConfig, {"tower": {"type": "siglip", "std": [0, 1, 1], "size": 3}})
    assert "model.tower.type" in str(e.value) or "tower.type" in str(e.value)
    assert "std must be positive" in str(e.value) and "size" in str(e.value)
