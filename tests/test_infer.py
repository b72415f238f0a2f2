"""vlp infer: batch answers over a shard set with Ray Data; bad samples become error records."""

from __future__ import annotations

import json

import pytest

from vlp.config import validate
from vlp.formats.export import ExportInfo
from vlp.infer import InferConfig, run_infer


def test_answer_actor_runs_where_the_config_says(export, synth_shards):
    """use_gpu picks the device of the tower and the LLM (cuda; not testable here, CPU only); the CPU path
    answers a decoded batch end to end without Ray."""
    from vlp.data.media import DecodeConfig
    from vlp.data.tario import iter_tar_samples
    from vlp.infer import AnswerBatch, answer_device, decode_stage
    from vlp.precompute.stages import ReadShard, rows_batch

    base = {"model": str(export), "shards": ["x"], "output": "o"}
    assert answer_device(validate(InferConfig, base)) == "cpu"
    assert answer_device(validate(InferConfig, {**base, "use_gpu": True})) == "cuda"

    actor = AnswerBatch(str(export), None, 3, device=answer_device(validate(InferConfig, base)))
    assert next(actor.model.parameters()).device.type == "cpu" and actor.enc.tower.device.type == "cpu"
    info = ExportInfo.read(export)
    with open(synth_shards / "heldout-00000.tar", "rb") as f:
        item = next(iter_tar_samples(f))
    row = ReadShard().row("heldout-00000", item, 0.0)
    out = actor(decode_stage(info, DecodeConfig())(rows_batch([row])))
    assert out["kind"] == ["answer"] and out["key"] == [item.key], out["error"]
    assert isinstance(out["answer"][0], str) and out["question"][0] == "What color is the shape?"


