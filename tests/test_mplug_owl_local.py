"""mPLUG-Owl in small: the local sequence of docs/training.md ("Trainable vision tower"), run as written in a fresh
folder with overrides that shrink it (tiny shard counts, two or three steps per stage, one worker): synthetic shards
with text-only instructions -> pixel sets -> stage 1 (tower + abstractor trained, LLM frozen, ZeRO-2, activation
checkpointing; an injected failure at step 2 and the resume from the step-1 checkpoint) -> stage 2 (LoRA, the
stage-1 tower and abstractor frozen, text-only rows mixed in) -> evaluation. Then the stage-1 export: the trained
tower saved, the LLM untouched, the reloaded model giving the trained one's probe logits, chat through its tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from sequences import run_sequence, vlp_commands

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
    cmds = [[*c, *SHRINK[c[0]]] for c in owl_sequence()]
    stage1 = next(c for c in cmds if any(a.endswith("train_local_stage1.yaml") for a in c))
    stage1 += ["max_steps=3", "checkpoint.every_n_steps=1", "debug.fail_at_step=2"]  # fail once, resume
    p = run_sequence(cmds, tmp_path)
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
    check_stage1(s1)


def check_stage1(s1) -> None:
    """Stage 1 failed at step 2, resumed from step 1, and exported the tower it trained."""
    import numpy as np
    import torch
    import yaml
    from safetensors.torch import load_file

    from vlp.chat import ChatSession
    from vlp.formats.export import load_model, probe_logits
    from vlp.models.presets import resolve_model_path
    from vlp.synth.shards import encode_mp4

    assert (s1 / ".injected_failure").exists()
    assert [json.loads(x)["step"] for x in (s1 / "samples.jsonl").read_text().splitlines()] == [1, 2, 2, 3]
    saved = yaml.safe_load((s1 / "config.yaml").read_text())["model"]["tower"]
    assert saved["mean"] and saved["std"]  # resolved from the set's fingerprint, saved with the run
    base = load_file(str(Path(resolve_model_path("preset:tiny-clip-synth")) / "model.safetensors"))
    tower = load_file(str(s1 / "export" / "tower" / "model.safetensors"))
    assert set(tower) == set(base) and any(not torch.equal(base[k], tower[k]) for k in base)  # trained
    llm0 = load_file(str(Path(resolve_model_path("preset:tiny-llama")) / "model.safetensors"))
    llm1 = load_file(str(s1 / "export" / "llm" / "model.safetensors"))
    assert all(torch.equal(llm0[k], llm1[k]) for k in llm0)  # frozen
    probe = json.loads((s1 / "train_summary.json").read_text())["probe"]
    model, _, _ = load_model(str(s1 / "export"))
    assert model.tower is not None and probe["mode"] == "pixels"
    assert torch.allclose(probe_logits(model, probe), torch.tensor(probe["logits"]), atol=1e-4)
    clip = s1 / "clip.mp4"
    clip.write_bytes(encode_mp4(np.random.default_rng(0).integers(0, 255, (6, 64, 64, 3), dtype=np.uint8), 6))
    chat = ChatSession(str(s1 / "export"))  # encodes with the export's own trained tower
    assert chat.load_media(str(clip)) == ["video"] and chat.items[0].feats.shape == (4, 65, 64)
    assert isinstance("".join(chat.ask("What color is the shape?", max_new_tokens=3)), str)
