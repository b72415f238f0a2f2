"""Evaluation on the synthetic held-out split: accuracy per question type (colour, shape, direction).

Two measures per question: *choice* accuracy (the answer template filled with each candidate value
is scored by the model's log-likelihood; the best one must be right; chance = 1 / #candidates) and
*generation* accuracy (greedy answer names the right value and no other candidate; the questions are answered in
batches, ``batch_size`` at a time grouped by prompt length, by ``VideoLLM.generate_grouped``: the same answers as
one at a time).

One derived row, ``direction_vs_opposite``: the same direction scores, but the choice is only between the true
direction and its opposite (left/right, up/down; chance 0.5). It isolates temporal *order*: features averaged
over time (pooler ``patch_mean``) are identical for a shape moving left or right along the same path, so they
can show the axis of motion but never its sign.

A feature set with none of these questions (caption pretraining features, another data set) is refused with
:class:`NothingToScore` rather than reported as an empty table.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import torch

from ..data.conversation import IGNORE_INDEX, PLACEHOLDER_RE, prompt_ids, tokenize_conversation
from ..synth.shards import COLORS, DIRECTIONS, OPPOSITE, QUESTIONS, SHAPES, SOUND_QUESTION, WORDS
from ..errors import UserError
from ..formats.featureset import FeatureSetLayout, Fingerprint, iter_feature_rows
from ..models.videollm import Prompt
from ..storage import StorageConfig
from .common import LENGTH_GROUPS


class NotAFeatureSet(UserError):
    """``--features`` names a missing folder or one that is not a feature set."""


class ModelDoesNotFit(UserError):
    """The feature set holds items the model was not trained to take (audio for a model without audio, pixels
    for a model that takes tower features)."""


class NothingToScore(UserError):
    """The feature set holds no question eval knows how to score (no colour/shape/direction question)."""


CANDIDATES = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS), "sound": list(WORDS)}
ASKED = {**QUESTIONS, "sound": SOUND_QUESTION}  # question type -> (question, answer template)
TRUTH_KEY = {"sound": "word"}  # the sample metadata key holding a type's answer (default: the type's name)


def question_type(question: str) -> Optional[str]:
    q = PLACEHOLDER_RE.sub("", question).strip()
    return next((k for k, (text, _) in ASKED.items() if text == q), None)


@torch.no_grad()
def score_answers(model, tok, template: str, question: str, answers: list[str], feats, mode: str,
                  num_frames, modalities=None) -> list[float]:
    """Sum of log-probabilities of each answer's tokens given the question and the sample's visual tokens.

    ``feats``: the sample's features, one tensor per media item in placeholder order (with ``num_frames`` one per
    item), one tensor (one number), or None for a text-only sample, ``modalities`` like ``num_frames`` or None
    (see ``VideoLLM.sample_visuals``)."""
    enc = [tokenize_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": a}], tok, template)
           for a in answers]
    visuals = model.sample_visuals(feats, mode, num_frames, modalities=modalities)  # None, or [(N_j, d_model)]
    embeds, mask, labels = model.build_inputs([torch.tensor(i) for i, _ in enc], [torch.tensor(l) for _, l in enc],
                                              [visuals] * len(answers))
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()  # (B, L, V)
    logp = torch.log_softmax(logits[:, :-1], -1)  # predict token t+1 from t
    tgt = labels[:, 1:]
    ok = tgt != IGNORE_INDEX
    picked = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, L-1)
    return (picked * ok).sum(1).tolist()


@dataclass
class Tally:
    """Counts per question type, the order row, examples, and what the feature set held (for a refusal)."""

    per: dict = field(default_factory=lambda: {k: {"n": 0, "choice_correct": 0, "gen_correct": 0}
                                               for k in CANDIDATES})
    order: dict = field(default_factory=lambda: {"n": 0, "choice_correct": 0})
    examples: list = field(default_factory=list)
    rows: int = 0
    media: Counter = field(default_factory=Counter)
    other_questions: Counter = field(default_factory=Counter)

    def by_type(self, generate: bool) -> dict:
        out = {}
        for k, st in self.per.items():
            if st["n"]:
                out[k] = {"n": st["n"], "choice_acc": st["choice_correct"] / st["n"],
                          "gen_acc": st["gen_correct"] / st["n"] if generate else None,
                          "chance": 1 / len(CANDIDATES[k])}
        if self.order["n"]:
            out["direction_vs_opposite"] = {"n": self.order["n"], "choice_acc": self.order["choice_correct"] /
                                            self.order["n"], "gen_acc": None, "chance": 0.5}
        return out

    def nothing_scored(self, uri: str) -> str:
        """Why there is no table: what the feature set holds, and which questions eval scores."""
        held = (f"{self.rows} sample(s) ({', '.join(f'{n} {m}' for m, n in sorted(self.media.items()))})" if self.rows
                else "no committed samples")
        asked = (f"; its questions are e.g. {', '.join(repr(q) for q, _ in self.other_questions.most_common(3))}"
                 if self.other_questions else "; none of them has a question")
        scored = ", ".join(f"{k} ({text!r})" for k, (text, _) in ASKED.items())
        return (f"feature set {uri} holds no question vlp eval can score: {held}{asked}. vlp eval scores the "
                f"synthetic held-out questions {scored} with the sample's colour/shape/direction in its metadata "
                "(a feature set precomputed from vlp make-shards' heldout-*.tar)")


@dataclass
class RowVisuals:
    """A feature row's visuals, converted once for all its questions."""
    feats: Optional[list[torch.Tensor]]  # one (T, 1 + P, D) or (N, D) block per item; None for text-only
    num_frames: list[int]
    mode: str
    modalities: Optional[list[str]] = None

    @classmethod
    def of(cls, row: dict, without: Optional[str] = None) -> "RowVisuals":
        """The row's items, less those of modality ``without`` (the ablation: the same model not given them)."""
        keep = [i for i, m in enumerate(row["modalities"]) if m != without]
        return cls([torch.from_numpy(row["features"][i].astype(np.float32)) for i in keep] or None,
                   [int(row["num_frames"][i]) for i in keep], row["mode"], [str(row["modalities"][i]) for i in keep])


