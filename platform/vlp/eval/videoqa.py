"""Open-ended video QA on the MSRVTT-QA / MSVD-QA / ActivityNet-QA files, as Video-ChatGPT's quantitative
evaluation uses them: every question is asked about its video (decoded and encoded online exactly as ``vlp chat``
does), answered greedily, written to ``predictions.json`` in Video-ChatGPT's format (``video_name``, ``Q``, ``A``,
``pred``; plus ``id``) for its GPT-judged score, and scored offline by exact match.

File formats (``qa_format``; ``auto`` picks by the first row's fields):

- ``activitynet``: two files, as ActivityNet-QA releases them (``test_q.json`` = ``[{video_name, question,
  question_id}]``, ``test_a.json`` = ``[{answer, type, question_id}]``) and as Video-ChatGPT / Video-LLaVA ship
  MSVD-QA and MSRVTT-QA for zero-shot QA. Answers are joined by ``question_id`` (by position when a question has
  none). Video file: ``{video_name}.{ext}`` or ``v_{video_name}.{ext}`` (ActivityNet's file names).
  ActivityNet's ``type`` (0-8) is named (motion, spatial, temporal, yes_no, color, object, location, number, other).
- ``msrvtt``: one file with the answers inline, as MSRVTT-QA and MSVD-QA are released (``test_qa.json`` =
  ``[{video_id, question, answer, id}]``; ``video`` is accepted for ``video_id``). Video file: ``{video_id}.{ext}``,
  ``video{video_id}.{ext}`` (MSRVTT's ``video7010.mp4``) or ``vid{video_id}.{ext}``. A ``type`` field, if present,
  gives the per-type rows. MSVD-QA names its clips by YouTube id: ``--video-map youtube_mapping.txt`` (its lines
  ``<clip name> vid<N>``) makes video_id N the clip ``<clip name>.{ext}`` (:func:`read_video_map`).
  (Fields as released: MSRVTT-QA's ``test_qa.json`` rows are ``{video_id: int, id, question, answer, category_id}``
  with clips ``video<id>.mp4``, as public harnesses load them, e.g. video_vlm_eval's MSRVTTQADataset; MSVD-QA's the
  same with the mapping file.)

``ext`` is tried in the order of :data:`vlp.eval.common.VIDEO_EXTS`; a name that already ends in its extension is
used as is.

Exact-match rule (:func:`exact_match`): both strings are normalised (:func:`normalize_answer`: lower case,
punctuation turned into spaces, the articles a/an/the dropped, whitespace collapsed); a prediction is correct when
it equals the answer, or when it has at most :data:`SHORT` words and the answer's words occur in it as a whole-word
run ("The shape is red." is right for "red"; "it is not red but blue" is too long to count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.conversation import PLACEHOLDER_RE
from .common import (LENGTH_GROUPS, BadQuestions, MissingFlag, Outcome, Tally, VideoCache, find_video,
                     load_json_list, media_root, out_dir, write_results)

FORMATS = ("activitynet", "msrvtt")
PREFIXES = {"activitynet": ("", "v_"), "msrvtt": ("", "video", "vid")}
ANET_TYPES = {0: "motion", 1: "spatial", 2: "temporal", 3: "yes_no", 4: "color", 5: "object", 6: "location",
              7: "number", 8: "other"}
ARTICLES = {"a", "an", "the"}
SHORT = 5  # a prediction of at most this many (normalised) words counts when it contains the answer


def normalize_answer(s: str) -> str:
    """Lower case, punctuation -> space, articles (a, an, the) dropped, whitespace collapsed."""
    words = re.sub(r"[^\w\s]|_", " ", str(s).lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(pred: str, answer: str) -> bool:
    """Normalised ``pred`` equals normalised ``answer``, or ``pred`` has at most SHORT words and contains the
    answer's words as a contiguous whole-word run. An empty prediction or answer is never a match."""
    p, a = normalize_answer(pred).split(), normalize_answer(answer).split()
    if not p or not a:
        return False
    if p == a:
        return True
    return len(p) <= SHORT and any(p[i:i + len(a)] == a for i in range(len(p) - len(a) + 1))


@dataclass
class QA:
    """One question, whatever its file format. ``problem``: why it cannot be asked ("" when it can)."""
    qid: str
    video: str
    question: str
    answer: Optional[str]
    qtype: Optional[str]
    problem: str = ""


