"""VideoLLM: poolers, connectors, splicing visual tokens into mixed batches, generation."""

from __future__ import annotations

import pytest
import torch

from vlp.config import ConfigError, validate
from vlp.data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX, tokenize_conversation
from vlp.models.videollm import POOLERS, ModelConfig, VideoLLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))


def test_poolers_agree_between_frames_and_prepooled():
    T, P, D = 4, 256, 8
    frames = torch.randn(T, 1 + P, D, generator=torch.Generator().manual_seed(0))
    pooled = POOLERS.part("valley")(frames, "frames", T)
    assert pooled.shape == (P + T, D)
    assert torch.allclose(pooled[:P], frames[:, 1:].mean(0)) and torch.equal(pooled[P:], frames[:, 0])
    assert torch.equal(POOLERS.part("valley")(pooled, "valley_pooled", T), pooled)
    pm = POOLERS.part("patch_mean")
    assert torch.allclose(pm(frames, "frames", T), pm(pooled, "valley_pooled", T))
    assert pm(frames, "frames", T).shape == (P, D)
    # patch_mean is blind to frame order; valley is not
    rev = frames.flip(0)
    # (summed in another order: equal up to float rounding, which allclose's default atol=1e-8 is too tight for
    # near zero; it failed on an unseeded draw)
    torch.testing.assert_close(pm(rev, "frames", T), pm(frames, "frames", T), rtol=1e-5, atol=1e-6)
    assert not torch.equal(POOLERS.part("valley")(rev, "frames", T), pooled)
    assert POOLERS.part("none")(frames, "frames", T).shape == (T * P, D)
    with pytest.raises(ValueError, match="output.mode=frames"):
        POOLERS.part("none")(pooled, "valley_pooled", T)


def test_parts_frozen_explicitly(model):
    assert all(not p.requires_grad for p in model.llm.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    m2 = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "connector": {"type": "mlp2x_gelu"},
                                         "llm": {"trainable": True}}))
    assert all(p.requires_grad for p in m2.llm.parameters()) and isinstance(m2.connector, torch.nn.Sequential)


def test_bad_types_fail_at_config_load():
    with pytest.raises(ConfigError) as ei:
        validate(ModelConfig, {"vision_hidden_size": 64, "pooler": {"type": "avg"}, "connector": {"type": "qformer"}})
    assert {p for p, _ in ei.value.problems} == {"pooler.type", "connector.type"}


def test_mixed_batch_splices_visual_tokens(model, tok):
    vid = [{"from": "human", "value": "<video>\nWhat color is the shape?"}, {"from": "gpt", "value": "The shape is red."}]
    img = [{"from": "human", "value": "<image>\nWhat shape is shown?"}, {"from": "gpt", "value": "It is a circle."}]
    txt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    enc = [tokenize_conversation(c, tok, "vicuna_v1") for c in (vid, img, txt)]
    ids = [torch.tensor(i) for i, _ in enc]
    labels = [torch.tensor(l) for _, l in enc]
    feats = [torch.randn(256 + 8, 64), torch.randn(256 + 1, 64), None]
    out = model(ids, labels, feats, ["valley_pooled"] * 3, [8, 1, 0])
    assert torch.isfinite(out.loss)
    visuals = [model.visual_tokens(f, "valley_pooled", t) if f is not None else None
               for f, t in zip(feats, [8, 1, 0])]
    embeds, mask, lab = model.build_inputs(ids, labels, visuals)
    lens = [len(ids[0]) - 1 + 264, len(ids[1]) - 1 + 257, len(ids[2])]
    assert embeds.shape[:2] == (3, max(lens)) and mask.sum(1).tolist() == lens
    p = ids[0].tolist().index(VISUAL_TOKEN_INDEX)
    assert torch.allclose(embeds[0, p:p + 264], visuals[0]) and (lab[0, p:p + 264] == IGNORE_INDEX).all()
    # labels after the visual span are the original ones shifted by N - 1
    assert lab[0, p + 264:lens[0]].tolist() == labels[0][p + 1:].tolist()
    assert (lab[2, lens[2]:] == IGNORE_INDEX).all() and (mask[2, lens[2]:] == 0).all()


def test_placeholder_without_features_is_an_error(model, tok):
    ids, labels = tokenize_conversation([{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}],
                                        tok, "plain")
    with pytest.raises(ValueError, match="no visual features"):
        model([torch.tensor(ids)], [torch.tensor(labels)], [None], ["valley_pooled"], [8])


