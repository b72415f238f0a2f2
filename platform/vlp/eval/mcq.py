"""Multiple-choice video QA by log-likelihood, Video-MME / MVBench style.

Each question is asked about its video (decoded and encoded online as ``vlp chat`` does) with its options listed
(``A. red`` ... one per line, then "Answer with the option's letter from the given choices directly."). Every
option is scored as the assistant's answer ``"{letter}. {text}"``: the model's log-probabilities of that answer
turn's tokens (its text and the template's end-of-turn token) given the video and the question, summed as
``vlp.eval.synthetic.score_answers`` does, then **divided by the number of those tokens** (mean log-probability
per token: length-normalised, so that a long option is not penalised for its length). The best-scoring option is
the model's choice; chance is 1 / #options of each question.

Question fields (both layouts, chosen per row):

- Video-MME (``videomme`` on the Hub, one row per question): ``videoID`` (the file name under ``data/``; else
  ``video_id``), ``question``, ``options`` (a list ``["A. ...", "B. ...", ...]``), ``answer`` (a letter),
  ``task_type``, ``duration``; ``question_id`` names the question.
- MVBench (one JSON file per task): ``video`` (a file name with its extension, relative to the task's video
  folder: pass that folder as the media root), ``question``, ``candidates`` (a list of texts), ``answer`` (the right
  candidate's text).
- Video-MME's per-video layout (``[{video_id, videoID, duration, ..., questions: [{question_id, task_type,
  question, options, answer}]}]``) is flattened: each question inherits its video's fields.
- ``options`` may also be a dict ``{"A": "red", ...}``. A list whose items do not all start with a distinct letter
  (``A.``, ``A)``, ``(A)``) is lettered A, B, ... in order. The answer may be a letter (``A``, ``(A)``, ``A.``),
  an option's text, or the full ``"A. text"``.

Rows per group: ``all``, and one per value of ``task_type``, ``duration``, ``task`` and ``type`` when the rows have
them. A row without a video, question, two or more options or an answer among them is unparseable (listed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..data.conversation import IGNORE_INDEX, PLACEHOLDER_RE, tokenize_conversation
from .common import Outcome, Tally, VideoCache, find_video, load_json_list, media_root, out_dir, write_results

LETTER_RE = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*(.*)$", re.S)
GROUP_FIELDS = ("task_type", "duration", "task", "type")
INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class MCQ:
    """One multiple-choice question. ``problem``: why it cannot be asked ("" when it can)."""
    qid: str
    video: str
    question: str
    letters: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    answer: Optional[str] = None  # the right letter
    groups: list[str] = field(default_factory=lambda: ["all"])
    problem: str = ""

    def prompt(self) -> str:
        """The question, its options one per line, and the instruction."""
        opts = "\n".join(f"{ltr}. {t}" for ltr, t in zip(self.letters, self.texts))
        return f"{PLACEHOLDER_RE.sub('', self.question).strip()}\nOptions:\n{opts}\n{INSTRUCTION}"

    def answers(self) -> list[str]:
        """Each option as an answer turn: ``"{letter}. {text}"``."""
        return [f"{ltr}. {t}" for ltr, t in zip(self.letters, self.texts)]


def parse_options(options) -> tuple[list[str], list[str]]:
    """(letters, texts) of a dict {"A": "red"} or a list ["A. red", ...] (lettered A, B, ... by position when its
    items do not all carry distinct letters); ([], []) for anything else."""
    if isinstance(options, dict):
        return [str(k).strip().upper() for k in options], [str(v).strip() for v in options.values()]
    if not isinstance(options, list):
        return [], []
    found = [LETTER_RE.match(str(o)) for o in options]
    letters = [m.group(1) for m in found if m]
    if len(letters) == len(options) and len(set(letters)) == len(letters):
        return letters, [m.group(2).strip() for m in found]
    return [chr(ord("A") + i) for i in range(len(options))], [str(o).strip() for o in options]


def answer_letter(answer, letters: list[str], texts: list[str]) -> Optional[str]:
    """The letter ``answer`` names: a letter (``A``, ``(A)``, ``A.``), an option's text, or ``"A. text"``."""
    a = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:]?", a)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    for ltr, t in zip(letters, texts):
        if a.lower() in (t.lower(), f"{ltr}. {t}".lower()):
            return ltr
    m = LETTER_RE.match(a)
    return m.group(1) if m and m.group(1) in letters else None


