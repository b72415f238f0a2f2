"""The learnable-query connectors, ``abstractor`` (mPLUG-Owl's visual abstractor) and ``perceiver`` (ChatBridge's
Q-Former bridge): their token counts equal what their forward makes for every pooler, feature mode and modality
(``visual_token_count`` is what tokenisation reserves before any feature is loaded), the item context the
VideoLLM hands them (modality, frames, tokens per frame) changes what they make, gradients reach every parameter,
bad sizes fail at config load by dotted path, and a tiny VideoLLM trains, exports and reloads with each. No Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featrows import tokenise
from vlp.config import ConfigError, validate
from vlp.data.conversation import VISUAL_TOKEN_INDEX
from vlp.models.connectors import CONNECTORS, ItemContext
from vlp.models.connectors.blocks import FramePositions
from vlp.models.poolers import POOLERS
from vlp.models.videollm import ModelConfig, VideoLLM, item_context, visual_token_count
from vlp.train import TrainConfig

D, T, P = 48, 4, 9  # vision width (the connectors' width is 32: an input projection), frames, patches per frame
D_MODEL = 64  # preset:tiny-llama
SMALL = {
    "abstractor": {"type": "abstractor", "num_queries": 5, "num_layers": 2, "hidden_size": 32, "num_heads": 4,
                   "intermediate_size": 40, "max_frames": 8},
    "abstractor_temporal": {"type": "abstractor", "num_queries": 5, "num_layers": 2, "hidden_size": 32,
                            "num_heads": 4, "intermediate_size": 40, "max_frames": 8, "temporal_queries": True},
    "perceiver": {"type": "perceiver", "num_queries": 3, "num_layers": 3, "hidden_size": 32, "num_heads": 4,
                  "intermediate_size": 40, "max_frames": 8},
}
OUT = {"abstractor": 6, "abstractor_temporal": 6, "perceiver": 3}  # 5 queries + the end token; 3 queries
# (pooler, feature mode, modality, frames): every pooler and both feature modes, videos and images
CASES = [("valley", "valley_pooled", "video", T), ("valley", "frames", "video", T), ("none", "frames", "video", T),
         ("patch_mean", "valley_pooled", "video", T), ("valley", "valley_pooled", "image", 1),
         ("none", "frames", "image", 1), ("patch_mean", "frames", "image", 1)]


def feats(mode: str, t: int, seed: int = 0) -> torch.Tensor:
    """One item's stored features: (t, 1 + P, D) frames or (P + t, D) valley_pooled."""
    shape = (t, 1 + P, D) if mode == "frames" else (P + t, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llm():
    from transformers import AutoModelForCausalLM

    from vlp.models.presets import resolve_model_path

    return AutoModelForCausalLM.from_pretrained(resolve_model_path("preset:tiny-llama"))


def model_of(llm, conn: str, pooler: str = "valley", **over) -> VideoLLM:
    torch.manual_seed(0)
    cfg = validate(ModelConfig, {"vision_hidden_size": D, "pooler": {"type": pooler},
                                 "connector": {**SMALL[conn], **over}})
    return VideoLLM(cfg, llm=llm)


@pytest.mark.parametrize("conn", list(SMALL))
@pytest.mark.parametrize("pooler,mode,modality,t", CASES)
def test_token_count_is_the_forward_length(llm, conn, pooler, mode, modality, t):
    model = model_of(llm, conn, pooler)
    f = feats(mode, t)
    out = model.visual_tokens(f, mode, t, modality)  # (N, D) pooled -> (M, d_model)
    assert out.shape == (OUT[conn], D_MODEL) and torch.isfinite(out).all()
    assert visual_token_count(model.cfg, list(f.shape), mode, t, modality) == OUT[conn]
    assert visual_token_count(model.cfg, list(f.shape), mode, t) == OUT[conn]  # modality left to T


def test_item_context_is_the_pooler_layout():
    """What a connector is told of an item's pooled tokens: which of them belong to which frame."""
    cases = {("none", "frames"): P, ("valley", "frames"): 1, ("valley", "valley_pooled"): 1,
             ("patch_mean", "frames"): 0, ("patch_mean", "valley_pooled"): 0}
    for (pooler, mode), per_frame in cases.items():
        part, f = POOLERS.part(pooler), feats(mode, T)
        ctx = item_context(part, f.shape, mode, T)
        assert ctx == ItemContext("video", T, per_frame)
        n = part(f, mode, T).shape[0]  # (N, D)
        assert ctx.shared_tokens(n) == {"none": 0, "valley": P, "patch_mean": P}[pooler]
    assert item_context(POOLERS.part("valley"), (P + 1, D), "valley_pooled", 1).modality == "image"
    assert item_context(POOLERS.part("valley"), (P + 1, D), "valley_pooled", 1, "audio").modality == "audio"
    with pytest.raises(ValueError, match="cannot hold 4 frames x 3 tokens per frame"):
        ItemContext("video", 4, 3).shared_tokens(11)


def _module(conn: str, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return CONNECTORS.part({**SMALL[conn], **over}).build(D, D_MODEL)


@pytest.mark.parametrize("conn", ["abstractor", "perceiver"])
def test_frame_positions_make_frame_order_matter(conn):
    """Attention over the vision tokens is blind to their order; the learned frame positions are what tell a
    clip from its reverse (the `none` pooler's T x P patch tokens, and Valley's per-frame CLS tokens)."""
    frames = feats("frames", T)  # (T, 1 + P, D)
    rev = frames.flip(0)
    for pooler, mode in (("none", "frames"), ("valley", "frames")):
        part = POOLERS.part(pooler)
        x, x_rev = part(frames, mode, T), part(rev, mode, T)  # (N, D) each
        ctx = item_context(part, frames.shape, mode, T)
        blind, seeing = _module(conn, frame_positions=False), _module(conn)
        with torch.no_grad():
            for m in seeing.modules():
                if isinstance(m, FramePositions):
                    m.table.normal_()  # (max_frames, width), zero at init
        torch.testing.assert_close(blind(x, ctx), blind(x_rev, ctx), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(seeing(x, ctx), seeing(x_rev, ctx), atol=1e-3)


@pytest.mark.parametrize("conn", ["abstractor", "perceiver"])
def test_an_item_longer_than_max_frames_fails_naming_it(conn):
    m = _module(conn)
    part = POOLERS.part("none")
    f = feats("frames", 9)
    with pytest.raises(ValueError, match=r"a video of 9 frames is longer than the connector's max_frames=8"):
        m(part(f, "frames", 9), item_context(part, f.shape, "frames", 9))
    out = _module(conn, frame_positions=False)(part(f, "frames", 9), item_context(part, f.shape, "frames", 9))
    assert out.shape[0] == OUT[conn]


def test_temporal_queries_join_only_items_of_several_frames():
    """mPLUG-Owl video's temporal queries: added to the output of a video, unused for an image (T == 1)."""
    m = _module("abstractor_temporal")
    assert {"temporal_queries", "temporal_visual_fc.weight"} <= set(m.state_dict())
    assert not any(k.startswith("temporal") for k in _module("abstractor").state_dict())
    part = POOLERS.part("valley")
    for t, used in ((1, False), (T, True)):
        m.zero_grad()
        f = feats("valley_pooled", t)
        m(part(f, "valley_pooled", t), item_context(part, f.shape, "valley_pooled", t)).sum().backward()
        assert (m.temporal_queries.grad is not None) == used and (m.temporal_visual_fc.weight.grad is not None) == used
        assert m.queries.grad is not None and m.eos.grad is not None


def test_perceiver_has_queries_per_modality():
    m = _module("perceiver")
    part = POOLERS.part("valley")
    x = part(feats("valley_pooled", T), "valley_pooled", T)  # (P + T, D)
    out = {mod: m(x, ItemContext(mod, T, 1)) for mod in ("image", "video", "audio")}  # (3, d_model) each
    assert not torch.allclose(out["image"], out["video"]) and not torch.allclose(out["video"], out["audio"])
    assert {k for k in m.state_dict() if k.startswith("queries.")} == {f"queries.{x}" for x in ("image", "video", "audio")}
    only_video = _module("perceiver", modalities=["video"])
    with pytest.raises(ValueError, match=r"no queries for image items \(model.connector.modalities: video\)"):
        only_video(x, ItemContext("image", T, 1))


def _mixed_batch(conn: str):
    """ids with placeholders (a video; an image and a video; text only), features, modes, frames, modalities."""
    ph, txt = VISUAL_TOKEN_INDEX, list(range(5, 12))
    ids = [torch.tensor(txt[:3] + [ph] + txt), torch.tensor(txt[:2] + [ph] + txt[:3] + [ph] + txt), torch.tensor(txt)]
    fs = [[feats("frames", T, 1)], [feats("frames", 1, 2), feats("frames", T, 3)], None]
    mods = [["video"], ["audio" if conn == "perceiver" else "image", "video"], []]  # audio: the perceiver's queries
    return ids, [i.clamp(min=0) for i in ids], fs, ["frames"] * 3, [[T], [1, T], []], mods


@pytest.mark.parametrize("conn", list(SMALL))
def test_videollm_forward_backward_reaches_every_connector_parameter(llm, conn):
    model = model_of(llm, conn, "none")  # every frame's patches: frame positions on all of them
    ids, labels, fs, modes, nfs, mods = _mixed_batch(conn)
    out = model(ids, labels, fs, modes, nfs, mods)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    missing = [n for n, p in model.connector.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if conn == "perceiver":  # image items are absent from this batch: their queries and projection learn nothing
        assert missing and all(".image" in n for n in missing)
        missing = [n for n in missing if ".image" not in n]
    assert missing == [] and all(p.grad is None for p in model.llm.parameters())
    visuals = [model.sample_visuals(f, m, t, i, x) for i, (f, m, t, x) in enumerate(zip(fs, modes, nfs, mods))]
    _, mask, _ = model.build_inputs(ids, labels, visuals)
    counts = [[visual_token_count(model.cfg, list(f.shape), "frames", t, x) for f, t, x in zip(f_, t_, x_)]
              for f_, t_, x_ in zip([f or [] for f in fs], nfs, mods)]
    assert mask.sum(1).tolist() == [len(i) - len(c) + sum(c) for i, c in zip(ids, counts)]


def test_modalities_reach_the_connector_and_default_from_frames(llm):
    model = model_of(llm, "perceiver")
    ids, labels, fs, modes, nfs, _ = _mixed_batch("perceiver")
    with torch.no_grad():
        named = model(ids, labels, fs, modes, nfs, [["video"], ["image", "video"], []]).loss
        default = model(ids, labels, fs, modes, nfs).loss  # T=1: an image, T=4: a video
        other = model(ids, labels, fs, modes, nfs, [["video"], ["video", "video"], []]).loss
        gen = list(model.generate(ids[1], fs[1], "frames", [1, T], max_new_tokens=2, modalities=["image", "video"]))
    assert torch.equal(named, default) and not torch.equal(named, other) and len(gen) == 2


def _problems(data: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "f"}]}, "model": {"connector": data}})
    return dict(ei.value.problems)


