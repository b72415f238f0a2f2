"""mPLUG-Owl in small: the local sequence of docs/training.md ("Trainable vision tower"), run as written in a fresh
folder with overrides that shrink it (tiny shard counts, two steps per stage, one worker): synthetic shards with
text-only instructions -> pixel sets -> stage 1 (tower + abstractor trained, LLM frozen) -> stage 2 (LoRA, the
stage-1 tower and abstractor frozen, text-only rows mixed in) -> evaluation."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from test_readme_local import run_sequence, vlp_commands

SHRINK = {
    "make-shards": ["videos=4", "images=2", "instructions=4", "heldout=2", "text_only=4", "samples_per_shard=4",
                    "num_frames=8"],
    "precompute": ["ray.progress_bars=false"],
    "train": ["epochs=1", "max_steps=2", "batch.global_size=2", "batch.micro_size=1", "scaling.num_workers=1",
              "tensorboard=false", "ray.progress_bars=false"],
    "eval": ["--max-samples", "1"],
}


def owl_sequence() -> list[list[str]]:
    text = (ROOT / "docs" / "training.md").read_text()
    return vlp_commands(text[text.index("## Trainable vision tower"):])


def test_the_documented_sequence_is_the_one_this_test_runs():
    cmds = owl_sequence()
    assert [c[0] for c in cmds] == ["make-shards"] + ["precompute"] * 4 + ["train", "train", "eval"]
    assert all((ROOT / c[c.index("--config") + 1]).is_file() for c in cmds if "--config" in c)


@pytest.mark.slow
@pytest.mark.ray
def test_mplug_owl_local_sequence_runs_as_documented(tmp_path):
    p = run_sequence([[*c, *SHRINK[c[0]]] for c in owl_sequence()], tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    runs = tmp_path / "runs" / "owl_local"
    for name, mode in (("pretrain", "pixels"), ("instruct", "pixels"), ("text", "pixels"), ("heldout", "pixels")):
        assert json.loads((runs / "features" / name / "fingerprint.json").read_text())["mode"] == mode
    text = json.loads((runs / "features" / "text" / "manifest.json").read_text())["totals"]
    assert text["samples_ok"] == 4 and text["samples_failed"] == 0
    s1, s2 = runs / "train" / "stage1", runs / "train" / "stage2"
    assert (s1 / "export" / "tower" / "config.json").is_file()
    stage2 = json.loads((s2 / "train_summary.json").read_text())
    assert stage2["steps"] == 2
    info = json.loads((s2 / "export" / "vlp_model.json").read_text())["model"]
    assert info["tower"]["path"].endswith("stage2/export/tower") and info["tower"]["init_from"] is None
    assert "eval runs/owl_local/train/stage2/export on runs/owl_local/features/heldout" in p.stdout
