"""LEGO in small: the local sequence of docs/training.md ("LEGO: grounding"), run as written in a fresh folder with
overrides that shrink it: synthetic grounding shards -> feature sets -> stage 1 (adapters, LLM frozen) -> stage 2
(grounding, LLM + adapters: boxes first, then spans and boxes from that export) -> stage 3 (instructions + grounding, from stage 2's LLM) -> both grounding evaluations."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from sequences import run_sequence, vlp_commands

SHRINK = {
    "make-shards": ["videos=2", "images=2", "instructions=4", "when=4", "where=4", "when_heldout=2",
                    "where_heldout=2", "samples_per_shard=4", "num_frames=8"],
    "precompute": ["ray.progress_bars=false"],
    "train": ["epochs=1", "max_steps=1", "batch.global_size=2", "batch.micro_size=2", "scaling.num_workers=1",
              "tensorboard=false", "ray.progress_bars=false"],
    "eval": ["--max-samples", "2", "--max-new-tokens", "4"],
}


def lego_sequence() -> list[list[str]]:
    text = (ROOT / "docs" / "training.md").read_text()
    return vlp_commands(text[text.index("## LEGO: grounding"):])


def test_the_documented_sequence_is_the_one_this_test_runs():
    cmds = lego_sequence()
    assert [c[0] for c in cmds] == ["make-shards"] + ["precompute"] * 5 + ["train"] * 4 + ["eval"] * 2
    assert all((ROOT / c[c.index("--config") + 1]).is_file() for c in cmds if "--config" in c)


@pytest.mark.slow
@pytest.mark.ray
def test_lego_local_sequence_runs_as_documented(tmp_path):
    p = run_sequence([[*c, *SHRINK[c[0]]] for c in lego_sequence()], tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    runs = tmp_path / "runs" / "lego_local"
    s2 = (runs / "train" / "stage2" / "config.yaml").read_text()
    assert s2.count("init_from: runs/lego_local/train/stage2_boxes/export") == 2  # the adapters and the LLM
    s3 = runs / "train" / "stage3"
    saved = (s3 / "config.yaml").read_text()
    assert "init_from: runs/lego_local/train/stage2/export" in saved
    info = json.loads((s3 / "export" / "vlp_model.json").read_text())["model"]
    assert info["connector"]["type"] == "per_modality" and info["llm"]["init_from"] is None
    assert "temporal_grounding on runs/lego_local/features/grounding_heldout (2 questions)" in p.stdout
    assert "referring on runs/lego_local/features/grounding_heldout (2 questions)" in p.stdout
    assert "best constant answer" in p.stdout
