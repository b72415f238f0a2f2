"""The demo config end to end (what `make demo` runs): shards -> features -> stage 1 (ZeRO-1) -> stage 2
(ZeRO-2) -> the pooling ablation (stage 2 again with pooler patch_mean) -> evaluation of both -> report; the
model must learn, the ablation must show what Valley's per-frame CLS tokens buy, and a re-run must reuse every
finished step.

Stated targets (measured on a 2-core CPU, docs/training.md "Pooling ablation"): stage-2 loss falls at least 5x,
stage-1 loss falls, held-out colour accuracy (choice and generated) at least 0.5; with pooler `valley` the
model tells a direction from its opposite on at least 0.7 of the held-out clips and names it (out of 4) on at
least 0.5, while `patch_mean` (no CLS tokens) stays within 0.1 of chance (0.5) on direction-vs-opposite: the
held-out clips come in reversed pairs, on which an order-blind model scores 0.5 by construction.

The suite runs exactly `make demo` (stage 2 and the ablation: 600 steps of 32 samples, 100 epochs each; cheap
since epochs are planned on the workers, vlp.train.held). Measured on a loaded 2-core machine (2026-12-02):
valley 0.78 direction / 0.88 direction-vs-opposite / 0.75 shape, patch_mean 0.41 / 0.50 / 0.50. The half-size
stage 2 the suite ran before (600 steps of 16) gave valley 0.69 / 0.78 with the same seed and 0.59 direction-vs-
opposite with another data order: too close to the 0.7 bar to be a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from vlp.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _losses(run_dir) -> list[float]:
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_demo_end_to_end_learns_and_the_ablation_shows_what_cls_tokens_buy(ray_local, tmp_path):
    from vlp.synth.demo import DemoConfig, run_demo

    root = tmp_path / "demo"
    cfg = load_config(DemoConfig, ROOT / "configs/local/demo.yaml", [f"root={root}", "ray.progress_bars=false"])
    res = run_demo(cfg, log=print)

    l1, l2 = _losses(res["stage1"]["run_dir"]), _losses(res["stage2"]["run_dir"])
    assert sum(l1[-3:]) / 3 < l1[0]
    assert l2[0] / (sum(l2[-5:]) / 5) >= 5, (l2[0], l2[-5:])
    colour = res["eval"]["stage2 (valley)"]["by_type"]["color"]
    assert colour["n"] == 32 and colour["chance"] == 0.25
    assert colour["choice_acc"] >= 0.5 and colour["gen_acc"] >= 0.5, res["eval"]
    assert set(res["eval"]) == {"stage2 (valley)", "stage2 (patch_mean)"}
    for ev in res["eval"].values():
        assert ev["by_type"]["direction"]["n"] == 32 and ev["by_type"]["direction_vs_opposite"]["chance"] == 0.5
    assert res["eval"]["stage2 (patch_mean)"]["pooler"] == "patch_mean"
    valley, blind = (res["eval"][f"stage2 ({p})"]["by_type"] for p in ("valley", "patch_mean"))
    summary = {p: {q: round(v["choice_acc"], 2) for q, v in bt.items()} for p, bt in (("valley", valley),
                                                                                       ("patch_mean", blind))}
    assert valley["direction_vs_opposite"]["choice_acc"] >= 0.7, summary
    assert valley["direction"]["choice_acc"] >= 0.5 and valley["direction"]["gen_acc"] >= 0.5, summary
    assert abs(blind["direction_vs_opposite"]["choice_acc"] - 0.5) <= 0.1, summary
    la = _losses(res["ablation"]["run_dir"])
    assert len(la) == len(l2) and la[0] / (sum(la[-5:]) / 5) >= 5, (la[0], la[-5:])  # same steps, learns too

    rep = root / "report"
    for f in ("report.md", "loss.png", "throughput.png", "data_wait.png", "padding.png", "errors.png"):
        assert (rep / f).stat().st_size > 500, f
    md = (rep / "report.md").read_text()
    assert "| question | n | chance | stage2 (valley) choice | stage2 (valley) generated | stage2 (patch_mean) choice" in md
    assert "| color | 32 | 0.25 |" in md and "| direction_vs_opposite | 32 | 0.50 |" in md
    assert "## Answers on held-out clips" in md
    assert (root / "eval.json").exists() and (root / "demo_config.yaml").exists()
    for name in ("pretrain", "instruct", "heldout"):
        assert (root / "features" / name / "manifest.json").exists()
    assert (root / "train" / "stage2" / "export" / "vlp_model.json").exists()

    lines = []
    again = run_demo(cfg, log=lines.append)
    text = "\n".join(map(str, lines))
    assert "shards: reused" in text and text.count("already complete, 0 to do") == 3
    assert again["stage1"]["reused"] and again["stage2"]["reused"] and again["ablation"]["reused"]
    assert "evaluation: reused" in text and again["eval"] == res["eval"]