def flatten(rows: list) -> list:
    """Rows with a ``questions`` list (Video-MME per video) -> one row per question with the video's fields."""
    out = []
    for r in rows:
        if isinstance(r, dict) and isinstance(r.get("questions"), list):
            top = {k: v for k, v in r.items() if k != "questions"}
            out += [{**top, **q} if isinstance(q, dict) else q for q in r["questions"]]
        else:
            out.append(r)
    return out


def mcq_row(i: int, q) -> MCQ:
    """One row of either layout as an MCQ (with ``problem`` set when it cannot be asked)."""
    if not isinstance(q, dict):
        return MCQ(f"#{i}", "", "", problem="the row is not a JSON object")
    video = next((str(q[k]) for k in ("videoID", "video_id", "video") if q.get(k) not in (None, "")), "")
    opts = q.get("options", q.get("candidates"))
    letters, texts = parse_options(opts)
    row = MCQ(str(q.get("question_id", q.get("id", f"#{i}"))), video, str(q.get("question", "")), letters, texts,
              groups=["all"] + [f"{k}={q[k]}" for k in GROUP_FIELDS if q.get(k) not in (None, "")])
    row.answer = answer_letter(q.get("answer", ""), letters, texts) if len(letters) >= 2 else None
    problems = [("no video (videoID, video_id or video)", not video), ("no question", not row.question),
                ("options/candidates is not a list or dict of 2 or more", len(letters) < 2),
                (f"answer {q.get('answer')!r} is not one of the options {letters}", len(letters) >= 2
                 and row.answer is None)]
    row.problem = "; ".join(p for p, bad in problems if bad)
    return row


def option_scores(session, question: str, item, answers: list[str]) -> tuple[list[float], list[int]]:
    """(summed log-probability, token count) of each answer turn after ``question`` about ``item``."""
    from .synthetic import score_answers

    q, _ = session.place(question, [item])
    sums = score_answers(session.model, session.tok, session.template, q, answers, [item.feats], "frames",
                         [item.num_frames], [item.modality])
    counts = [sum(lab != IGNORE_INDEX for lab in tokenize_conversation(
        [{"from": "human", "value": q}, {"from": "gpt", "value": a}], session.tok, session.template)[1])
        for a in answers]
    return sums, counts


def ask_one(session, cache: VideoCache, root: Path, row: MCQ) -> tuple[Outcome, dict]:
    """Score one question's options: (its outcome, its record or {} when not asked)."""
    from ..chat import BadMedia

    if row.problem:
        return Outcome(row.qid, row.groups, "unparseable", reason=row.problem), {}
    path = find_video(root, row.video)
    if path is None:
        return Outcome(row.qid, row.groups, "unanswerable",
                       reason=f"video {row.video}: no file under {root} ({row.video} or {row.video}.*)"), {}
    try:
        item = cache.item(path)
    except BadMedia as e:
        return Outcome(row.qid, row.groups, "unanswerable", reason=str(e)), {}
    sums, counts = option_scores(session, row.prompt(), item, row.answers())
    mean = [s / max(n, 1) for s, n in zip(sums, counts)]
    choice = row.letters[max(range(len(mean)), key=mean.__getitem__)]
    o = Outcome(row.qid, row.groups, "scored", choice == row.answer, chance=1 / len(row.letters))
    return o, {"id": row.qid, "video": row.video, "question": row.question, "options": row.answers(),
               "answer": row.answer, "choice": choice, "mean_logprob": mean, "sum_logprob": sums, "tokens": counts}


def evaluate_mcq(export_dir: str, questions: str, root: str, out: str, max_samples: Optional[int] = None) -> dict:
    """Score every question, write OUT/predictions.json, results.json and results.md; -> the report."""
    from ..chat import ChatSession

    rows = [mcq_row(i, q) for i, q in enumerate(flatten(load_json_list(questions, "--questions")))]
    media, dest = media_root(root), out_dir(out)
    rows = rows[:max_samples] if max_samples is not None else rows
    session = ChatSession(export_dir)
    cache, tally, records = VideoCache(session), Tally(), []
    for row in rows:
        outcome, rec = ask_one(session, cache, media, row)
        tally.add(outcome)
        if rec:
            records.append(rec)
    (dest / "predictions.json").write_text(json.dumps(records, indent=2) + "\n")
    report = {"task": "mcq", "export": str(export_dir), "questions": questions, "media_root": root,
              "rule": "the option with the highest mean log-probability per token of its answer turn "
                      "'{letter}. {text}' (length-normalised)",
              "rows": tally.rows(), "unanswerable": tally.listed("unanswerable"),
              "unparseable": tally.listed("unparseable"), "predictions": str(dest / "predictions.json")}
    report["table"] = write_results(dest, report)
    return report