@dataclass
class Asked:
    """A question whose greedy answer waits for its batch (:meth:`Pending.flush`)."""
    prompt: Prompt
    qtype: str
    truth: str
    example: Optional[dict]  # the tally's example to show the answer in, if it is one


@dataclass
class Pending:
    """Generation questions gathered until ``batch_size`` x ``length_groups`` of them are answered, ``batch_size``
    at a time grouped by prompt length (:meth:`VideoLLM.generate_grouped`); the answers are scored into ``tally``
    exactly as one at a time (the same greedy tokens)."""
    model: Any
    tok: Any
    tally: Tally
    max_new_tokens: int
    batch_size: int = 16
    length_groups: int = LENGTH_GROUPS
    asked: list = field(default_factory=list)

    def add(self, a: Asked) -> None:
        self.asked.append(a)
        if len(self.asked) >= self.batch_size * self.length_groups:
            self.flush()

    def flush(self) -> None:
        """Answer every waiting question and score whether it names the right value and no other candidate."""
        out = self.model.generate_grouped([a.prompt for a in self.asked], self.batch_size,
                                          max_new_tokens=self.max_new_tokens, eos_token_id=self.tok.eos_token_id)
        for a, toks in zip(self.asked, out):
            text = self.tok.decode(toks, skip_special_tokens=True)
            words = text.lower().split()
            named = [c for c in CANDIDATES[a.qtype] if c in words or c + "." in words]
            self.tally.per[a.qtype]["gen_correct"] += int(named == [a.truth])
            if a.example is not None:
                a.example["generated"] = text
        self.asked = []


def score_question(model, tok, template: str, row: dict, vis: RowVisuals, qtype: str, tally: Tally,
                   pending: Optional[Pending]) -> None:
    """Choice scores of one known question about one row, added to ``tally``; with ``pending``, its generation
    question is queued there (scored when its batch is answered)."""
    meta = json.loads(row["meta"]) if row["meta"] else {}
    feats, nf = vis.feats, vis.num_frames
    placeholder = "".join(f"<{m}>" for m in vis.modalities) + "\n" if vis.modalities else ""
    q = placeholder + ASKED[qtype][0]
    key = TRUTH_KEY.get(qtype, qtype)
    truth = meta[key]
    cands = CANDIDATES[qtype]
    answers = [ASKED[qtype][1].format(**{**{TRUTH_KEY.get(k, k): meta.get(TRUTH_KEY.get(k, k), "") for k in
                                            CANDIDATES}, key: c}) for c in cands]
    scores = score_answers(model, tok, template, q, answers, feats, vis.mode, nf, vis.modalities)
    choice = cands[int(np.argmax(scores))]
    st = tally.per[qtype]
    st["n"] += 1
    st["choice_correct"] += int(choice == truth)
    if qtype == "direction" and truth in OPPOSITE:
        tally.order["n"] += 1
        tally.order["choice_correct"] += int(scores[cands.index(truth)] > scores[cands.index(OPPOSITE[truth])])
    example = None
    if len(tally.examples) < 12:
        example = {"uid": row["uid"], "question": ASKED[qtype][0], "truth": truth, "choice": choice, "generated": ""}
        tally.examples.append(example)
    if pending is not None:
        ids = torch.tensor(prompt_ids([{"from": "human", "value": q}], tok, template))
        pending.add(Asked(Prompt(ids, feats, vis.mode, nf, vis.modalities), qtype, truth, example))


