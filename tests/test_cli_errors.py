"""The bad-input matrix: what a new user gets wrong, run through ``vlp`` as they would run it.

Every case must exit non-zero with one ``vlp <cmd>: error: ...`` message naming what is wrong (the path, the
key) and no traceback. Checks that can happen before Ray starts do: ``init_ray`` is a tripwire here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from vlp.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Things a new user points vlp at by mistake: a text file, a tar of text, an empty folder, a bad YAML."""
    from vlp.data.tario import write_tar

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("not a video\n")
    with open(d / "texts.tar", "wb") as f:
        write_tar(f, [("a", {"txt": b"only text"})])
    (d / "empty").mkdir()
    (d / "junk").mkdir()
    for name in ("a.tar", "b.tar"):
        (d / "junk" / name).write_bytes(b"x" * 2048)
    (d / "broken.yaml").write_text("run_name: x\ndata: {sets: [\n")
    (d / "ann.json").write_text('[{"id": "1", "conversations": [{"from": "human", "value": "hi"}, '
                                '{"from": "gpt", "value": "hello"}]}]')
    return d


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    import vlp.runtime

    def tripwire(*a, **k):
        raise AssertionError("Ray was started before the mistake was caught")

    monkeypatch.setattr(vlp.runtime, "init_ray", tripwire)


def run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


def check(rc: int, text: str, cmd: str, *names: str, code: int = 2) -> str:
    """Non-zero exit (``code``), no traceback, one error line for ``cmd`` naming every one of ``names``."""
    assert rc == code, text
    assert "Traceback" not in text, text
    err = text[text.index(f"vlp {cmd}: error: "):]
    for n in names:
        assert n in err, (n, err)
    return err


# ------------------------------------------------------------------------ config-driven commands (no model)

CONFIG_CASES = [  # (id, argv with {d} = the bad-things folder, words the message must hold, exit code)
    ("config file missing", ["train", "--config", "{d}/nope.yaml"], ["{d}/nope.yaml", "does not exist"], 2),
    ("yaml syntax error", ["train", "--config", "{d}/broken.yaml"], ["{d}/broken.yaml", "YAML syntax error"], 2),
    ("unknown key", ["make-shards", "out={d}/s", "vidoes=3"], ["vidoes", "unknown key"], 2),
    ("bad override syntax", ["make-shards", "videos"], ["videos", "key.path=value"], 2),
    ("wrong value type", ["make-shards", "videos=many"], ["videos"], 2),
    ("a config of another command", ["train", "--config", str(ROOT / "configs/local/precompute.yaml")],
     ["encoder", "unknown key"], 2),
    ("make-shards under a file", ["make-shards", "out={d}/notes.txt/shards", "videos=1", "images=0",
                                  "instructions=0", "heldout=0"], ["out={d}/notes.txt/shards", "cannot create"], 2),
    ("make-shards onto a file", ["make-shards", "out={d}/notes.txt"], ["out={d}/notes.txt", "cannot create"], 2),
    ("demo root under a file", ["demo", "root={d}/notes.txt/demo"], ["root={d}/notes.txt/demo", "cannot create"], 2),
    ("precompute on missing shards", ["precompute", "run_name=p", "data.shards=[{d}/shards/webvid-*.tar]",
                                      "output.uri={d}/features"], ["{d}/shards/webvid-*.tar", "matched nothing"], 1),
    ("precompute with a missing tower folder", ["precompute", "run_name=p", "data.shards=[{d}/texts.tar]",
                                                "output.uri={d}/features", "encoder.tower.path={d}/models/clip"],
     ["encoder.tower.path", "{d}/models/clip", "no such folder"], 2),
    ("precompute output under a file", ["precompute", "data.shards=[{d}/texts.tar]",
                                        "output.uri={d}/notes.txt/features"],
     ["output.uri={d}/notes.txt/features", "cannot create"], 2),
    ("pack out under a file", ["pack", "--annotations", "{d}/ann.json", "--out", "{d}/notes.txt/shards"],
     ["out={d}/notes.txt/shards", "cannot create"], 2),
    ("pack annotations missing", ["pack", "--annotations", "{d}/llava/*.json", "--out", "{d}/shards"],
     ["{d}/llava/*.json"], 2),
    ("pack with an unknown format", ["pack", "--format", "coco", "--annotations", "{d}/ann.json", "--out", "{d}/s"],
     ["format", "coco"], 2),
    ("infer on a missing model", ["infer", "model={d}/runs/export", "shards=[{d}/texts.tar]", "output={d}/inf"],
     ["{d}/runs/export", "does not exist"], 2),
    ("infer on a folder that is no export", ["infer", "model={d}/empty", "shards=[{d}/texts.tar]",
                                             "output={d}/inf"], ["{d}/empty", "not a model export"], 2),
    ("inspect a text file", ["inspect", "{d}/notes.txt"], ["{d}/notes.txt", "not a tar shard", "not a feature set"], 2),
    ("inspect a folder of non-tars", ["inspect", "{d}/junk"], ["none of the 2 shard(s)", "{d}/junk", "a tar shard"], 2),
    ("inspect a missing path", ["inspect", "{d}/nothing"], ["{d}/nothing", "does not exist"], 1),
]


