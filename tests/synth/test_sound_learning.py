"""The audio path learns, in small and in-process (no Ray): tones whose pitch names a word, cut and fbank'd by the
precompute featurizer, encoded by the demo's audio tower (tiny-ast-synth), tokenised with their <audio> item and
trained through the recipe's step (one gloo rank, DeepSpeed). Asked about held-out tones, the model names the word
with their audio and is at chance without it. The demo measures the same at full size (docs/training.md)."""

from __future__ import annotations

import json

import numpy as np
import torch

from featrows import tokenise
from media_makers import audio_bytes
from vlp.config import validate
from vlp.data.audio import AudioConfig, AudioFeaturizer
from vlp.models.audio_towers import build_audio_tower
from vlp.synth.shards import SOUND_QUESTION, WORDS
from vlp.train import TrainConfig

TOWER = "preset:tiny-ast-synth"


def tones(rng: np.random.Generator, n: int) -> list[tuple[str, bytes]]:
    """n (word, wav bytes): each word's pitch jittered by up to 3%, random length, loudness and a little noise."""
    out = []
    for i in range(n):
        word = list(WORDS)[i % len(WORDS)]
        t = np.arange(int(16000 * rng.uniform(0.6, 1.2))) / 16000
        wave = rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * WORDS[word] * rng.uniform(0.97, 1.03) * t)
        wave = wave + rng.normal(0, 0.01, t.size)
        out.append((word, audio_bytes(wave[None].astype(np.float32), 16000)))
    return out


def feature_rows(items: list[tuple[str, bytes]]) -> list[dict]:
    """What precompute writes for one-audio-item samples: fp16 (segments, tokens, D_a) blocks + a conversation."""
    featurizer = AudioFeaturizer(AudioConfig(segment_seconds=1.28), TOWER)
    tower = build_audio_tower({"type": "ast", "path": TOWER})
    rows = []
    for i, (word, data) in enumerate(items):
        f = tower.features(torch.from_numpy(featurizer(data).fbank)).to(torch.float16).numpy()  # (1, 62, 64)
        q, a = SOUND_QUESTION
        conv = [{"from": "human", "value": f"<audio>\n{q}"}, {"from": "gpt", "value": a.format(word=word)}]
        rows.append({"uid": f"s:{i}", "word": word, "modalities": ["audio"], "media_type": "audio",
                     "features": [f.tobytes()], "shape": [np.asarray(f.shape)], "mode": "valley_pooled",
                     "num_frames": [f.shape[0]], "format": "conversation", "caption": "",
                     "conversations": json.dumps(conv)})
    return rows


def tokenised(rows: list[dict], model: dict) -> list[dict]:
    from vlp.train.data import Tokenize

    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "word"}
    return tokenise(cols, Tokenize("preset:tiny-llama", "vicuna_v1", 256, "skip", model))


def accuracy(model, tok, rows: list[dict], hear: bool) -> float:
    from vlp.eval.synthetic import score_answers

    q, a = SOUND_QUESTION
    answers = [a.format(word=w) for w in WORDS]
    right = 0
    for r in rows:
        feats = [torch.from_numpy(np.frombuffer(r["features"][0], np.float16).reshape(r["shape"][0]).astype(
            np.float32))] if hear else None
        scores = score_answers(model, tok, "vicuna_v1", f"<audio>\n{q}" if hear else q, answers, feats,
                               "valley_pooled", [1] if hear else [], ["audio"] if hear else None)
        right += list(WORDS)[int(np.argmax(scores))] == r["word"]
    return right / len(rows)


def test_a_model_names_the_word_a_tone_means_and_is_at_chance_without_the_tone(one_rank, tmp_path):
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path
    from conftest import recipe_on_one_rank
    from vlp.train.recipe import micro_batches, take_group

    rng = np.random.default_rng(0)
    train, heldout = feature_rows(tones(rng, 64)), feature_rows(tones(rng, 24))
    model = {"vision_hidden_size": 64, "audio_hidden_size": 64, "connector": {"type": "linear"},
             "llm": {"trainable": True}}
    cfg = validate(TrainConfig, {
        "run_name": "sound", "data": {"sets": [{"uri": "unused"}], "template": "vicuna_v1", "max_length": 256},
        "model": model, "optim": {"lr": 3e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        "batch": {"global_size": 16, "micro_size": 16}, "deepspeed": {"zero_stage": 1, "precision": "fp32"},
        "scaling": {"num_workers": 1}})
    run_dir = str(tmp_path / "run")
    recipe = recipe_on_one_rank(cfg, run_dir, 120)
    rows = tokenised(train, model)
    shuffle = np.random.default_rng(1)
    for epoch in range(30):  # 4 steps of 16 per epoch: 120 steps (it named every held-out word by step 48)
        order = [rows[i] for i in shuffle.permutation(len(rows))]
        stream = micro_batches(iter(order), 16, 16, shuffle, False, False, recipe.counters)
        for _ in range(4):
            recipe.train_step(take_group(stream, 1))
    recipe.logs.close()
    net = recipe.engine.module.eval()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-llama"))
    heard, deaf = accuracy(net, tok, heldout, True), accuracy(net, tok, heldout, False)
    print(f"sound word on held-out tones: with the audio item {heard:.2f}, without {deaf:.2f} (chance 0.25)")
    assert heard >= 0.9, (heard, deaf)
    assert deaf <= 0.5, (heard, deaf)  # 24 tones, 6 per word: at best one word's 0.25 plus ties