def test_bad_sizes_fail_at_config_load_by_dotted_path():
    probs = _problems({"type": "abstractor", "hidden_size": 100, "num_heads": 16, "num_queries": 0})
    assert probs == {"model.connector.num_heads": "Value error, hidden_size=100 is not a multiple of num_heads=16 "
                                                  "(got 16)",
                     "model.connector.num_queries": "Input should be greater than or equal to 1 (got 0)"}
    probs = _problems({"type": "perceiver", "modalities": ["video", "video"], "cross_attention_every": 0,
                       "num_heads": 5})
    assert set(probs) == {"model.connector.modalities", "model.connector.cross_attention_every",
                          "model.connector.num_heads"}
    assert "a modality is listed twice" in probs["model.connector.modalities"]
    assert "hidden_size=768 is not a multiple of num_heads=5" in probs["model.connector.num_heads"]
    assert set(_problems({"type": "perceiver", "modalities": ["smell"]})) == {"model.connector.modalities[0]"}
    assert set(_problems({"type": "perceiver", "modalities": []})) == {"model.connector.modalities"}
    assert _problems({"type": "abstractor", "temporal": True}) == {"model.connector.temporal": "unknown key"}


@pytest.mark.parametrize("conn", ["abstractor_temporal", "perceiver"])
def test_meta_build_counts_the_parameters_and_an_export_reloads(llm, conn, tmp_path):
    """The trainer's preflight builds the connector on the meta device; an export's connector.safetensors loads
    back into the same module (strict) and makes the same tokens."""
    from transformers import AutoTokenizer

    from vlp.formats.export import export_model, load_model
    from vlp.models.presets import resolve_model_path

    part = CONNECTORS.part(SMALL[conn])
    with torch.device("meta"):
        on_meta = sum(p.numel() for p in part.build(D, D_MODEL).parameters())
    model = model_of(llm, conn)
    assert on_meta == sum(p.numel() for p in model.connector.parameters())
    exp = export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")),
                       tmp_path / "exp", {"template": "plain"})
    loaded, _, _ = load_model(exp)
    f = feats("valley_pooled", T)
    torch.testing.assert_close(loaded.visual_tokens(f, "valley_pooled", T, "video"),
                               model.visual_tokens(f, "valley_pooled", T, "video"))


