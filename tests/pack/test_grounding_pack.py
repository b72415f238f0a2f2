"""Grounding data end to end on a local Ray: Charades-STA lines and RefCOCO refs packed with their media, precomputed,
and the truth (span in seconds, box in pixels) read back from the feature rows' meta."""

from __future__ import annotations

import json

import pytest

from media_makers import encode, frames_of
from vlp.config import validate
from vlp.synth.shards import encode_jpeg

pytestmark = pytest.mark.ray


def _rows(uri: str) -> dict:
    from vlp.formats.featureset import iter_feature_rows

    return {json.loads(r["meta"])["id"]: r for r in iter_feature_rows(uri)}


def test_grounding_truth_travels_from_annotations_to_feature_rows_and_is_scored(ray_local, export, tmp_path, capsys):
    from vlp.pack import PackConfig, run_pack
    from vlp.precompute import PrecomputeConfig, run_precompute

    media = tmp_path / "media"
    media.mkdir()
    (media / "AO8RW.mp4").write_bytes(encode(frames_of(16, color="green")))
    (media / "COCO_1.jpg").write_bytes(encode_jpeg(frames_of(1, color="red", shape="circle")[0]))
    (tmp_path / "sta.txt").write_text("AO8RW 0.5 1.5##the shape moves.\nMISSING 0 1##no clip.\n")
    (tmp_path / "Charades.csv").write_text("id,length\nAO8RW,2.0\nMISSING,3.0\n")
    (tmp_path / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "COCO_1.jpg", "width": 96, "height": 64}],
        "annotations": [{"id": 11, "image_id": 1, "bbox": [10, 10, 20, 30]}]}))
    (tmp_path / "refs.json").write_text(json.dumps([
        {"ref_id": 5, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "the red circle"}]},
        {"ref_id": 6, "ann_id": 11, "image_id": 1, "split": "train", "sentences": [{"sent": "left out"}]}]))
    lines: list[str] = []
    packs = {
        "sta": {"type": "charades_sta", "durations": str(tmp_path / "Charades.csv")},
        "ref": {"type": "refcoco", "instances": str(tmp_path / "instances.json"), "split": "val"}}
    files = {"sta": "sta.txt", "ref": "refs.json"}
    for name, fmt in packs.items():
        man = run_pack(validate(PackConfig, {"format": fmt, "annotations": [str(tmp_path / files[name])],
                                             "media_root": str(media), "out": str(tmp_path / name),
                                             "ray": {"progress_bars": False}}), lines.append)
        run_precompute(validate(PrecomputeConfig, {
            "data": {"shards": [str(tmp_path / name / "*.tar")], "sampling": {"num_frames": 4}},
            "output": {"uri": str(tmp_path / f"{name}_features")}, "ray": {"progress_bars": False}}),
            log=lambda *_: None)
        assert man["totals"]["packed"] == 1, (name, man)
    sta = _rows(str(tmp_path / "sta_features"))["AO8RW"]
    g = json.loads(sta["meta"])["grounding"]
    assert g["format"]["unit"] == "relative" and g.pop("format")
    assert g == {"task": "temporal_grounding", "span": [0.5, 1.5], "duration": 2.0, "query": "the shape moves."}
    assert json.loads(sta["conversations"])[1]["value"] == "[0.25, 0.75]"
    ref = _rows(str(tmp_path / "ref_features"))["5"]
    g = json.loads(ref["meta"])["grounding"]
    assert g["box"] == [10.0, 10.0, 30.0, 40.0] and (g["width"], g["height"]) == (96, 64)
    man = json.loads((tmp_path / "ref" / "pack_manifest.json").read_text())
    assert man["filtered"] == {"split train": 1}
    assert any("left out by the format: 1 (split train)" in ln for ln in lines)
    assert json.loads((tmp_path / "sta" / "pack_manifest.json").read_text())["totals"]["errors"] == 1  # no clip
    # vlp eval --task temporal_grounding / referring on those rows: an untrained model's answers are unreadable,
    # scored 0 and listed; the best constant answer is reported beside them
    from vlp.cli import main

    for task, name, metric in (("temporal_grounding", "sta", "R@1@0.5"), ("referring", "ref", "Acc@0.5")):
        capsys.readouterr()
        out = tmp_path / f"eval_{name}"
        assert main(["eval", "--task", task, "--model", str(export), "--features", str(tmp_path / f"{name}_features"),
                     "--max-new-tokens", "3", "--json", "--out", str(out)]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["metrics"]["n"] == 1 and rep["metrics"][metric] == 0.0 and rep["unparseable_n"] == 1
        assert rep["constant_baseline"]["value"] == 1.0  # one truth: a constant can match it
        assert json.loads((out / "results.json").read_text()) == rep
        (pred,) = json.loads((out / "predictions.json").read_text())
        assert pred["iou"] == 0.0 and pred["truth"] == (g["box"] if task == "referring" else [0.5, 1.5])
        assert f"| {metric} | 0.000 | 1.000 |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["eval", "--task", "referring", "--model", str(export), "--features",
                 str(tmp_path / "sta_features")]) != 0
    assert "holds no referring rows" in capsys.readouterr().err