def tally_rows(model, tok, template: str, rows: Iterable[dict], generate: bool = True, max_new_tokens: int = 12,
               without: Optional[str] = None, batch_size: int = 16) -> Tally:
    """Every known question of ``rows`` (feature rows) scored: choice scores row by row, greedy answers
    ``batch_size`` questions at a time (``generate``)."""
    tally = Tally()
    pending = Pending(model, tok, tally, max_new_tokens, batch_size) if generate else None
    for row in rows:
        tally.rows += 1
        tally.media[row["media_type"]] += 1
        meta = json.loads(row["meta"]) if row["meta"] else {}
        conv = json.loads(row["conversations"]) if row["conversations"] else []
        vis = None
        for turn in conv:
            if turn["from"] != "human":
                continue
            qtype = question_type(turn["value"])
            if qtype is None or TRUTH_KEY.get(qtype, qtype) not in meta:
                tally.other_questions[PLACEHOLDER_RE.sub("", turn["value"]).strip()] += 1
                continue
            vis = vis or RowVisuals.of(row, without)
            score_question(model, tok, template, row, vis, qtype, tally, pending)
    if pending is not None:
        pending.flush()
    return tally


def check_feature_set(uri: str, storage: StorageConfig | None) -> None:
    """NotAFeatureSet when ``uri`` is missing or has no fingerprint.json."""
    layout = FeatureSetLayout(uri, storage)
    fs, root = layout.fs()
    if not fs.exists(root):
        raise NotAFeatureSet(f"feature set {uri} does not exist")
    if Fingerprint.read(layout) is None:
        raise NotAFeatureSet(f"{uri} is not a feature set (it has no fingerprint.json); make one with vlp precompute")


def evaluate(export_dir: str, feature_uri: str, storage: StorageConfig | None = None,
             max_samples: Optional[int] = None, generate: bool = True, max_new_tokens: int = 12,
             pooler: Optional[str] = None, without: Optional[str] = None, batch_size: int = 16) -> dict:
    """Accuracy per question type of the export on the feature set's known questions; NothingToScore when it
    has none (a caption-only set, another data set), NotAFeatureSet / NotAnExport for wrong paths. ``without``: a
    modality whose items are withheld from the model (e.g. ``audio``: the sound ablation). ``batch_size``:
    questions answered per batched generation (the answers do not depend on it)."""
    from ..models.poolers import POOLERS
    from ..formats.export import load_model
    from ..models.videollm import feature_mode_problems

    model, tok, info = load_model(export_dir)
    check_feature_set(feature_uri, storage)
    fp = Fingerprint.read(FeatureSetLayout(feature_uri, storage))
    if fp.audio is not None and model.cfg.audio_hidden_size is None and without != "audio":
        raise ModelDoesNotFit(f"feature set {feature_uri} holds audio items (audio tower {fp.audio.path}) but the "
                              f"model {export_dir} was trained without audio; evaluate it with --without audio")
    if pooler:  # evaluate an ablation (e.g. patch_mean) on the same weights
        model.pool = POOLERS.part(pooler)
    problems = feature_mode_problems(model.cfg, [fp.mode], model.pool, [f"feature set {feature_uri}"])
    if problems:  # e.g. pixels for a model without a tower
        raise ModelDoesNotFit("; ".join(problems))
    template = info.prompt_template(str(export_dir))
    rows = itertools.islice(iter_feature_rows(feature_uri, storage), max_samples)
    tally = tally_rows(model, tok, template, rows, generate, max_new_tokens, without, batch_size)
    if not any(st["n"] for st in tally.per.values()):
        raise NothingToScore(tally.nothing_scored(feature_uri))
    return {"export": str(export_dir), "features": feature_uri, "pooler": pooler or model.cfg.pooler.type,
            "without": without, "by_type": tally.by_type(generate), "examples": tally.examples}
