"""The run report from run folders alone (no Ray, no training): tables, error/skip counts, plots."""

from __future__ import annotations

import json

from vlp.synth.report import make_report


def _run(d, losses, skipped):
    d.mkdir(parents=True)
    rows = [{"step": i + 1, "loss": l, "samples_per_s": 10.0 + i, "data_wait_frac": 0.1, "padding_frac": 0.05}
            for i, l in enumerate(losses)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "train_summary.json").write_text(json.dumps({"steps": len(losses), "skipped": skipped}))
    return str(d)


def test_report_counts_feature_errors_and_training_skips(tmp_path):
    fs = tmp_path / "features" / "instruct"
    fs.mkdir(parents=True)
    (fs / "manifest.json").write_text(json.dumps({"totals": {"samples_ok": 7, "samples_failed": 2},
                                                  "mode": "valley_pooled", "shards": {"a": {}, "b": {}}}))
    (fs / "summary.json").write_text(json.dumps({"errors_by_reason": {"decode: corrupt video": 2}}))
    runs = {"stage1": _run(tmp_path / "s1", [5.0, 4.0, 3.0], {}),
            "stage2": _run(tmp_path / "s2", [3.0, 1.0], {"over max_length": 3})}
    evals = {"stage2 (valley)": {"by_type": {"color": {"n": 4, "choice_acc": 0.75, "gen_acc": 0.5, "chance": 0.25}}}}
    md = make_report(tmp_path / "report", runs, {"instruct": str(fs)}, evals).read_text()
    assert "| instruct | 7 | 2 | valley_pooled | 2 |" in md
    assert "| instruct: decode: corrupt video | 2 |" in md and "| stage2: skipped, over max_length | 3 |" in md
    assert "| stage1 | 3 | 5.000 | 3.000 |" in md and "| color | 4 | 0.25 | 0.75 | 0.50 |" in md
    for f in ("loss.png", "throughput.png", "data_wait.png", "padding.png", "errors.png"):
        assert (tmp_path / "report" / f).stat().st_size > 500, f


def test_report_says_when_nothing_failed(tmp_path):
    md = make_report(tmp_path / "report", {"stage1": _run(tmp_path / "s1", [2.0, 1.0], {})}, {}, {}).read_text()
    assert "None: every sample was decoded, encoded and trained on." in md


def test_report_explains_the_sound_ablation_and_not_the_pooling_one_without_it(tmp_path):
    row = {"n": 4, "choice_acc": 0.75, "gen_acc": None, "chance": 0.25}
    evals = {"stage2 (valley)": {"by_type": {"sound": row}, "without": None},
             "stage2 (valley), no audio": {"by_type": {"sound": {**row, "choice_acc": 0.25}}, "without": "audio"}}
    md = make_report(tmp_path / "report", {"stage1": _run(tmp_path / "s1", [2.0, 1.0], {})}, {}, evals).read_text()
    assert "`stage2 (valley), no audio` is the same weights asked the same questions without the clips'" in md
    assert "differ only in the temporal pooler" not in md  # one pooler here: no pooling ablation to explain
    assert "| sound | 4 | 0.25 | 0.75 | - | 0.25 | - |" in md
