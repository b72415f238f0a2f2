"""The README's local command sequence (its CLI section, up to ``# and``), run as written in a fresh folder.

Only overrides appended to each command shrink it (tiny shard counts, one training step, one worker); the
commands, config files and paths are the README's. They run in one driver process (one Ray start, as cheap as
the sequence gets) whose working directory is an empty temp folder, so every ``runs/local/...`` lands there.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from sequences import run_sequence, vlp_commands

SHRINK = {  # per command: appended to the README's line
    "make-shards": ["videos=4", "images=2", "instructions=4", "heldout=2", "samples_per_shard=4", "num_frames=8"],
    "precompute": ["ray.progress_bars=false"],
    "train": ["epochs=1", "max_steps=1", "batch.global_size=2", "batch.micro_size=2", "scaling.num_workers=1",
              "tensorboard=false", "ray.progress_bars=false"],
    "eval": ["--max-samples", "1"],
    "infer": ["max_new_tokens=2", "ray.progress_bars=false"],
    "inspect": [],
}

def readme_sequence() -> list[list[str]]:
    """The ``vlp`` lines of the README's CLI block before ``# and``: comments and ``[optional]`` parts dropped."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## The CLI"):text.index("## On a cluster")]
    return vlp_commands(block)


def test_the_readme_sequence_is_the_one_this_test_runs():
    cmds = readme_sequence()
    assert [c[0] for c in cmds] == ["make-shards", "precompute", "precompute", "precompute", "train", "train",
                                    "eval", "infer", "inspect", "inspect"]
    for c in cmds:  # every config it names is shipped
        if "--config" in c:
            assert (ROOT / c[c.index("--config") + 1]).is_file(), c


@pytest.mark.slow
@pytest.mark.ray
def test_readme_local_sequence_runs_as_written(tmp_path):
    p = run_sequence([[*c, *SHRINK[c[0]]] for c in readme_sequence()], tmp_path)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-4000:]
    runs = tmp_path / "runs" / "local"
    for name in ("pretrain", "instruct", "heldout"):
        assert json.loads((runs / "features" / name / "manifest.json").read_text())["totals"]["samples_failed"] == 0
    s2 = runs / "train" / "stage2"
    assert json.loads((s2 / "train_summary.json").read_text())["steps"] == 1
    assert "init_from: runs/local/train/stage1/export" in (s2 / "config.yaml").read_text()
    assert (s2 / "export" / "vlp_model.json").is_file()
    assert "eval runs/local/train/stage2/export on runs/local/features/heldout" in p.stdout
    answers = (runs / "infer" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 2  # the two held-out clips
    assert "feature set (complete)" in p.stdout and "shard set: 4 shard(s)" in p.stdout


def test_workers_get_the_drivers_relative_model_paths_made_absolute(tmp_path, monkeypatch):
    """Ray Train runs workers in folders of their own: the README's relative ``init_from`` (stage 1's export) and
    a relative local LLM must reach them absolute; hub ids and presets stay as they are."""
    from vlp.config import validate
    from vlp.train import TrainConfig
    from vlp.train.trainer import config_for_workers

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "local" / "train" / "stage1" / "export").mkdir(parents=True)
    (tmp_path / "models" / "llm").mkdir(parents=True)
    cfg = validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "f"}]}, "model": {
        "connector": {"init_from": "runs/local/train/stage1/export"},
        "llm": {"path": "./models/llm", "tokenizer": "org/name"}}})
    m = config_for_workers(cfg)["model"]
    assert m["connector"]["init_from"] == str(tmp_path / "runs" / "local" / "train" / "stage1" / "export")
    assert m["llm"]["path"] == str(tmp_path / "models" / "llm") and m["llm"]["tokenizer"] == "org/name"
    assert config_for_workers(validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "f"}]}}))[
        "model"]["llm"]["path"] == "preset:tiny-llama"
    # model.tower's path and init_from (stage 1's export, whose tower/ stage 2 starts from) too
    (tmp_path / "models" / "tower").mkdir(parents=True)
    cfg = validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "f"}]}, "model": {"tower": {
        "path": "./models/tower", "init_from": "runs/local/train/stage1/export"}}})
    t = config_for_workers(cfg)["model"]["tower"]
    assert t["path"] == str(tmp_path / "models" / "tower")
    assert t["init_from"] == str(tmp_path / "runs" / "local" / "train" / "stage1" / "export")
    hub = validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "f"}]}, "model": {"tower": {
        "path": "openai/clip-vit-large-patch14"}}})
    assert config_for_workers(hub)["model"]["tower"]["path"] == "openai/clip-vit-large-patch14"
