"""The vlp CLI end to end: make-shards, inspect (shards and features), demo (shrunk), job entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from vlp.cli import main


def test_make_shards_is_deterministic_and_has_a_heldout_split(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["videos=4", "images=2", "instructions=4", "heldout=2", "samples_per_shard=4"]
    assert main(["make-shards", f"out={a}", *args]) == 0
    assert main(["make-shards", f"out={b}", *args]) == 0
    names = sorted(p.name for p in a.glob("*.tar"))
    assert names == ["cc3m-00000.tar", "heldout-00000.tar", "instruct-00000.tar", "webvid-00000.tar"]
    from vlp.data.media import DecodeConfig, SamplingConfig, decode_media
    from vlp.data.tario import iter_tar_samples

    def content(path):
        """Text members byte for byte; media as decoded pixels (libx264 may vary a few bits run to run)."""
        out = []
        for s in iter_tar_samples(open(path, "rb")):
            media = next(e for e in ("mp4", "jpg") if e in s.members)
            _, dec = decode_media(s.members[media], media, SamplingConfig(num_frames=4), DecodeConfig())
            out.append((s.key, s.members["txt"], s.members["json"], dec.frames.astype(np.int16)))
        return out

    for n in names:
        ca, cb = content(a / n), content(b / n)
        assert [x[:3] for x in ca] == [x[:3] for x in cb], n
        assert all(np.abs(x[3] - y[3]).mean() < 1.0 for x, y in zip(ca, cb)), n
    assert main(["make-shards", f"out={tmp_path / 'c'}", *args, "seed=1"]) == 0
    assert [x[2] for x in content(tmp_path / "c" / "webvid-00000.tar")] != [x[2] for x in content(a / "webvid-00000.tar")]

    held = [json.loads(s.members["json"]) for s in iter_tar_samples(open(a / "heldout-00000.tar", "rb"))]
    assert all(m["split"] == "heldout" for m in held)
    conv = held[0]["conversations"]
    assert conv[0]["value"].startswith("<video>\n") and [t["from"] for t in conv] == ["human", "gpt"] * 3
    assert f"moves {held[0]['direction']}" in conv[-1]["value"] or held[0]["direction"] in json.dumps(conv)
    train = [json.loads(s.members["json"]) for s in iter_tar_samples(open(a / "webvid-00000.tar", "rb"))]
    assert all(m["split"] == "train" and m["direction"] in m["caption"] and m["color"] in m["caption"] for m in train)
    assert not {m["key"] for m in train} & {m["key"] for m in held}


def test_inspect_shards_reports_counts_and_errors(tmp_path, capsys):
    from vlp.data.tario import write_tar

    d = tmp_path / "s"
    assert main(["make-shards", f"out={d}", "videos=3", "images=2", "instructions=0", "heldout=0"]) == 0
    with open(d / "bad-00000.tar", "wb") as f:
        write_tar(f, [("k1", {"mp4": b"", "txt": b"x"}), ("k2", {"txt": b"caption only"})])
    capsys.readouterr()
    assert main(["inspect", str(d), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 7 and rep["ok"] == 6 and rep["errors"] == 1  # k2: a text-only sample
    assert rep["media_types"] == {"video": 3, "image": 2} and rep["source_frames"]["max"] == 16
    assert rep["samples_text"] == 1 and rep["items_by_modality"] == {"video": 3, "image": 2}
    assert [e["reason"] for e in rep["error_records"]][0].startswith("item 0 (mp4): empty media")
    assert main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert "7 sample(s), 6 ok, 1 error(s)" in text and "bad-00000.tar k1 [decode] item 0 (mp4): empty media" in text
    assert "text-only samples: 1" in text


@pytest.fixture(scope="module")
def shrunk_demo(ray_local, tmp_path_factory):
    """``vlp demo`` without training: shards and the three feature sets (held-out included). -> (root, args, stdout)"""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("cli") / "demo"
    args = ["demo", f"root={root}", "shards.videos=4", "shards.images=2", "shards.instructions=4",
            "shards.heldout=2", "shards.samples_per_shard=4", "ray.progress_bars=false", "train=false"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(args) == 0
    return root, args, buf.getvalue()


@pytest.mark.ray
def test_demo_shrunk_runs_and_reuses_finished_steps(shrunk_demo, capsys):
    root, args, out = shrunk_demo
    for name in ("pretrain", "instruct", "heldout"):
        man = json.loads((root / "features" / name / "manifest.json").read_text())
        assert man["totals"]["samples_failed"] == 0
    assert "feature set (complete)" in out and (root / "demo_config.yaml").exists()
    assert (root / "shards" / "webvid-00000.tar").exists()
    assert main(["inspect", str(root / "features" / "pretrain")]) == 0
    assert "6 sample(s), 0 error(s)" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "shards: reused" in out and out.count("already complete, 0 to do") == 3


@pytest.mark.ray
def test_eval_command_on_a_tiny_export_and_the_heldout_features(shrunk_demo, tmp_path, capsys):
    """``vlp eval`` (table, --json, --no-generate, --pooler) on an untrained tiny export sized to the held-out
    feature set: accuracies are not meaningful here, the command's plumbing and report are."""
    import torch
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.eval.synthetic import evaluate
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM
    from vlp.formats.export import export_model

    feats = shrunk_demo[0] / "features" / "heldout"
    fp = json.loads((feats / "fingerprint.json").read_text())
    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": fp["encoder"]["hidden_size"]}))
    exp = export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")),
                       tmp_path / "export", extra={"template": "vicuna_v1", "feature_mode": fp["mode"],
                                                  "encoder": fp["encoder"], "sampling": fp["sampling"],
                                                  "preprocess": fp["preprocess"]})
    capsys.readouterr()
    assert main(["eval", "--model", str(exp), "--features", str(feats), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == evaluate(str(exp), str(feats))  # the command reports what the library computes
    assert rep["pooler"] == "valley" and set(rep["by_type"]) == {"color", "shape", "direction",
                                                                 "direction_vs_opposite"}
    assert all(v["n"] == 2 and 0 <= v["choice_acc"] <= 1 for v in rep["by_type"].values())  # 2 held-out clips
    assert rep["by_type"]["color"]["gen_acc"] is not None and rep["by_type"]["direction_vs_opposite"]["chance"] == 0.5

    assert main(["eval", "--model", str(exp), "--features", str(feats), "--no-generate", "--pooler", "patch_mean",
                 "--max-samples", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"eval {exp} on {feats} (pooler patch_mean)"
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
    assert set(rows) == {"color", "shape", "direction", "direction_vs_opposite"}
    assert all(r[0] == "1" and r[2] == "-" for r in rows.values())  # n=1 (one clip), no generated accuracy


@pytest.mark.ray
def test_eval_refuses_a_feature_set_with_no_question_it_scores(shrunk_demo, capsys):
    """Caption pretraining features (webvid + cc3m, no Q&A): a one-line error saying what the set holds and
    which questions eval scores, not an empty table."""
    from vlp.models.presets import resolve_model_path

    feats = shrunk_demo[0] / "features" / "pretrain"
    exp = shrunk_demo[0] / "untrained-export"
    if not exp.exists():
        _tiny_export_for(feats, exp, resolve_model_path)
    capsys.readouterr()
    assert main(["eval", "--model", str(exp), "--features", str(feats)]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err and out.out == ""
    err = out.err[out.err.index("vlp eval: error: "):].strip()
    assert err.startswith(f"vlp eval: error: feature set {feats} holds no question vlp eval can score: 6 sample(s) "
                          "(2 image, 4 video); none of them has a question")
    assert "color ('What color is the shape?')" in err and "direction (" in err


def _tiny_export_for(feats, out, resolve_model_path):
    """An untrained tiny export sized to a feature set (as a trained run would write it)."""
    import torch
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.videollm import ModelConfig, VideoLLM

    fp = json.loads((feats / "fingerprint.json").read_text())
    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": fp["encoder"]["hidden_size"]}))
    return export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")), out,
                        extra={"template": "vicuna_v1", "feature_mode": fp["mode"], "encoder": fp["encoder"],
                               "sampling": fp["sampling"], "preprocess": fp["preprocess"]})


@pytest.mark.parametrize("job,config,override,expect", [
    ("precompute", "configs/local/precompute.yaml", "data.sampling.num_frames=5", "num_frames: 5"),
    ("train", "configs/local/train_stage1.yaml", "epochs=7", "epochs: 7"),
    ("pipeline", "configs/local/demo.yaml", "stage2.lr=0.007", "lr: 0.007"),
])
def test_job_entry_points_are_thin_and_load_their_configs(job, config, override, expect):
    src = (ROOT / "jobs" / f"{job}.py").read_text()
    assert len(src.splitlines()) < 150
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--config", str(ROOT / config),
                        "--print-config", override], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout


def test_job_entry_point_rejects_a_bad_config():
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / "precompute.py"), "data.shards=[]", "output.uri=o"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "data.shards" in r.stderr


def test_no_platform_package_shadowing_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert [p.name for p in (ROOT / "platform").iterdir() if p.is_file()] == []
    import platform

    assert hasattr(platform, "python_version")  # still the stdlib module


@pytest.mark.ray
def test_demo_with_sound_encodes_soundtracks_and_eval_asks_with_and_without_them(ray_local, tmp_path, capsys):
    """``shards.audio``: instruction and held-out clips carry their soundtrack as an <audio> item, precompute
    encodes it with the demo's audio tower, and ``vlp eval`` asks the sound's question with the audio item and
    (``--without audio``) without it. Untrained export: the plumbing, not the accuracies (docs/training.md)."""
    import torch
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM

    root = tmp_path / "demo"
    assert main(["demo", f"root={root}", "shards.videos=2", "shards.images=0", "shards.instructions=2",
                 "shards.heldout=2", "shards.audio=true", "ray.progress_bars=false", "train=false"]) == 0
    feats = root / "features" / "heldout"
    fp = json.loads((feats / "fingerprint.json").read_text())
    man = json.loads((feats / "manifest.json").read_text())
    assert fp["audio"]["path"] == "preset:tiny-ast-synth" and fp["audio"]["tokens_per_segment"] == 62
    assert man["totals"]["items_by_modality"] == {"video": 2, "audio": 2} and man["totals"]["samples_failed"] == 0
    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "audio_hidden_size": 64, "connector": {
        "type": "perceiver", "num_queries": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2,
        "intermediate_size": 32}}))
    exp = export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")),
                       tmp_path / "export", extra={"template": "vicuna_v1", **{k: fp[k] for k in (
                           "encoder", "sampling", "preprocess", "audio")}, "feature_mode": fp["mode"]})
    capsys.readouterr()
    for extra in ([], ["--without", "audio"]):
        assert main(["eval", "--model", str(exp), "--features", str(feats), "--no-generate", *extra]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].endswith(", audio items withheld)" if extra else "(pooler valley)")
        rows = {ln.split()[0]: ln.split()[1:] for ln in lines[2:]}
        assert rows["sound"][0] == "2" and rows["sound"][3] == "0.25"  # two clips, four words
    rc = main(["eval", "--model", str(exp), "--task", "mcq", "--without", "audio", "--questions", "q.json"])
    assert rc == 2 and "--without does not apply to --task mcq" in capsys.readouterr().err
    deaf = export_model(VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64})), AutoTokenizer.from_pretrained(
        resolve_model_path("preset:tiny-tokenizer")), tmp_path / "deaf", extra={"template": "vicuna_v1", **{
            k: fp[k] for k in ("encoder", "sampling", "preprocess")}, "feature_mode": fp["mode"]})
    assert main(["eval", "--model", str(deaf), "--features", str(feats), "--no-generate"]) == 2
    assert "was trained without audio; evaluate it with --without audio" in capsys.readouterr().err
    assert main(["eval", "--model", str(deaf), "--features", str(feats), "--no-generate", "--without", "audio"]) == 0