def detect_format(questions: list, qa_format: str, path: str) -> str:
    """``qa_format``, or for ``auto`` the format the first row's fields say; BadQuestions when unknown."""
    if qa_format not in ("auto",) + FORMATS:
        raise BadQuestions(f"--qa-format {qa_format}: unknown format; known: auto, {', '.join(FORMATS)}")
    if qa_format != "auto":
        return qa_format
    first = questions[0] if isinstance(questions[0], dict) else {}
    if "answer" in first and ("video_id" in first or "video" in first):
        return "msrvtt"
    if "video_name" in first:
        return "activitynet"
    raise BadQuestions(f"--questions {path}: unknown QA format (first row's fields: {sorted(first) or 'none'}); "
                       "expected ActivityNet-QA's video_name/question/question_id (answers in --answers) or "
                       "MSRVTT-QA's video_id/question/answer/id")


def activitynet_rows(questions: list, answers: list) -> list[QA]:
    """Questions joined with their answers by question_id (by position for a question without one)."""
    by_id = {str(a["question_id"]): a for a in answers if isinstance(a, dict) and "question_id" in a}
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            out.append(QA(f"#{i}", "", "", None, None, "the row is not a JSON object"))
            continue
        qid = str(q.get("question_id", f"#{i}"))
        a = by_id.get(qid) if "question_id" in q else (answers[i] if i < len(answers) else None)
        missing = [k for k in ("video_name", "question") if not q.get(k)]
        problem = (f"missing {', '.join(missing)}" if missing else "" if isinstance(a, dict) and "answer" in a
                   else f"no answer for question_id {qid} in --answers")
        t = a.get("type") if isinstance(a, dict) else None
        out.append(QA(qid, str(q.get("video_name", "")), str(q.get("question", "")),
                      str(a["answer"]) if not problem else None,
                      None if t is None else ANET_TYPES.get(t, str(t)), problem))
    return out


def msrvtt_rows(questions: list) -> list[QA]:
    """Rows with inline answers: video_id (or video), question, answer, id (or question_id), optional type."""
    out = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            out.append(QA(f"#{i}", "", "", None, None, "the row is not a JSON object"))
            continue
        video = q.get("video_id", q.get("video"))
        missing = [k for k, v in (("video_id", video), ("question", q.get("question")),
                                  ("answer", q.get("answer"))) if v in (None, "")]
        qid = str(q.get("id", q.get("question_id", f"#{i}")))
        out.append(QA(qid, "" if video is None else str(video), str(q.get("question", "")),
                      None if missing else str(q["answer"]), None if q.get("type") is None else str(q["type"]),
                      f"missing {', '.join(missing)}" if missing else ""))
    return out


def read_questions(questions: str, answers: Optional[str], qa_format: str) -> tuple[str, list[QA]]:
    """(format, rows) of the questions file (and answers file for ``activitynet``); BadQuestions / MissingFlag
    for files that do not fit."""
    qs = load_json_list(questions, "--questions")
    fmt = detect_format(qs, qa_format, questions)
    if fmt == "activitynet":
        if answers is None:
            raise MissingFlag(f"--questions {questions} is in the activitynet format (questions without answers): "
                              "give its answers file with --answers (e.g. test_a.json)")
        return fmt, activitynet_rows(qs, load_json_list(answers, "--answers"))
    if answers is not None:
        raise BadQuestions(f"--answers is only for the activitynet format; --questions {questions} is in the "
                           "msrvtt format, which holds its answers")
    return fmt, msrvtt_rows(qs)