@pytest.mark.parametrize("argv,names,code", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_and_data_mistakes(bad, capsys, no_ray, argv, names, code):
    argv = [a.format(d=bad) for a in argv]
    rc, text = run(capsys, *argv)
    check(rc, text, argv[0], *(n.format(d=bad) for n in names), code=code)


# ------------------------------------------------------------------------ train: caught before Ray starts

TRAIN_CASES = [
    ("llm path missing", ["model.llm.path={d}/models/vicuna"], ["model.llm.path", "{d}/models/vicuna", "no such"]),
    ("llm path ./ missing", ["model.llm.path=./models/vicuna"], ["model.llm.path", "./models/vicuna"]),
    ("tokenizer path missing", ["model.llm.tokenizer=models/vicuna/tok"], ["model.llm.tokenizer", "models/vicuna/tok"]),
    ("feature set missing", ["data.sets=[{{uri: {d}/features/pretrain}}]"], ["data.sets[0].uri", "{d}/features/pretrain"]),
    ("feature set incomplete", ["data.sets=[{{uri: {d}/empty}}]"], ["data.sets[0].uri", "{d}/empty", "incomplete"]),
    ("output_dir under a file", ["output_dir={d}/notes.txt/runs"], ["output_dir=", "notes.txt/runs", "cannot create"]),
    ("stage-1 connector missing", ["model.connector.init_from={d}/stage1/export"],
     ["model.connector.init_from", "{d}/stage1/export"]),
]


@pytest.mark.parametrize("overrides,names", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_mistakes_fail_before_ray(bad, capsys, no_ray, overrides, names):
    base = {"run_name": "r", "output_dir": f"{bad}/train", "data.sets": f"[{{uri: {bad}/empty}}]"}
    for o in overrides:
        base[o.split("=", 1)[0]] = o.split("=", 1)[1].format(d=bad)
    rc, text = run(capsys, "train", *(f"{k}={v}" for k, v in base.items()))
    check(rc, text, "train", *(n.format(d=bad) for n in names))


def test_hub_ids_and_presets_are_not_local_paths():
    """The rule: only absolute, ./ ../ ~ or multi-'/' paths must exist; org/name and preset:NAME pass untouched."""
    from vlp.models.presets import looks_local

    assert not any(map(looks_local, ["lmsys/vicuna-7b-v1.5", "gpt2", "preset:tiny-llama", "s3://b/m/llm"]))
    assert all(map(looks_local, ["/abs/llm", "./llm", "../llm", "~/llm", "runs/x/export/llm"]))


# ------------------------------------------------------------------------ commands that load a model export

def test_eval_and_chat_on_paths_that_are_no_export(bad, export, capsys):
    for cmd, extra in (("eval", ["--features", str(bad / "empty")]), ("chat", ["hello"])):
        rc, text = run(capsys, cmd, "--model", str(bad / "runs" / "export"), *extra)
        check(rc, text, cmd, str(bad / "runs" / "export"), "does not exist")
        for not_export in (bad / "empty", export / "llm"):  # an empty folder, a folder inside an export
            rc, text = run(capsys, cmd, "--model", str(not_export), *extra)
            check(rc, text, cmd, str(not_export), "not a model export", "vlp_model.json")


def test_infer_output_under_a_file_fails_before_ray(bad, export, capsys, no_ray):
    rc, text = run(capsys, "infer", f"model={export}", f"shards=[{bad}/texts.tar]", f"output={bad}/notes.txt/inf")
    check(rc, text, "infer", f"output={bad}/notes.txt/inf", "cannot create")


def test_eval_on_paths_that_are_no_feature_set(bad, export, capsys):
    rc, text = run(capsys, "eval", "--model", str(export), "--features", str(bad / "features" / "heldout"))
    check(rc, text, "eval", str(bad / "features" / "heldout"), "does not exist")
    rc, text = run(capsys, "eval", "--model", str(export), "--features", str(bad / "empty"))
    check(rc, text, "eval", str(bad / "empty"), "not a feature set")


EVAL_CASES = [  # vlp eval --task videoqa/mcq: (id, flags after --model EXPORT, words the message must hold);
    # {d} = a folder with media/, qa.json (MSRVTT-QA rows), q.json (ActivityNet questions), obj.json (a JSON object)
    ("synthetic without --features", [], ["--task synthetic needs --features"]),
    ("videoqa without --questions", ["--task", "videoqa", "--media-root", "{d}/media"],
     ["--task videoqa needs --questions"]),
    ("mcq without --media-root", ["--task", "mcq", "--questions", "{d}/qa.json"], ["--task mcq needs --media-root"]),
    ("questions file missing", ["--task", "videoqa", "--questions", "{d}/nope.json", "--media-root", "{d}/media"],
     ["--questions {d}/nope.json", "no such file"]),
    ("questions file not JSON", ["--task", "mcq", "--questions", "{d}/notes.txt", "--media-root", "{d}/media"],
     ["--questions {d}/notes.txt", "not a JSON file"]),
    ("questions file not a list", ["--task", "videoqa", "--questions", "{d}/obj.json", "--media-root", "{d}/media"],
     ["--questions {d}/obj.json", "JSON dict", "not the list"]),
    ("unknown qa format", ["--task", "videoqa", "--questions", "{d}/qa.json", "--media-root", "{d}/media",
                           "--qa-format", "tgif"], ["--qa-format tgif", "unknown format", "activitynet, msrvtt"]),
    ("questions of no known format", ["--task", "videoqa", "--questions", "{d}/odd.json", "--media-root",
                                      "{d}/media"], ["--questions {d}/odd.json", "unknown QA format", "clip"]),
    ("activitynet questions without answers", ["--task", "videoqa", "--questions", "{d}/q.json", "--media-root",
                                               "{d}/media"], ["activitynet format", "--answers"]),
    ("media root missing", ["--task", "videoqa", "--questions", "{d}/qa.json", "--media-root", "{d}/videos"],
     ["--media-root {d}/videos", "no such folder"]),
    ("a flag of another task", ["--task", "mcq", "--questions", "{d}/qa.json", "--media-root", "{d}/media",
                                "--answers", "{d}/qa.json"], ["--answers does not apply to --task mcq"]),
    ("--out under a file", ["--task", "videoqa", "--questions", "{d}/qa.json", "--media-root", "{d}/media",
                            "--out", "{d}/notes.txt/out"], ["--out={d}/notes.txt/out", "cannot create"]),
]


@pytest.mark.parametrize("flags,names", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES])
def test_eval_benchmark_mistakes(export, tmp_path, capsys, flags, names):
    (tmp_path / "media").mkdir()
    (tmp_path / "notes.txt").write_text("not json\n")
    (tmp_path / "obj.json").write_text('{"questions": []}')
    (tmp_path / "odd.json").write_text('[{"clip": "a", "q": "b"}]')
    (tmp_path / "qa.json").write_text('[{"video_id": 7, "question": "what?", "answer": "x", "id": 0}]')
    (tmp_path / "q.json").write_text('[{"video_name": "abc", "question": "what?", "question_id": "q1"}]')
    rc, text = run(capsys, "eval", "--model", str(export), *(f.format(d=tmp_path) for f in flags))
    check(rc, text, "eval", *(n.format(d=tmp_path) for n in names))


@pytest.mark.parametrize("flag,name,words", [
    ("--video", "clip.mp4", ["no such file"]),
    ("--video", "texts.tar", ["not a video or image", "unrecognised media"]),
    ("--image", "notes.txt", ["not a video or image"]),
    ("--image", "empty", ["is a folder"]),
])
def test_chat_on_bad_media(bad, export, capsys, flag, name, words):
    rc, text = run(capsys, "chat", "--model", str(export), flag, str(bad / name), "What color is the shape?")
    check(rc, text, "chat", str(bad / name), *words)


# ------------------------------------------------------------------------ as the user sees it: a real process

def vlp(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    return subprocess.run([sys.executable, "-m", "vlp.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_a_real_process_prints_one_line_and_the_exit_code(bad):
    p = vlp("chat", "--model", str(bad / "runs" / "export"), "--video", str(bad / "notes.txt"), "hi")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == (f"vlp chat: error: model {bad / 'runs' / 'export'} does not exist; a model export "
                                "is the export/ folder a training run writes (e.g. runs/demo/train/stage2/export)")
    p = vlp("make-shards", f"out={bad}/notes.txt/shards")
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert p.stderr.strip().splitlines()[-1] == f"vlp make-shards: error: out={bad}/notes.txt/shards: cannot " \
                                                "create this folder (Not a directory)"


def test_a_real_process_train_with_a_missing_llm_fails_without_starting_ray(bad):
    p = vlp("train", "run_name=r", f"output_dir={bad}/train", f"data.sets=[{{uri: {bad}/empty}}]",
            "model.llm.path=../models/my-llm")
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert "model.llm.path" in p.stderr and "../models/my-llm" in p.stderr
    assert "Ray" not in p.stderr + p.stdout  # no "Started a local Ray instance"


def test_a_second_training_into_a_run_folder_is_refused_naming_the_first(bad, capsys, no_ray, tmp_path):
    from vlp.writer_lock import WriterLock

    run_dir = tmp_path / "train" / "r"
    with WriterLock(str(run_dir), "the run folder", command="vlp train") as first:
        rc, text = run(capsys, "train", "run_name=r", f"output_dir={tmp_path}/train", f"data.sets=[{{uri: {bad}/empty}}]")
        check(rc, text, "train", "the run folder", str(run_dir), "vlp train", f"pid {first.record['pid']}", code=1)
        assert sorted(p.name for p in run_dir.iterdir()) == [".vlp-writer.json"]  # nothing written by the second
    assert not run_dir.exists()  # the lock made the folder and took it away again


def test_a_training_that_fails_its_checks_leaves_no_run_folder(bad, capsys, no_ray, tmp_path):
    rc, text = run(capsys, "train", "run_name=r", f"output_dir={tmp_path}/train", f"data.sets=[{{uri: {bad}/empty}}]")
    check(rc, text, "train", "data.sets[0].uri", code=rc)
    assert rc != 0 and not (tmp_path / "train" / "r").exists()