def _tokenised(model: dict, n: int) -> list[dict]:
    """n tokenised /2 rows in turn: a video, an image + a video, a text-only row (caption data, template plain)."""
    from vlp.train.data import Tokenize

    rng = np.random.default_rng(0)
    kinds = [("video",), ("image", "video"), ()]
    items = [kinds[i % 3] for i in range(n)]
    shapes = {"video": [P + T, D], "image": [P + 1, D]}
    cols = {"uid": [f"s0:u{i}" for i in range(n)], "modalities": [list(its) for its in items],
            "media_type": [its[0] if len(its) == 1 else "mixed" if its else "text" for its in items],
            "features": [[rng.standard_normal(shapes[m]).astype(np.float16).tobytes() for m in its] for its in items],
            "shape": [[np.asarray(shapes[m]) for m in its] for its in items], "mode": ["valley_pooled"] * n,
            "num_frames": [[T if m == "video" else 1 for m in its] for its in items], "format": ["caption"] * n,
            "caption": [f"A red circle moves {'left' if i % 2 else 'right'}." for i in range(n)],
            "conversations": [""] * n}
    return tokenise(cols, Tokenize("preset:tiny-llama", "plain", 256, "skip", model))


def _connector_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.connector.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):  # ZeRO-3: gathered from the partitions
        return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("conn,zero", [("abstractor_temporal", 1), ("perceiver", 3)])