@pytest.mark.ray
def test_infer_answers_every_sample_and_records_errors(ray_local, export, synth_shards, tmp_path):
    from vlp.data.tario import write_tar

    bad = tmp_path / "bad-00000.tar"
    with open(bad, "wb") as f:
        write_tar(f, [("b1", {"mp4": b"", "txt": b"x"}), ("b2", {"jpg": (synth_shards / "cc3m-00000.tar").read_bytes()[:10],
                                                              "json": json.dumps({"caption": "c"}).encode()})])
    out = tmp_path / "out"
    s = run_infer(validate(InferConfig, {
        "model": str(export), "shards": [str(synth_shards / "heldout-00000.tar"), str(bad)], "output": str(out),
        "max_new_tokens": 4, "ray": {"progress_bars": False}}), log=print)
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert s["answers"] == len(answers) == 6 and s["errors"] == len(errors) == 2
    assert {a["question"] for a in answers} == {"What color is the shape?"}  # first human turn of each sample
    assert all(a["shard"] == "heldout-00000" and a["key"] for a in answers)
    assert sorted(e["key"] for e in errors) == ["b1", "b2"] and all(e["stage"] == "decode" for e in errors)

    fixed = tmp_path / "fixed"
    run_infer(validate(InferConfig, {"model": str(export), "shards": [str(synth_shards / "webvid-00000.tar")],
                                     "question": "Which direction does the shape move?", "output": str(fixed),
                                     "max_new_tokens": 4, "ray": {"progress_bars": False}}), log=print)
    rows = [json.loads(x) for x in (fixed / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["question"] for r in rows} == {"Which direction does the shape move?"}
    # captions-only samples without a question configured become error records, not silent drops
    none = tmp_path / "none"
    s = run_infer(validate(InferConfig, {"model": str(export), "shards": [str(synth_shards / "webvid-00000.tar")],
                                         "output": str(none), "ray": {"progress_bars": False}}), log=print)
    assert s["answers"] == 0 and s["errors"] == 6
    assert "no question" in (none / "errors.jsonl").read_text()


def test_answers_two_item_and_text_only_samples(export):  # noqa: F811
    """Rows of the general read/decode stages: every item's features go to generate in placeholder order (the
    prompt keeps the row's placeholders), a text-only sample is answered without visuals; with ``question`` set,
    one placeholder per item."""
    from vlp.data.media import DecodeConfig
    from vlp.data.tario import RawSample
    from vlp.infer import AnswerBatch, decode_stage
    from vlp.precompute.stages import ReadShard, batch_rows, rows_batch
    from vlp.synth.shards import Attributes, encode_jpeg, encode_mp4, render_clip

    import numpy as np

    rng = np.random.default_rng(0)
    img = encode_jpeg(render_clip(Attributes("red", "square", "left"), rng, 64, 64, 1)[0])
    vid = encode_mp4(render_clip(Attributes("blue", "circle", "right"), rng, 64, 64, 8), 8)
    turn = {"from": "human", "value": "<image>\nand <video>\nWhat moves?"}
    raws = [RawSample("two", {"jpg": img, "mp4": vid, "json": json.dumps({"conversations": [turn]}).encode()}),
            RawSample("text", {"json": json.dumps({"conversations": [{"from": "human", "value": "Say hi."}]}).encode()})]
    rows = [ReadShard().row("s", r, 0.0) for r in raws]
    batch = decode_stage(ExportInfo.read(export), DecodeConfig())(rows_batch(rows))
    actor = AnswerBatch(str(export), None, 8)
    out = actor(batch)
    assert out["kind"] == ["answer", "answer"], out["error"]
    assert out["question"] == ["and \nWhat moves?", "Say hi."]  # placeholders not shown, but asked with them
    # the actor answers its batch in one batched generation: the answers one-at-a-time generation gives
    one = [actor.model_prompt(r, actor.prompt(r)) for r in batch_rows(batch)]
    assert out["answer"] == [actor.tok.decode(list(actor.model.generate(
        p.input_ids, p.features, p.mode, p.num_frames, max_new_tokens=8, eos_token_id=actor.tok.eos_token_id,
        modalities=p.modalities)), skip_special_tokens=True).strip() for p in one]
    asked = AnswerBatch(str(export), "Describe.", 3)
    assert asked.prompt({"modalities": ["image", "video"]}) == "<image><video>\nDescribe."
    assert asked.prompt({"modalities": []}) == "Describe."
    assert asked(batch)["kind"] == ["answer", "answer"]


def test_decoding_on_gpu_asks_for_a_gpu_fraction_and_a_missing_decoder_is_one_line(export, synth_shards, tmp_path,
                                                                                   capsys, monkeypatch):
    """decode.device=cuda: the decode tasks ask Ray for ``decode_gpus`` of a GPU; a decoder that is not installed
    stops the command in one line before Ray starts."""
    import vlp.runtime
    from fake_nvdec import NeedsMissingPackage  # registers it: a backend whose package is not installed
    from vlp.cli import main
    from vlp.infer import decode_args

    assert NeedsMissingPackage.missing()
    base = {"model": str(export), "shards": ["x"], "output": "o"}
    assert decode_args(validate(InferConfig, base)) == {"batch_size": 4, "batch_format": "numpy", "memory": 512 << 20}
    gpu = validate(InferConfig, {**base, "decode": {"device": "cuda"}, "decode_gpus": 0.5})
    assert decode_args(gpu) == {"batch_size": 4, "batch_format": "numpy", "memory": 512 << 20, "num_gpus": 0.5}

    monkeypatch.setattr(vlp.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    capsys.readouterr()
    rc = main(["infer", f"model={export}", f"shards=[{synth_shards}/heldout-00000.tar]", f"output={tmp_path / 'o'}",
               "decode.device=cuda", "decode.backend=needs-missing-package"])
    text = "".join(capsys.readouterr())
    assert rc == 2 and "Traceback" not in text, text
    err = text[text.index("vlp infer: error: "):].strip()
    assert "\n" not in err and "data.decode.backend=needs-missing-package (device cuda)" in err, err
