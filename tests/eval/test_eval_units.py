"""vlp eval's scoring on general samples (no Ray): per-item visuals, text-only rows without visuals."""

from __future__ import annotations

import pytest
import torch

from vlp.config import validate


@pytest.fixture(scope="module")
def model_tok():
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM

    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "llm": {"path": "preset:tiny-llama"}})).eval()
    return model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-llama"))


def test_answers_are_scored_with_every_item_of_the_sample_or_none(model_tok):
    from vlp.eval.synthetic import score_answers

    model, tok = model_tok
    g = torch.Generator().manual_seed(1)
    img, vid = torch.randn(257, 64, generator=g), torch.randn(264, 64, generator=g)  # (P + T, D) valley_pooled
    answers = ["It is red.", "It is blue."]
    two = score_answers(model, tok, "vicuna_v1", "<image><video>\nWhat color?", answers, [img, vid], "valley_pooled",
                        [1, 8])
    swapped = score_answers(model, tok, "vicuna_v1", "<image><video>\nWhat color?", answers, [vid[:257], img],
                            "valley_pooled", [1, 8])
    assert len(two) == 2 and all(torch.isfinite(torch.tensor(two))) and two != swapped  # the visuals are used
    one = score_answers(model, tok, "vicuna_v1", "<video>\nWhat color?", answers, [vid], "valley_pooled", [8])
    assert one == score_answers(model, tok, "vicuna_v1", "<video>\nWhat color?", answers, vid, "valley_pooled", 8)
    text = score_answers(model, tok, "vicuna_v1", "What color?", answers, None, "valley_pooled", [])
    assert len(text) == 2 and all(torch.isfinite(torch.tensor(text)))
    with pytest.raises(ValueError, match="2 visual placeholder"):  # features that do not fit the question
        score_answers(model, tok, "vicuna_v1", "<image><video>\nWhat color?", answers, [vid], "valley_pooled", [8])


def test_the_sound_question_and_the_audio_ablation_rows():
    """The sound question is known with its placeholders; ``without="audio"`` withholds exactly the audio items."""
    import numpy as np

    from vlp.eval.synthetic import CANDIDATES, RowVisuals, question_type
    from vlp.synth.shards import WORDS

    assert question_type("<video>\n<audio>\nWhich word does the sound name?") == "sound"
    assert question_type("<video>\nWhat color is the shape?") == "color" and CANDIDATES["sound"] == list(WORDS)
    row = {"features": [np.zeros((12, 4), np.float16), np.ones((1, 5, 4), np.float16)], "num_frames": [4, 1],
           "mode": "valley_pooled", "modalities": ["video", "audio"]}
    full, deaf = RowVisuals.of(row), RowVisuals.of(row, without="audio")
    assert full.modalities == ["video", "audio"] and [f.shape[0] for f in full.feats] == [12, 1]
    assert deaf.modalities == ["video"] and deaf.num_frames == [4] and len(deaf.feats) == 1
    assert RowVisuals.of({**row, "features": row["features"][1:], "num_frames": [1], "modalities": ["audio"]},
                         without="audio").feats is None  # nothing left: asked as text only


def _rows(n: int, grounding: bool = False) -> list[dict]:
    """Feature rows as ``iter_feature_rows`` yields them: videos (T=8), images (T=1) and a text-only row, each
    asked the synthetic questions (or, ``grounding``, one temporal grounding question)."""
    import json

    import numpy as np

    from vlp.synth.shards import QUESTIONS

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        t = (8, 1, 0)[i % 3]
        mods = ["video" if t > 1 else "image"] if t else []
        marks = "".join(f"<{m}>" for m in mods) + "\n" if mods else ""
        if grounding:
            meta = {"grounding": {"task": "temporal_grounding", "span": [1.0, 2.0 + i], "duration": 10.0}}
            conv = [{"from": "human", "value": marks + "When does the shape move?"}]
        else:
            meta = {"color": "red", "shape": "circle", "direction": "left"}
            conv = [t for q, _ in QUESTIONS.values() for t in ({"from": "human", "value": marks + q},
                                                              {"from": "gpt", "value": "x"})]
        rows.append({"uid": f"s/{i}", "media_type": mods[0] if mods else "text", "meta": json.dumps(meta),
                     "conversations": json.dumps(conv), "mode": "valley_pooled", "num_frames": [t] if t else [],
                     "modalities": mods,
                     "features": [rng.standard_normal((256 + t, 64)).astype(np.float16)] if t else []})
    return rows


def test_synthetic_answers_do_not_depend_on_the_batch_size(model_tok):
    """Generation questions are answered batch_size at a time: the same examples and counts for any batch size,
    and each generated answer is what one-at-a-time generate gives."""
    from vlp.data.conversation import prompt_ids
    from vlp.eval.synthetic import RowVisuals, tally_rows

    model, tok = model_tok
    rows = _rows(5)
    one, five = (tally_rows(model, tok, "vicuna_v1", rows, max_new_tokens=6, batch_size=b) for b in (1, 5))
    assert one.examples == five.examples and one.per == five.per and len(one.examples) == 12
    assert len({e["generated"] for e in one.examples}) > 1  # the rows get different answers
    for k in (0, 4, 8):  # a video's, an image's and the text-only row's first question
        e, row = one.examples[k], rows[k // 3]
        vis = RowVisuals.of(row)
        marks = "".join(f"<{m}>" for m in vis.modalities) + "\n" if vis.modalities else ""
        ids = torch.tensor(prompt_ids([{"from": "human", "value": marks + e["question"]}], tok, "vicuna_v1"))
        want = model.generate(ids, vis.feats, vis.mode, vis.num_frames, max_new_tokens=6,
                              eos_token_id=tok.eos_token_id, modalities=vis.modalities)
        assert e["generated"] == tok.decode(list(want), skip_special_tokens=True)
    off = tally_rows(model, tok, "vicuna_v1", rows, generate=False)
    assert [e["generated"] for e in off.examples] == [""] * 12 and off.per["color"]["gen_correct"] == 0


def test_grounding_answers_do_not_depend_on_the_batch_size(model_tok):
    from vlp.eval.grounded import score_rows

    model, tok = model_tok
    rows = _rows(5, grounding=True)
    _, truths, one = score_rows(model, tok, "vicuna_v1", rows, "temporal_grounding", 6, batch_size=1)
    _, _, two = score_rows(model, tok, "vicuna_v1", rows, "temporal_grounding", 6, batch_size=2)
    assert one == two and len(one) == len(truths) == 5 and len({e["answer"] for e in one}) > 1
    _, truths, first = score_rows(model, tok, "vicuna_v1", rows, "temporal_grounding", 6, max_samples=3, batch_size=2)
    assert first == one[:3] and len(truths) == 3
