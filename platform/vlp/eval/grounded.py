"""``vlp eval --task temporal_grounding | referring --features SET``: grounding questions of a feature set whose rows
carry their truth (``meta.grounding``, written by ``vlp pack --format charades_sta | refcoco`` or the synthetic
grounding shards), answered greedily by an export and scored with :mod:`vlp.eval.grounding` (Charades-STA: R@1 at
IoU 0.3/0.5/0.7 and mIoU; RefCOCO: Acc@0.5), beside the best constant answer on the same truths.

Each row is asked its conversation's first question (the placeholders of its items first, as in training); the
answer is read with the span format the row was written with (``grounding.format``) or as a box on the padded
square, mapped back to the original pixels. Unreadable answers count as wrong and are listed. The questions are
answered ``batch_size`` at a time by ``VideoLLM.generate_grouped`` (batches of near prompt lengths; the same answers
as one at a time).

May import: torch, vlp.data, vlp.formats, vlp.models, vlp.eval, vlp.storage.
"""

from __future__ import annotations

import itertools
import json
from typing import Iterable, Iterator, Optional

from ..data.conversation import PLACEHOLDER_RE, prompt_ids
from ..data.grounding import SpanFormat, parse_box, parse_span, square_to_pixels
from ..errors import UserError
from ..formats.featureset import iter_feature_rows
from ..storage import StorageConfig
from .common import LENGTH_GROUPS, out_dir
from .grounding import GroundingTally, constant_baseline, iou_1d, iou_2d, unparseable_report

TASKS = ("temporal_grounding", "referring")


class NoGroundingRows(UserError):
    """The feature set holds no row with the task's truth."""


def truth_of(row: dict, task: str) -> Optional[dict]:
    """The row's ``meta.grounding`` when it is of ``task``, else None."""
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    g = meta.get("grounding")
    return g if isinstance(g, dict) and g.get("task") == task else None


def question_of(row: dict) -> Optional[list[dict]]:
    """The row's first human turn (placeholders kept), as a one-turn conversation; None without one."""
    conv = json.loads(row["conversations"]) if row.get("conversations") else []
    first = next((t for t in conv if t.get("from") == "human"), None)
    return [{"from": "human", "value": first["value"]}] if first else None


def score_answer(task: str, g: dict, answer: str, uid: str, tally: GroundingTally) -> float:
    """Read ``answer`` as ``g``'s task asks and add its IoU with the truth to ``tally``."""
    if task == "temporal_grounding":
        fmt = SpanFormat.model_validate(g.get("format") or {})
        duration = float(g.get("duration") or g["span"][1])
        return tally.add(uid, answer, parse_span(answer, duration, fmt), tuple(g["span"]), iou_1d)
    box = parse_box(answer)
    pred = square_to_pixels(box, int(g["width"]), int(g["height"])) if box is not None else None
    return tally.add(uid, answer, pred, tuple(g["box"]), iou_2d)


def grounding_rows(rows: Iterable[dict], task: str, max_samples: Optional[int] = None) -> Iterator[tuple]:
    """(row, truth, one-turn question) of each row of ``task`` that has a question, the first ``max_samples``."""
    n = 0
    for row in rows:
        g, q = truth_of(row, task), question_of(row)
        if g is None or q is None:
            continue
        if max_samples is not None and n >= max_samples:
            return
        n += 1
        yield row, g, q


