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