def read_video_map(path: Optional[str]) -> dict[str, str]:
    """MSVD-QA's ``youtube_mapping.txt`` -> {video_id: clip name}: each line ``<clip name> vid<N>`` maps ``N`` (and
    ``vid<N>``) to the clip. {} without a file; BadQuestions for a missing file or a line of another shape."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise BadQuestions(f"--video-map {path} does not exist")
    out = {}
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not re.fullmatch(r"vid\d+", parts[1]):
            raise BadQuestions(f"--video-map {path} line {n}: expected '<clip name> vid<N>' (MSVD-QA's "
                               f"youtube_mapping.txt), got {line.strip()[:80]!r}")
        out[parts[1][3:]] = out[parts[1]] = parts[0]
    return out


def ready(cache: VideoCache, root: Path, qa: QA, fmt: str, video_map: Optional[dict] = None):
    """A question's outcome when it cannot be asked (unparseable, no video, undecodable video), else its video's
    item (from ``cache``)."""
    from ..chat import BadMedia

    if qa.problem:
        return Outcome(qa.qid, groups_of(qa), "unparseable", reason=qa.problem)
    name = (video_map or {}).get(qa.video, qa.video)
    path = find_video(root, name, PREFIXES[fmt])
    if path is None:
        tried = ", ".join(f"{p}{name}.*" for p in PREFIXES[fmt])
        why = f"video {qa.video}: no file under {root} ({tried})"
        return Outcome(qa.qid, groups_of(qa), "unanswerable", reason=why)
    try:
        return cache.item(path)
    except BadMedia as e:
        return Outcome(qa.qid, groups_of(qa), "unanswerable", reason=str(e))


def groups_of(qa: QA) -> list[str]:
    return ["all"] + ([f"type={qa.qtype}"] if qa.qtype is not None else [])


def scored(qa: QA, pred: str) -> tuple[Outcome, dict]:
    """A question's outcome and prediction record from its answer."""
    bad = not normalize_answer(pred)
    o = Outcome(qa.qid, groups_of(qa), "scored", exact_match(pred, qa.answer), bad_pred=bad,
                reason="empty prediction" if bad else "")
    return o, {"video_name": qa.video, "Q": qa.question, "A": qa.answer, "pred": pred, "id": qa.qid}


def ask_window(session, cache: VideoCache, root: Path, window: list[QA], fmt: str, max_new_tokens: int,
               video_map: Optional[dict], batch_size: int) -> list[tuple[Outcome, dict]]:
    """Each question of ``window`` -> (its outcome, its prediction record or {} when not asked), in order; the
    askable ones answered ``batch_size`` at a time (:meth:`ChatSession.answer_many`)."""
    got = [ready(cache, root, qa, fmt, video_map) for qa in window]
    asked = [i for i, g in enumerate(got) if not isinstance(g, Outcome)]
    preds = session.answer_many([(PLACEHOLDER_RE.sub("", window[i].question).strip(), [got[i]]) for i in asked],
                                max_new_tokens, batch_size)
    out = {i: scored(window[i], p) for i, p in zip(asked, preds)}
    return [out[i] if i in out else (g, {}) for i, g in enumerate(got)]


def evaluate_videoqa(export_dir: str, questions: str, answers: Optional[str], root: str, out: str,
                     qa_format: str = "auto", max_samples: Optional[int] = None, max_new_tokens: int = 32,
                     video_map: Optional[str] = None, batch_size: int = 16) -> dict:
    """Answer every question, write OUT/predictions.json, results.json and results.md; -> the report.
    ``video_map``: MSVD-QA's youtube_mapping.txt (:func:`read_video_map`). Questions are read ``LENGTH_GROUPS``
    batches ahead and answered ``batch_size`` at a time (the answers do not depend on it)."""
    from ..chat import ChatSession

    fmt, rows = read_questions(questions, answers, qa_format)
    names = read_video_map(video_map)
    media, dest = media_root(root), out_dir(out)
    rows = rows[:max_samples] if max_samples is not None else rows
    session = ChatSession(export_dir)
    cache, tally, preds = VideoCache(session), Tally(), []
    step = batch_size * LENGTH_GROUPS
    for start in range(0, len(rows), step):
        for outcome, pred in ask_window(session, cache, media, rows[start:start + step], fmt, max_new_tokens, names,
                                        batch_size):
            tally.add(outcome)
            if pred:
                preds.append(pred)
    (dest / "predictions.json").write_text(json.dumps(preds, indent=2) + "\n")
    report = {"task": "videoqa", "export": str(export_dir), "questions": questions, "answers": answers,
              "qa_format": fmt, "media_root": root, "max_new_tokens": max_new_tokens,
              "rule": "exact match after normalisation (lower case, no punctuation, no a/an/the), or the answer as "
                      f"whole words inside a prediction of at most {SHORT} words",
              "rows": tally.rows(), "unanswerable": tally.listed("unanswerable"),
              "unparseable": tally.listed("unparseable"), "predictions": str(dest / "predictions.json")}
    report["table"] = write_results(dest, report)
    return report
