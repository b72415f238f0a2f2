"""Audio items in the model: their features (segments, tokens, D_a) skip the pooler, reach a context-taking
connector as segment-"frames" of the audio modality, may be narrower or wider than the vision features (the
perceiver has an input projection per modality; a one-width connector is refused by name), are counted before
any feature is loaded exactly as the forward makes them, and train, export and reload. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featrows import tokenise
from vlp.config import validate
from vlp.models.connectors import CONNECTORS
from vlp.models.videollm import ModelConfig, VideoLLM, feature_widths, item_context, visual_token_count
from vlp.models.poolers import POOLERS
from vlp.train import TrainConfig

D, D_A, P, T = 48, 24, 9, 4  # vision width, audio width, patches per frame, frames
SEG, TOK = 2, 7  # audio segments per item, audio tokens per segment
PERCEIVER = {"type": "perceiver", "num_queries": 3, "num_layers": 2, "hidden_size": 32, "num_heads": 4,
             "intermediate_size": 40, "max_frames": 8}


@pytest.fixture(scope="module")
def llm():
    from transformers import AutoModelForCausalLM

    from vlp.models.presets import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("preset:tiny-llama"))


def model_cfg(connector: dict, audio: int | None = D_A) -> ModelConfig:
    return validate(ModelConfig, {"vision_hidden_size": D, "audio_hidden_size": audio, "connector": connector})


def audio_feats(seed: int = 0, width: int = D_A) -> torch.Tensor:
    return torch.randn(SEG, TOK, width, generator=torch.Generator().manual_seed(seed))  # (segments, tokens, D_a)


def test_the_perceiver_takes_audio_of_its_own_width_with_its_own_queries(llm):
    torch.manual_seed(0)
    model = VideoLLM(model_cfg(PERCEIVER), llm=llm)
    assert model.connector.inp["audio"][1].in_features == D_A and model.connector.inp["video"][1].in_features == D
    a = model.visual_tokens(audio_feats(), "valley_pooled", SEG, "audio")
    assert a.shape == (3, 64)
    assert visual_token_count(model.cfg, (SEG, TOK, D_A), "valley_pooled", SEG, "audio") == 3
    ctx = item_context(POOLERS.part(model.cfg.pooler), (SEG, TOK, D_A), "valley_pooled", SEG, "audio")
    assert (ctx.modality, ctx.num_frames, ctx.tokens_per_frame) == ("audio", SEG, TOK)  # segments are its frames
    assert not torch.allclose(a, model.visual_tokens(audio_feats(1), "valley_pooled", SEG, "audio"))
    a.sum().backward()
    assert model.connector.inp["audio"][1].weight.grad.abs().sum() > 0
    assert model.connector.queries["audio"].grad.abs().sum() > 0
    assert model.connector.queries["video"].grad is None  # only the audio queries were used


def test_a_one_width_connector_takes_audio_only_of_the_vision_width(llm):
    mlp = {"type": "mlp2x_gelu"}
    assert CONNECTORS.part(validate(ModelConfig, {"connector": mlp}).connector).width_problems(
        feature_widths(model_cfg(mlp))) == [
        "model.connector.type=mlp2x_gelu takes features of one width, but they differ (image 48, video 48, audio "
        "24); use a connector with an input projection per modality (perceiver)"]
    with pytest.raises(ValueError, match="takes features of one width"):
        VideoLLM(model_cfg(mlp), llm=llm)
    model = VideoLLM(model_cfg(mlp, audio=D), llm=llm)  # same width: the segments' tokens, projected one by one
    assert model.visual_tokens(audio_feats(width=D), "valley_pooled", SEG, "audio").shape == (SEG * TOK, 64)
    assert visual_token_count(model.cfg, (SEG, TOK, D), "valley_pooled", SEG, "audio") == SEG * TOK
    with pytest.raises(ValueError, match=r"audio features must be \(segments, tokens, D\)"):
        model.visual_tokens(torch.zeros(SEG * TOK, D), "valley_pooled", SEG, "audio")


def tokenised_rows(model: dict, n: int) -> list[dict]:
    """n tokenised /2 rows: audio only; a video + its soundtrack; text only (conversations, template plain)."""
    from vlp.train.data import Tokenize

    rng = np.random.default_rng(0)
    kinds = [("audio",), ("video", "audio"), ()]
    items = [kinds[i % 3] for i in range(n)]
    shapes = {"video": [P + T, D], "audio": [SEG, TOK, D_A]}
    question = {("audio",): "<audio>\nWhat pitch?", ("video", "audio"): "<video> <audio> Same?", (): "Hello?"}
    cols = {"uid": [f"s0:u{i}" for i in range(n)], "modalities": [list(its) for its in items],
            "media_type": [its[0] if len(its) == 1 else "mixed" if its else "text" for its in items],
            "features": [[rng.standard_normal(shapes[m]).astype(np.float16).tobytes() for m in its] for its in items],
            "shape": [[np.asarray(shapes[m]) for m in its] for its in items], "mode": ["valley_pooled"] * n,
            "num_frames": [[T if m == "video" else SEG for m in its] for its in items], "format": ["conversation"] * n,
            "caption": [""] * n,
            "conversations": [json.dumps([{"from": "human", "value": question[its]},
                                          {"from": "gpt", "value": "A high tone."}]) for its in items]}
    return tokenise(cols, Tokenize("preset:tiny-llama", "plain", 256, "skip", model))


def test_audio_rows_train_one_step_export_and_reload(one_rank, tmp_path):
    from vlp.formats.export import load_model, probe_logits
    from conftest import recipe_on_one_rank
    from vlp.train.recipe import micro_batches, take_group

    model = {"vision_hidden_size": D, "audio_hidden_size": D_A, "connector": PERCEIVER}
    cfg = validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused"}], "template": "plain", "max_length": 256},
        "model": model, "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 3, "micro_size": 3}, "deepspeed": {"zero_stage": 2, "precision": "fp32"},
        "scaling": {"num_workers": 1}})
    run_dir = str(tmp_path / "run")
    recipe = recipe_on_one_rank(cfg, run_dir, 1)
    rows = tokenised_rows(model, 3)
    assert [r["skip"] for r in rows] == [""] * 3
    text = [len(r["input_ids"]) - len(r["modalities"]) for r in rows]  # each placeholder -> 3 query tokens
    assert [int(r["length"]) for r in rows] == [t + 3 * len(r["modalities"]) for t, r in zip(text, rows)]
    conn = recipe.engine.module.connector
    before = conn.inp["audio"][1].weight.detach().clone()
    stream = micro_batches(iter(rows), 3, 3, np.random.default_rng(0), True, False, recipe.counters)
    stats = recipe.train_step(take_group(stream, cfg.batch.grad_accum))
    assert stats.samples == 3 and np.isfinite(stats.loss)
    assert not torch.equal(before, conn.inp["audio"][1].weight.detach())  # the audio projection learned
    recipe.logs.close()
    recipe.export(recipe.gather_counters())
    loaded, _, _ = load_model(f"{run_dir}/export")
    assert loaded.cfg.audio_hidden_size == D_A
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    torch.testing.assert_close(probe_logits(loaded, summary["probe"]), torch.tensor(summary["probe"]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_every_trainable_connector_parameter_gets_a_gradient_each_step(llm):
    """A micro-batch with only audio leaves the perceiver's image/video queries and projections unused; they still
    get a (zero) gradient, so ZeRO reduces the same buckets on every rank (a rank with videos and one without
    crashed the 2-worker demo with the perceiver: gloo aborted on collectives of different sizes)."""
    torch.manual_seed(0)
    model = VideoLLM(model_cfg(PERCEIVER), llm=llm)
    ids = torch.tensor([1, 5, -200, 7, 8])  # one placeholder (VISUAL_TOKEN_INDEX)
    out = model.forward([ids], [ids.clamp(min=0)], [[audio_feats()]], ["valley_pooled"], [[SEG]], [["audio"]])
    out.loss.backward()
    params = dict(model.connector.named_parameters())
    assert all(p.grad is not None for p in params.values()), [n for n, p in params.items() if p.grad is None]
    assert params["queries.video"].grad.abs().sum() == 0 and params["queries.audio"].grad.abs().sum() > 0


def test_zero3_partitioned_parameters_are_not_touched(llm):
    """Under ZeRO-3 a large parameter's data is empty outside its module's forward (DeepSpeed marks it ds_id):
    indexing it would fail on the first step, so the touch skips such parameters."""
    torch.manual_seed(0)
    model = VideoLLM(model_cfg(PERCEIVER), llm=llm)
    for p in model.connector.parameters():
        p.ds_id = 0
        p.data = torch.empty(0)
    embeds = torch.randn(1, 3, 64, requires_grad=True)
    assert model.touch_trainable(embeds) is embeds


def test_a_tower_layer_that_is_no_hidden_state_is_refused_when_built():
    """Both tower kinds load through towers.load_frozen, whose layer check names the config key."""
    from vlp.models.audio_towers import build_audio_tower
    from vlp.models.towers import build_vision_tower

    with pytest.raises(ValueError, match=r"vision_tower.layer=5 out of range for a 2-layer tower \(hidden states "
                                         r"-3..2\)"):
        build_vision_tower({"type": "clip", "path": "preset:tiny-clip", "layer": 5})
    with pytest.raises(ValueError, match=r"audio_tower.layer=-4 out of range for a 2-layer tower"):
        build_audio_tower({"type": "ast", "path": "preset:tiny-ast", "layer": -4})
    assert build_audio_tower({"type": "ast", "path": "preset:tiny-ast", "layer": -3}).layer == -3
