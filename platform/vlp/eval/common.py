"""What the benchmark evaluations (``videoqa``, ``mcq``) share: reading a questions/answers JSON file, finding a
question's video under the media root, encoding it online once per video (as ``vlp chat`` does), the outcome of
each question, the table per group, and writing ``results.json`` / ``results.md``.

Outcome of a question: ``scored`` (the model answered it; right or wrong), ``unanswerable`` (its video is missing
or undecodable) or ``unparseable`` (the row lacks a field the task needs, or its options/answer cannot be read).
A scored question whose prediction is unusable (videoqa: empty after normalisation) is scored (wrong) and also
counted as an unparseable prediction. Nothing is dropped silently: every unanswerable/unparseable row is listed
with its reason in ``results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from ..storage import make_output_dir

VIDEO_EXTS = ("mp4", "mkv", "webm", "avi", "mov")
LENGTH_GROUPS = 4  # batches of generation questions read ahead and grouped by prompt length (generate_grouped)


class BadQuestions(UserError):
    """A questions/answers file that is missing, not JSON, not a list of objects, or of an unknown format."""


class MissingFlag(UserError):
    """A flag the chosen ``--task`` needs was not given."""


def load_json_list(path: str, what: str) -> list:
    """The JSON list in ``path`` (``what`` names it in errors: ``--questions``); BadQuestions otherwise."""
    p = Path(path)
    if not p.is_file():
        raise BadQuestions(f"{what} {path}: " + ("is a folder, not a JSON file" if p.is_dir() else "no such file"))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadQuestions(f"{what} {path} is not a JSON file ({e})") from None
    if not isinstance(data, list):
        raise BadQuestions(f"{what} {path} holds a JSON {type(data).__name__}, not the list of question objects "
                           "the benchmark files are")
    if not data:
        raise BadQuestions(f"{what} {path} is an empty list: nothing to evaluate")
    return data


def media_root(path: str) -> Path:
    """``--media-root`` as a Path; BadQuestions when it is not a folder (else every question is unanswerable)."""
    p = Path(path)
    if not p.is_dir():
        raise BadQuestions(f"--media-root {path}: " + ("is a file, not a folder" if p.exists() else "no such folder"))
    return p


def find_video(root: Path, name: str, prefixes: Sequence[str] = ("",)) -> Optional[Path]:
    """The file of video ``name`` under ``root``: ``name`` itself (it may carry its extension, e.g. MVBench's
    ``video``), then ``{prefix}{name}.{ext}`` for each prefix (ActivityNet's ``v_``, MSRVTT's ``video``) and each
    of :data:`VIDEO_EXTS`; None when none exists."""
    cands = [root / name] if name else []
    for pre in prefixes:
        cands += [root / f"{pre}{name}.{ext}" for ext in VIDEO_EXTS]
    return next((p for p in cands if p.is_file()), None)


class VideoCache:
    """Encodes a question's video with a :class:`vlp.chat.ChatSession` (the export's sampling, preprocessing and
    tower), reusing the last video's features (benchmark files list a video's questions together)."""

    def __init__(self, session):
        self.session = session
        self.last: tuple[Optional[str], object] = (None, None)

    def item(self, path: Path):
        """The ChatItem of ``path``; BadMedia (from chat) when it cannot be decoded."""
        if self.last[0] != str(path):
            self.last = (None, None)
            self.last = (str(path), self.session.encode(str(path)))  # kept only when the decode succeeded
        return self.last[1]


@dataclass
class Outcome:
    """One question's result. ``groups``: the table rows it counts in (``all``, ``type=motion``...)."""
    qid: str
    groups: list[str]
    status: str  # scored | unanswerable | unparseable
    correct: bool = False
    chance: Optional[float] = None  # 1 / #options (mcq); None for open-ended
    bad_pred: bool = False  # scored, but the prediction is unusable (empty)
    reason: str = ""


@dataclass
class Tally:
    """Outcomes of every question, in file order."""
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        self.outcomes.append(o)

    def rows(self) -> list[dict]:
        """One row per group: n, scored, correct, accuracy (correct / scored), chance (mean over scored
        questions), unanswerable, unparseable (rows + unusable predictions)."""
        names = list(dict.fromkeys(g for o in self.outcomes for g in o.groups))
        out = []
        for g in names:
            mine = [o for o in self.outcomes if g in o.groups]
            scored = [o for o in mine if o.status == "scored"]
            correct = sum(o.correct for o in scored)
            ch = [o.chance for o in scored if o.chance is not None]
            out.append({"group": g, "n": len(mine), "scored": len(scored), "correct": correct,
                        "accuracy": correct / len(scored) if scored else None,
                        "chance": sum(ch) / len(ch) if ch else None,
                        "unanswerable": sum(o.status == "unanswerable" for o in mine),
                        "unparseable": sum(o.status == "unparseable" or o.bad_pred for o in mine)})
        return out

    def listed(self, status: str) -> list[dict]:
        """The questions of ``status`` (or, for ``unparseable``, also the unusable predictions) with reasons."""
        return [{"id": o.qid, "reason": o.reason} for o in self.outcomes
                if o.status == status or (status == "unparseable" and o.bad_pred)]


def markdown_table(task: str, rows: list[dict]) -> str:
    """The Markdown table of a task's rows (``-`` where a value does not apply)."""
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"### {task}", "", "| group | n | scored | accuracy | chance | unanswerable | unparseable |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['group']} | {r['n']} | {r['scored']} | {num(r['accuracy'])} | {num(r['chance'])} | "
              f"{r['unanswerable']} | {r['unparseable']} |" for r in rows]
    return "\n".join(lines) + "\n"


def out_dir(path: str) -> Path:
    """``--out`` created (``storage.make_output_dir``: OutputNotWritable when it cannot be)."""
    return Path(make_output_dir(path, "--out")[1])


def write_results(out: Path, report: dict) -> str:
    """``results.json`` (the whole report) and ``results.md`` (its table) in ``out``; -> the table."""
    table = markdown_table(report["task"], report["rows"])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(table)
    return table
