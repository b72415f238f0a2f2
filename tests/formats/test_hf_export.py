"""`vlp export --format llava-hf`: transformers' own LlavaForConditionalGeneration and AutoProcessor load the export
offline and give vlp's logits and greedy answers; the chat templates give vlp's token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.cli import main
from vlp.data.conversation import TEMPLATES, Template, chat_template_problems, prompt_ids
from vlp.data.preprocess import normalize, resize_crop

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))


def make_export(out, tok, connector: str, pooler: str = "none", template: str = "vicuna_v1"):
    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.videollm import ModelConfig, VideoLLM

    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "pooler": {"type": pooler},
                                            "connector": {"type": connector}}))
    export_model(model, tok, out, extra={
        "template": template, "feature_mode": "frames",
        "encoder": {"type": "clip", "path": "preset:tiny-clip", "layer": -2, "hidden_size": 64, "image_size": 224},
        "sampling": {"mode": "uniform", "num_frames": 8, "fps": 1.0, "max_frames": 32},
        "preprocess": {"size": 224, "pad_to_square": True}})
    return out


def picture() -> np.ndarray:
    """(64, 96, 3) uint8: noise with a red block (not square: the padding is exercised)."""
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3)).astype(np.uint8)
    img[10:40, 20:60] = [200, 30, 30]
    return img


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chatml"])
def test_chat_templates_give_vlp_ids(tok, template):
    assert TEMPLATES.get(template).chat_template
    assert chat_template_problems(tok, template, {tok.convert_tokens_to_ids("<image>")}) == []


def test_a_chat_template_that_differs_is_caught(tok):
    t, name = TEMPLATES.get("vicuna_v1"), "vicuna_v1_no_space_test"
    if name not in TEMPLATES.names():
        TEMPLATES.register(name)(Template(name, t.render, t.chat_template.replace("' ASSISTANT:'", "'ASSISTANT:'")))
    problems = chat_template_problems(tok, name, {tok.convert_tokens_to_ids("<image>")})
    assert problems and "differ from vlp's" in problems[0]


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "linear"])
def test_llava_hf_export_gives_vlp_logits_and_answers(tmp_path, tok, connector):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlp.formats.export import load_model
    from vlp.online import OnlineEncoder

    src = make_export(tmp_path / "run" / "export", tok, connector)
    assert main(["export", "--model", str(tmp_path / "run"), "--format", "llava-hf", "--out",
                 str(tmp_path / "hf")]) == 0  # a run folder: its export/
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    proc = AutoProcessor.from_pretrained(tmp_path / "hf", local_files_only=True)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    inp = proc(images=Image.fromarray(picture()), text=proc.apply_chat_template(msgs, add_generation_prompt=True),
               return_tensors="pt", add_special_tokens=False)

    model, vtok, info = load_model(src)
    enc = OnlineEncoder(info, str(src))
    u8 = resize_crop(picture()[None], 224, True, enc.geom.mean)  # (1, 3, 224, 224), vlp's preprocessing
    pixels = normalize(u8, enc.geom.mean, enc.geom.std)
    # The PIL processor resizes like vlp to within one level of 255 (vlp's torch kernel vs PIL's)
    assert (pixels - inp["pixel_values"]).abs().max() <= 1.5 / 255 / min(enc.geom.std)
    ids = torch.tensor(prompt_ids([{"from": "human", "value": "<image>\n" + QUESTION}], vtok, "vicuna_v1"))
    feats = enc.frames(u8)  # (1, 1 + 256, 64)
    with torch.no_grad():
        ours = model([ids], None, [[feats]], ["frames"], [[1]], [["image"]]).logits[0]  # (L, V)
        same_pixels = hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], pixel_values=pixels)
        end_to_end = hf(**inp).logits[0]
    assert ours.shape == same_pixels.logits[0].shape  # 256 image tokens where vlp splices 256 patch tokens
    torch.testing.assert_close(same_pixels.logits[0], ours, atol=1e-5, rtol=0)  # the same computation
    torch.testing.assert_close(end_to_end, ours, atol=2e-2, rtol=0)  # + the processor's one-level differences
    answer = list(model.generate(ids, [feats], "frames", [1], max_new_tokens=12, eos_token_id=vtok.eos_token_id,
                                 modalities=["image"]))
    theirs = hf.generate(**inp, max_new_tokens=12, do_sample=False)[0, inp["input_ids"].shape[1]:].tolist()
    assert theirs[:len(answer)] == answer and len(answer) > 0


def test_an_added_placeholder_token_never_wins_greedy(tok):
    from transformers import AutoModelForCausalLM

    from vlp.formats import hf
    from vlp.models.presets import resolve_model_path

    llm = AutoModelForCausalLM.from_pretrained(resolve_model_path("preset:tiny-llama"))
    t = type(tok).from_pretrained(tok.name_or_path)
    old = len(t)
    new = hf.with_token(llm, t, "<img>")  # a token the tokenizer lacks
    assert new == old and len(t) == old + 1
    out = llm.get_output_embeddings().weight
    torch.testing.assert_close(out[new], out[:old].mean(0))
    logits = llm(input_ids=torch.tensor([[5, 6, 7]])).logits[0]  # (3, V + 1)
    torch.testing.assert_close(logits[:, new], logits[:, :old].mean(-1), atol=1e-5, rtol=0)
    assert (logits.argmax(-1) != new).all()


def test_llava_hf_refuses_a_model_it_cannot_hold_in_one_line(tmp_path, tok, capsys):
    make_export(tmp_path / "export", tok, "mlp2x_gelu", pooler="valley")
    capsys.readouterr()
    assert main(["export", "--model", str(tmp_path / "export"), "--format", "llava-hf", "--out",
                 str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("vlp export")]  # (transformers' loading bars aside)
    assert "Traceback" not in err and len(lines) == 1
    assert "model.pooler.type=valley" in lines[0] and "LlavaForConditionalGeneration" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_vlp_hf_export_loads_with_auto_classes_and_gives_vlp_logits(tmp_path, tok):
    """A model LLaVA's class cannot hold (the Valley pooler: patch means, then per-frame CLS tokens): `--format hf`
    writes the remote-code export; AutoModelForCausalLM loads it and gives vlp's logits and greedy answers, alone
    and batched with a text-only prompt (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from media_makers import encode, frames_of
    from vlp.chat import ChatSession

    src = make_export(tmp_path / "export", tok, "mlp2x_gelu", pooler="valley")
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "hf_modeling.py").is_file()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, local_files_only=True).eval()
    htok = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True, local_files_only=True)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(encode(frames_of(16)))
    session = ChatSession(str(src))
    kind, pixels = hf.pixels(str(clip))  # (T, 3, S, S), sampled and normalised as vlp's chat does
    _, u8 = session.frames(str(clip))
    assert kind == "video" and pixels.shape[0] == 8
    torch.testing.assert_close(pixels, normalize(u8, session.enc.geom.mean, session.enc.geom.std))

    item = session.encode(str(clip))  # vlp's own: (8, 1 + 256, 64) features
    ids = torch.tensor(prompt_ids([{"from": "human", "value": "<video>\n" + QUESTION}], session.tok, "vicuna_v1"))
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    text_only = [{"role": "user", "content": "Say hello."}]
    batch = htok.apply_chat_template([msgs, text_only], add_generation_prompt=True, tokenize=True, padding=True,
                                     return_dict=True, return_tensors="pt")
    with torch.no_grad():
        ours = session.model([ids], None, [[item.feats]], ["frames"], [[8]], [["video"]]).logits[0]  # (L, V)
        theirs = hf(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                    pixel_values=[[pixels]]).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    answer = list(session.model.generate(ids, [item.feats], "frames", [8], max_new_tokens=10,
                                         eos_token_id=session.tok.eos_token_id, modalities=["video"]))
    alone = hf.generate(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                        pixel_values=[[pixels]], max_new_tokens=10, do_sample=False)[0].tolist()
    both = hf.generate(**batch, pixel_values=[[pixels], None], max_new_tokens=10, do_sample=False).tolist()
    assert alone[:len(answer)] == answer and both[0][:len(answer)] == answer

