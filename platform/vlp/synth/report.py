"""The run report: a Markdown page with PNG plots and an evaluation table."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..formats.featureset import FeatureSetLayout


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list, list]], kind: str = "line") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    if kind == "bar":
        labels = list(series)
        vals = [series[k][1][0] for k in labels]
        ax.barh(labels, vals, color="#4c72b0")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:g}", va="center", fontsize=8)
    else:
        for name, (x, y) in series.items():
            ax.plot(x, y, label=name, lw=1.5)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metrics(run_dir: str) -> list[dict]:
    from ..storage import read_appended

    text = read_appended(f"{run_dir}/metrics.jsonl")  # a local file, or an object store's appended parts
    return [json.loads(x) for x in text.splitlines()]


def _eval_intro(evals: dict[str, dict]) -> str:
    text = ("Accuracy per question type on held-out clips. *choice*: the answer filled with each candidate value "
            "is scored by the model's log-likelihood and the best must be right; *generated*: the greedy answer "
            "names the right value and no other.")
    deaf = [n for n, ev in evals.items() if ev.get("without") == "audio"]
    if deaf:
        text += (f" `{deaf[0]}` is the same weights asked the same questions without the clips' `<audio>` items "
                 "(their soundtrack: a tone whose pitch names a word no frame shows; *sound*, chance 0.25): what "
                 "the audio item buys.")
    pooled = [n for n, ev in evals.items() if ev.get("without") is None]
    if len(pooled) > 1:
        text += (" The models side by side differ only in the temporal pooler (same stage-1 connector, data and "
                 "steps): `valley` = patch tokens averaged over time + one CLS token per frame; `patch_mean` = "
                 "the time-averaged patch tokens only, which look the same whichever way the shape moves along "
                 "its path, so only the CLS tokens carry the order of the frames. The held-out clips come in "
                 "reversed pairs (each clip and the same clip played backwards), so on *direction_vs_opposite* "
                 "(true direction vs its opposite, chance 0.5) an order-blind model scores 0.5 by construction.")
    return text


def _eval_table(evals: dict[str, dict]) -> list[str]:
    """One row per question type, the models side by side (choice / generated accuracy), with chance."""
    names = list(evals)
    qs = list(dict.fromkeys(q for ev in evals.values() for q in ev["by_type"]))
    head = "| question | n | chance | " + " | ".join(f"{n} choice | {n} generated" for n in names) + " |"
    rows = [head, "|---|---|---|" + "---|---|" * len(names)]
    for q in qs:
        first = next(ev["by_type"][q] for ev in evals.values() if q in ev["by_type"])
        cells = []
        for n in names:
            v = evals[n]["by_type"].get(q)
            gen = v.get("gen_acc") if v else None
            cells += [f"{v['choice_acc']:.2f}" if v else "-", f"{gen:.2f}" if gen is not None else "-"]
        rows.append(f"| {q} | {first['n']} | {first['chance']:.2f} | " + " | ".join(cells) + " |")
    return rows


def _training_plots(out: Path, ms: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """Loss, throughput, data wait and padding per stage as PNGs in ``out``; (title, file name) of each."""
    pngs = []
    for key, title, ylabel, fname in (
            ("loss", "Training loss per stage", "loss", "loss.png"),
            ("samples_per_s", "Throughput per stage", "samples / s", "throughput.png"),
            ("data_wait_frac", "Share of step time waiting for data", "fraction", "data_wait.png"),
            ("padding_frac", "Padding fraction of micro-batches", "fraction", "padding.png")):
        s = {n: ([r["step"] for r in m], [r[key] for r in m]) for n, m in ms.items() if m}
        if s:
            _plot(out / fname, title, ylabel, s)
            pngs.append((title, fname))
    return pngs


def _feature_rows(feature_sets: dict[str, str], errors: Counter) -> list[str]:
    """One Markdown table row per completed feature set; its error records by reason are added to ``errors``."""
    rows = []
    for name, uri in feature_sets.items():
        sp = Path(uri) / FeatureSetLayout.SUMMARY
        man = Path(uri) / FeatureSetLayout.MANIFEST
        if not man.exists():
            continue
        m = json.loads(man.read_text())
        s = json.loads(sp.read_text()) if sp.exists() else {}
        for k, v in s.get("errors_by_reason", {}).items():
            errors[f"{name}: {k}"] += v
        rows.append(f"| {name} | {m['totals']['samples_ok']} | {m['totals']['samples_failed']} | {m['mode']} | "
                    f"{len(m['shards'])} |")
    return rows


def make_report(out_dir: str | Path, train_runs: dict[str, str], feature_sets: dict[str, str],
                evals: dict[str, dict], answers: list[dict] | None = None) -> Path:
    """Write ``out_dir/report.md`` and its PNGs; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ms = {name: _metrics(d) for name, d in train_runs.items()}
    pngs = _training_plots(out, ms)
    errors: Counter[str] = Counter()
    rows = _feature_rows(feature_sets, errors)
    for name, d in train_runs.items():  # samples training skipped (over-long, bad conversation), by reason
        ts = Path(d) / "train_summary.json"
        skipped = json.loads(ts.read_text()).get("skipped", {}) if ts.exists() else {}
        for k, v in skipped.items():
            errors[f"{name}: skipped, {k}"] += v
    _plot(out / "errors.png", "Error records by reason", "", {k: ([0], [v]) for k, v in errors.items()} or
          {"no errors": ([0], [0])}, kind="bar")
    pngs.append(("Error records by reason", "errors.png"))

    md = ["# vlp run report", "", "## Feature sets", "", "| set | samples | errors | mode | shards |",
          "|---|---|---|---|---|", *rows, "", "## Training", ""]
    md += ["| stage | steps | first loss | last loss | samples/s (median) | padding (mean) |", "|---|---|---|---|---|---|"]
    for n, m in ms.items():
        if m:
            sps = sorted(r["samples_per_s"] for r in m)[len(m) // 2]
            md.append(f"| {n} | {m[-1]['step']} | {m[0]['loss']:.3f} | {m[-1]['loss']:.3f} | {sps:.1f} | "
                      f"{sum(r['padding_frac'] for r in m) / len(m):.1%} |")
    md += ["", "## Errors and skips", ""]
    md += (["| where: reason | count |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(errors.items())]]
           if errors else ["None: every sample was decoded, encoded and trained on."])
    md += ["", "## Evaluation (held-out split)", "", _eval_intro(evals), "", *_eval_table(evals)]
    if answers:
        md += ["", "## Answers on held-out clips", "", "| clip | question | truth | answer |", "|---|---|---|---|"]
        md += [f"| {a['uid']} | {a['question']} | {a['truth']} | {a['generated'].strip()} |" for a in answers]
    md += ["", "## Plots", ""] + [f"![{t}]({f})" for t, f in pngs]
    p = out / "report.md"
    p.write_text("\n".join(md) + "\n")
    return p