def test_generation_greedy_is_deterministic_and_stops_on_eos(model, tok):
    from vlp.data.conversation import prompt_ids

    ids = torch.tensor(prompt_ids([{"from": "human", "value": "<video>\nWhat color?"}], tok, "vicuna_v1"))
    f = torch.randn(264, 64)
    a = list(model.generate(ids, f, "valley_pooled", 8, max_new_tokens=6))
    b = list(model.generate(ids, f, "valley_pooled", 8, max_new_tokens=6))
    assert a == b and 0 < len(a) <= 6
    # the greedy path equals argmax of a full forward pass at each step
    visual = model.visual_tokens(f, "valley_pooled", 8)
    e, m, _ = model.build_inputs([ids], None, [visual])
    first = int(model.llm(inputs_embeds=e, attention_mask=m).logits[0, -1].argmax())
    assert a[0] == first
    g = torch.Generator().manual_seed(0)
    s = list(model.generate(ids, f, "valley_pooled", 8, max_new_tokens=6, do_sample=True, temperature=1.5,
                            top_p=0.9, generator=g))
    assert 0 <= len(s) <= 6
    assert list(model.generate(ids, f, "valley_pooled", 8, max_new_tokens=6, eos_token_id=a[0])) == []


def test_lora_export_merges_adapters_and_reloads(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    from vlp.formats.export import export_model, load_model

    torch.manual_seed(0)
    m = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}))
    m.llm = get_peft_model(m.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in m.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # make the adapters matter
    ids = torch.tensor(tokenize_conversation([{"from": "human", "value": "<video>\nWhat color?"},
                                              {"from": "gpt", "value": "red"}], tok, "vicuna_v1")[0])
    f = torch.randn(264, 64)
    before = m([ids], None, [f], ["valley_pooled"], [8]).logits
    export_model(m, tok, tmp_path / "exp", extra={"template": "vicuna_v1"})
    loaded, _, info = load_model(tmp_path / "exp")
    assert not any("lora" in k for k in loaded.llm.state_dict())  # merged, plain HF weights
    after = loaded([ids], None, [f], ["valley_pooled"], [8]).logits
    assert torch.allclose(before, after, atol=1e-4) and info.template == "vicuna_v1"


def _enc(tok, conv):
    ids, labels = tokenize_conversation(conv, tok, "vicuna_v1")
    return torch.tensor(ids), torch.tensor(labels)


def test_two_images_spliced_in_order(model, tok):
    ids, labels = _enc(tok, [{"from": "human", "value": "<image>\nand\n<image>\nWhich is brighter?"},
                             {"from": "gpt", "value": "The first."}])
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(256 + 1, 64, generator=g), torch.randn(256 + 1, 64, generator=g)]  # (P + T, D), T = 1
    va, vb = (model.visual_tokens(f, "valley_pooled", 1) for f in feats)  # (257, d_model) each
    embeds, mask, lab = model.build_inputs([ids], [labels], [[va, vb]])
    pa, pb = (ids == VISUAL_TOKEN_INDEX).nonzero().flatten().tolist()
    text = model.llm.get_input_embeddings()(ids.clamp(min=0))  # (L, d_model)
    n = 257
    assert embeds.shape[1] == len(ids) - 2 + 2 * n and mask.all()
    # text, image a, the text between, image b (shifted by a's N - 1), the rest
    assert torch.equal(embeds[0, :pa], text[:pa]) and torch.equal(embeds[0, pa:pa + n], va)
    qb = pb + n - 1
    assert torch.equal(embeds[0, pa + n:qb], text[pa + 1:pb]) and torch.equal(embeds[0, qb:qb + n], vb)
    assert torch.equal(embeds[0, qb + n:], text[pb + 1:])
    # labels: masked on both visual spans, the answer's labels unchanged after them
    assert (lab[0, pa:pa + n] == IGNORE_INDEX).all() and (lab[0, qb:qb + n] == IGNORE_INDEX).all()
    assert lab[0, qb + n:].tolist() == labels[pb + 1:].tolist() and lab[0, :pa].tolist() == labels[:pa].tolist()
    # swapping the features swaps the spans: the order is the placeholders' order
    swapped, _, _ = model.build_inputs([ids], None, [[vb, va]])
    assert torch.equal(swapped[0, pa:pa + n], vb) and torch.equal(swapped[0, qb:qb + n], va)
    # forward takes the same as a list of features, with num_frames per item
    out = model([ids], [labels], [feats], ["valley_pooled"], [[1, 1]])
    assert torch.isfinite(out.loss)
    ref = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=lab)
    torch.testing.assert_close(out.loss, ref.loss)