def test_one_training_step_through_the_recipe_and_its_export_reloads(one_rank, conn, zero, tmp_path):
    """Stage-1 style (connector only, DeepSpeed on one gloo rank, no Ray): rows tokenised with the connector's
    count, one step through the recipe (batch_inputs hands the items' modalities to the model), the export reloads
    to the trained model (the probe's logits agree). The perceiver runs under ZeRO-3's engine (parameters this
    small stay whole: below DeepSpeed's stage3_param_persistence_threshold, so nothing is partitioned here)."""
    from vlp.formats.export import load_model, probe_logits
    from conftest import recipe_on_one_rank
    from vlp.train.recipe import micro_batches, take_group

    model = {"vision_hidden_size": D, "connector": SMALL[conn]}
    cfg = validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused"}], "template": "plain", "max_length": 256},
        "model": model, "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 3, "micro_size": 3}, "deepspeed": {"zero_stage": zero, "precision": "fp32"},
        "scaling": {"num_workers": 1}})
    run_dir = str(tmp_path / "run")
    recipe = recipe_on_one_rank(cfg, run_dir, 1)
    rows = _tokenised(model, 3)
    assert [r["skip"] for r in rows] == [""] * 3
    text = [len(r["input_ids"]) - len(r["modalities"]) for r in rows]  # each placeholder -> OUT visual tokens
    assert [int(r["length"]) for r in rows] == [t + OUT[conn] * len(r["modalities"]) for t, r in zip(text, rows)]
    before = _connector_params(recipe.engine)
    stream = micro_batches(iter(rows), 3, 3, np.random.default_rng(0), True, False, recipe.counters)
    stats = recipe.train_step(take_group(stream, cfg.batch.grad_accum))
    assert stats.samples == 3 and np.isfinite(stats.loss)
    after = _connector_params(recipe.engine)
    assert all(not torch.equal(before[k], after[k]) for k in before if "image" not in k and "audio" not in k)
    recipe.logs.close()
    recipe.export(recipe.gather_counters())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    loaded, _, _ = load_model(f"{run_dir}/export")
    assert summary["probe"]["modalities"] in ([], ["video"], ["image", "video"])
    torch.testing.assert_close(probe_logits(loaded, summary["probe"]), torch.tensor(summary["probe"]["logits"]),
                               rtol=1e-4, atol=1e-4)
