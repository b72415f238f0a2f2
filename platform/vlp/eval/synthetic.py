"""Evaluation on the synthetic held-out split: accuracy per question type (colour, shape, direction).

Two measures per question: *choice* accuracy (the answer template filled with each candidate value
is scored by the model's log-likelihood; the best one must be right; chance = 1 / #candidates) and
*generation* accuracy (greedy answer names the right value and no other candidate).

One derived row, ``direction_vs_opposite``: the same direction scores, but the choice is only between the true
direction and its opposite (left/right, up/down; chance 0.5). It isolates temporal *order*: features averaged
over time (pooler ``patch_mean``) are identical for a shape moving left or right along the same path, so they
can show the axis of motion but never its sign.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch

from ..data.conversation import IGNORE_INDEX, prompt_ids, tokenize_conversation
from ..synth.shards import COLORS, DIRECTIONS, OPPOSITE, QUESTIONS, SHAPES
from ..formats.featureset import iter_feature_rows
from ..storage import StorageConfig

CANDIDATES = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS)}


def question_type(question: str) -> Optional[str]:
    q = question.replace("<video>", "").replace("<image>", "").strip()
    return next((k for k, (text, _) in QUESTIONS.items() if text == q), None)


@torch.no_grad()
def score_answers(model, tok, template: str, question: str, answers: list[str], feats, mode: str,
                  num_frames) -> list[float]:
    """Sum of log-probabilities of each answer's tokens given the question and the sample's visual tokens.

    ``feats``: the sample's features, one tensor per media item in placeholder order (with ``num_frames`` one per
    item), one tensor (one number), or None for a text-only sample (see ``VideoLLM.sample_visuals``)."""
    enc = [tokenize_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": a}], tok, template)
           for a in answers]
    visuals = model.sample_visuals(feats, mode, num_frames)  # None, or a list of (N_j, d_model)
    embeds, mask, labels = model.build_inputs([torch.tensor(i) for i, _ in enc], [torch.tensor(l) for _, l in enc],
                                              [visuals] * len(answers))
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()  # (B, L, V)
    logp = torch.log_softmax(logits[:, :-1], -1)  # predict token t+1 from t
    tgt = labels[:, 1:]
    ok = tgt != IGNORE_INDEX
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return (picked * ok).sum(1).tolist()


def evaluate(export_dir: str, feature_uri: str, storage: StorageConfig | None = None,
             max_samples: Optional[int] = None, generate: bool = True, max_new_tokens: int = 12,
             pooler: Optional[str] = None) -> dict:
    from ..models.poolers import POOLERS
    from ..formats.export import load_model

    model, tok, info = load_model(export_dir)
    if pooler:  # evaluate an ablation (e.g. patch_mean) on the same weights
        model.pool = POOLERS.part(pooler)
    template = info.prompt_template(str(export_dir))
    per: dict[str, dict] = {k: {"n": 0, "choice_correct": 0, "gen_correct": 0} for k in CANDIDATES}
    order = {"n": 0, "choice_correct": 0}
    examples = []
    for i, row in enumerate(iter_feature_rows(feature_uri, storage)):
        if max_samples is not None and i >= max_samples:
            break
        meta = json.loads(row["meta"]) if row["meta"] else {}
        conv = json.loads(row["conversations"]) if row["conversations"] else []
        feats = [torch.from_numpy(f.astype(np.float32)) for f in row["features"]] or None  # one per item
        nf = [int(t) for t in row["num_frames"]]
        placeholder = "".join(f"<{m}>" for m in row["modalities"]) + "\n" if row["modalities"] else ""
        for turn in conv:
            if turn["from"] != "human":
                continue
            qtype = question_type(turn["value"])
            if qtype is None or qtype not in meta:
                continue
            q = placeholder + QUESTIONS[qtype][0]
            truth = meta[qtype]
            cands = CANDIDATES[qtype]
            answers = [QUESTIONS[qtype][1].format(**{**{k: meta.get(k, "") for k in CANDIDATES}, qtype: c}) for c in cands]
            scores = score_answers(model, tok, template, q, answers, feats, row["mode"], nf)
            choice = cands[int(np.argmax(scores))]
            st = per[qtype]
            st["n"] += 1
            st["choice_correct"] += int(choice == truth)
            if qtype == "direction" and truth in OPPOSITE:
                order["n"] += 1
                order["choice_correct"] += int(scores[cands.index(truth)] > scores[cands.index(OPPOSITE[truth])])
            gen_text = ""
            if generate:
                ids = torch.tensor(prompt_ids([{"from": "human", "value": q}], tok, template))
                out = list(model.generate(ids, feats, row["mode"], nf, max_new_tokens=max_new_tokens,
                                          eos_token_id=tok.eos_token_id))
                gen_text = tok.decode(out, skip_special_tokens=True)
                named = [c for c in cands if c in gen_text.lower().split() or c + "." in gen_text.lower().split()]
                st["gen_correct"] += int(named == [truth])
            if len(examples) < 12:
                examples.append({"uid": row["uid"], "question": QUESTIONS[qtype][0], "truth": truth, "choice": choice,
                                 "generated": gen_text})
    by_type = {}
    for k, st in per.items():
        if st["n"]:
            by_type[k] = {"n": st["n"], "choice_acc": st["choice_correct"] / st["n"],
                          "gen_acc": st["gen_correct"] / st["n"] if generate else None,
                          "chance": 1 / len(CANDIDATES[k])}
    if order["n"]:
        by_type["direction_vs_opposite"] = {"n": order["n"], "choice_acc": order["choice_correct"] / order["n"],
                                            "gen_acc": None, "chance": 0.5}
    return {"export": str(export_dir), "features": feature_uri, "pooler": pooler or model.cfg.pooler.type,
            "by_type": by_type, "examples": examples}