def test_text_only_in_a_mixed_batch_with_several_items(model, tok):
    two = _enc(tok, [{"from": "human", "value": "<video>\nthen\n<image>\nSame shape?"}, {"from": "gpt", "value": "Yes."}])
    one = _enc(tok, [{"from": "human", "value": "<video>\nWhat color?"}, {"from": "gpt", "value": "Red."}])
    txt = _enc(tok, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}])
    ids, labels = [two[0], one[0], txt[0]], [two[1], one[1], txt[1]]
    feats = [[torch.randn(256 + 8, 64), torch.randn(256 + 1, 64)], torch.randn(256 + 8, 64), None]
    out = model(ids, labels, feats, ["valley_pooled", "valley_pooled", "valley_pooled"], [[8, 1], 8, 0])
    assert torch.isfinite(out.loss)
    visuals = [model.sample_visuals(f, "valley_pooled", t) for f, t in zip(feats, [[8, 1], 8, 0])]
    embeds, mask, lab = model.build_inputs(ids, labels, visuals)
    lens = [len(ids[0]) - 2 + 264 + 257, len(ids[1]) - 1 + 264, len(ids[2])]
    assert mask.sum(1).tolist() == lens
    # the text-only sample is its own embeddings and labels, then padding
    text = model.llm.get_input_embeddings()(ids[2])
    assert torch.equal(embeds[2, :lens[2]], text) and lab[2, :lens[2]].tolist() == labels[2].tolist()
    assert (lab[2, lens[2]:] == IGNORE_INDEX).all() and (embeds[2, lens[2]:] == 0).all()
    # every label is an answer token or IGNORE_INDEX; the visual spans (264 + 257 rows) are all ignored
    n_lab = [int((labels[i] != IGNORE_INDEX).sum()) for i in range(3)]
    assert [(lab[i] != IGNORE_INDEX).sum().item() for i in range(3)] == n_lab
    # a list of one block equals the single-tensor form
    a, _, _ = model.build_inputs([ids[1]], None, [visuals[1]])
    b, _, _ = model.build_inputs([ids[1]], None, [[visuals[1]]])
    assert torch.equal(a, b)


@pytest.mark.parametrize("conv,feats,nf,match", [
    ("<image> <image>", [torch.zeros(257, 64)], [1], r"sample 1 has 2 visual placeholder\(s\) but 1 visual feature block"),
    ("<image>", [torch.zeros(257, 64)] * 2, [1, 1], r"sample 1 has 1 visual placeholder\(s\) but 2 visual feature block"),
    ("Hi", torch.zeros(257, 64), 1, r"sample 1 has 0 visual placeholder\(s\) but 1 visual feature block"),
    ("<image> <image>", None, 0, r"sample 1 has 2 visual placeholder\(s\) but no visual features"),
    ("<image> <image>", [torch.zeros(257, 64)] * 2, 1, "sample 1: 2 feature blocks need as many num_frames"),
    ("<image> <image>", [torch.zeros(257, 64)] * 2, [1], "sample 1: 2 feature blocks need as many num_frames"),
])
def test_placeholder_and_visual_counts_must_match(model, tok, conv, feats, nf, match):
    good = _enc(tok, [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "x"}])
    bad = _enc(tok, [{"from": "human", "value": conv}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match=match):
        model([good[0], bad[0]], [good[1], bad[1]], [torch.zeros(264, 64), feats], ["valley_pooled"] * 2, [8, nf])


def test_a_visual_block_of_the_wrong_width_is_refused(model, tok):
    ids, _ = _enc(tok, [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ValueError, match=r"sample 0 visual block 0 has shape \(3, 7\), not \(N, "):
        model.build_inputs([ids], None, [[torch.zeros(3, 7)]])


def test_generation_with_several_items_and_text_only(model, tok):
    from vlp.data.conversation import prompt_ids

    ids = torch.tensor(prompt_ids([{"from": "human", "value": "<video>\n<image>\nSame?"}], tok, "vicuna_v1"))
    feats = [torch.randn(264, 64), torch.randn(257, 64)]
    a = list(model.generate(ids, feats, "valley_pooled", [8, 1], max_new_tokens=4))
    visuals = [model.visual_tokens(f, "valley_pooled", t) for f, t in zip(feats, [8, 1])]
    e, m, _ = model.build_inputs([ids], None, [visuals])
    assert 0 < len(a) <= 4 and a[0] == int(model.llm(inputs_embeds=e, attention_mask=m).logits[0, -1].argmax())
    text = torch.tensor(prompt_ids([{"from": "human", "value": "Hi"}], tok, "vicuna_v1"))
    t = list(model.generate(text, None, max_new_tokens=3))
    assert t[0] == int(model.llm(input_ids=text[None]).logits[0, -1].argmax())
    with pytest.raises(ValueError, match="but no visual features"):
        list(model.generate(ids, None, max_new_tokens=1))


def test_the_attention_kernel_is_the_configured_one_and_gives_the_same_logits(tok):
    ids = [torch.tensor(tokenize_conversation([{"from": "human", "value": "<video>\nWhat?"},
                                               {"from": "gpt", "value": "A circle."}], tok, "vicuna_v1")[0])]
    feats = [torch.randn(8 + 16, 32, generator=torch.Generator().manual_seed(0))]  # (P + T, D) valley_pooled
    logits = {}
    for kernel in ("sdpa", "eager"):
        torch.manual_seed(0)
        m = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 32, "llm": {"attn_implementation": kernel}})).eval()
        assert m.llm.config._attn_implementation == kernel
        with torch.no_grad():
            logits[kernel] = m(ids, None, [feats[0]], ["valley_pooled"], [8]).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-4, rtol=1e-4)


def test_flash_attention_without_the_package_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ConfigError, match="llm.attn_implementation.*flash-attn"):
        validate(ModelConfig, {"llm": {"attn_implementation": "flash_attention_2"}})