def answers_of(model, tok, template: str, asked: list[tuple], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers to (row, truth, question) triples, ``batch_size`` at a time grouped by prompt length."""
    import torch

    from ..models.videollm import Prompt
    from .synthetic import RowVisuals

    prompts = []
    for row, _, q in asked:
        vis = RowVisuals.of(row)
        prompts.append(Prompt(torch.tensor(prompt_ids(q, tok, template)), vis.feats, vis.mode, vis.num_frames,
                              vis.modalities))
    out = model.generate_grouped(prompts, batch_size, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    return [tok.decode(t, skip_special_tokens=True) for t in out]


def score_rows(model, tok, template: str, rows: Iterable[dict], task: str, max_new_tokens: int = 64,
               max_samples: Optional[int] = None, batch_size: int = 16) -> tuple[GroundingTally, list, list]:
    """The ``task`` rows' questions answered ``batch_size`` at a time (of ``LENGTH_GROUPS`` batches read ahead,
    grouped by prompt length) and scored, in row order -> (tally, truths, examples: every question's answer, truth
    and IoU)."""
    tally, truths, examples = GroundingTally(task), [], []
    asked = grounding_rows(rows, task, max_samples)
    while batch := list(itertools.islice(asked, batch_size * LENGTH_GROUPS)):
        for (row, g, q), answer in zip(batch, answers_of(model, tok, template, batch, max_new_tokens, batch_size)):
            uid = str(row.get("uid") or row.get("key"))
            iou = score_answer(task, g, answer, uid, tally)
            truths.append(g)
            examples.append({"uid": uid, "question": PLACEHOLDER_RE.sub("", q[0]["value"]).strip(), "answer": answer,
                             "truth": g.get("span") or g.get("box"), "iou": round(iou, 3)})
    return tally, truths, examples


def evaluate_grounding(export_dir: str, feature_uri: str, task: str, storage: StorageConfig | None = None,
                       max_samples: Optional[int] = None, max_new_tokens: int = 64, out: Optional[str] = None,
                       batch_size: int = 16) -> dict:
    """Metrics of the export on the set's ``task`` rows, the best constant answer's, and the unreadable answers;
    with ``out``, also ``predictions.json`` (every question's answer, truth and IoU), ``results.json`` and
    ``results.md`` there. ``batch_size``: questions per batched generation (the answers do not depend on it)."""
    dest = out_dir(out) if out is not None else None  # OutputNotWritable before any model loads
    from ..formats.export import load_model
    from .synthetic import check_feature_set

    model, tok, info = load_model(export_dir)
    check_feature_set(feature_uri, storage)
    template = info.prompt_template(str(export_dir))
    tally, truths, examples = score_rows(model, tok, template, iter_feature_rows(feature_uri, storage), task,
                                         max_new_tokens, max_samples, batch_size)
    if not truths:
        raise NoGroundingRows(f"feature set {feature_uri} holds no {task} rows (meta.grounding with task {task}: "
                              "pack them with vlp pack --format charades_sta / refcoco)")
    report = {"task": task, "export": str(export_dir), "features": feature_uri, "metrics": tally.metrics(),
              "constant_baseline": baseline_of(task, truths), "unparseable_n": len(tally.unparseable),
              "unparseable": unparseable_report(tally), "examples": examples[:20]}
    if dest is not None:
        (dest / "predictions.json").write_text(json.dumps(examples, indent=1) + "\n")
        (dest / "results.json").write_text(json.dumps(report, indent=2) + "\n")
        (dest / "results.md").write_text(results_table(report))
    return report


def results_table(report: dict) -> str:
    """The Markdown table of a grounding report: each metric of the model beside the best constant answer's."""
    base, m = report["constant_baseline"], report["metrics"]
    lines = [f"### {report['task']} ({m['n']} questions, {report['unparseable_n']} unreadable answers)", "",
             "| metric | model | best constant answer |", "|---|---:|---:|"]
    for k, v in m.items():
        if k != "n":
            b = f"{base['value']:.3f}" if k == base["metric"] else "-"
            lines.append(f"| {k} | {v:.3f} | {b} |")
    return "\n".join(lines) + f"\n\nbest constant answer: {base['answer']}\n"


def baseline_of(task: str, truths: list[dict]) -> dict:
    """The best constant answer on these truths (spans relative to each clip; boxes normalised to each image)."""
    if task == "temporal_grounding":
        durs = [float(g.get("duration") or g["span"][1]) for g in truths]
        return constant_baseline(task, [tuple(g["span"]) for g in truths], durs)
    boxes = [(b[0] / g["width"], b[1] / g["height"], b[2] / g["width"], b[3] / g["height"])
             for g in truths for b in [g["box"]]]
    return constant_baseline(task, boxes)
