"""The on-storage formats (no Ray): typed records read and write today's JSON key for key, feature sets and exports
written before this code still load, newer/unknown format versions are refused with what to do, and the feature
set's layout names every path precompute writes."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import dotted
from vlp.config import validate
from vlp.errors import UserError
from vlp.formats.export import (EXPORT_FORMAT, MODEL_CONFIG, ExportFormatError, ExportInfo, NotAnExport,
                                load_model)
from vlp.formats.featureset import (FEATURES_FORMAT, FeatureSetFormatError, FeatureSetLayout, Fingerprint,
                                    Manifest, ShardCommit, committed_shards, iter_feature_rows, read_feature_set)
from vlp.formats.records import RecordError

# Copied from a run of the code before the typed records (vlp 0.1.0: `vlp precompute` on 2 synthetic shards, and
# `export_model` with the extra run_train assembled; the manifest's config trimmed). Such files exist on disk and must
# keep loading.
SHA = "33ef98c242d667352c64df3a9f16d1d47006ccbfa3378147f3224246a3581580"
ENCODER = {"type": "clip", "path": "preset:tiny-clip", "weights_sha256": SHA, "layer": -2, "hidden_size": 64,
           "image_size": 224}
SAMPLING = {"mode": "uniform", "num_frames": 2, "fps": 1.0, "max_frames": 32}
PREPROCESS = {"size": 224, "pad_to_square": False, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "resampler": "bicubic-aa-u8-pil-like-v2"}
OLD_FINGERPRINT = {"encoder": ENCODER, "mode": "valley_pooled", "sampling": SAMPLING, "preprocess": PREPROCESS}
OLD_COMMITS = [
    {"shard": "cc3m-00000", "parts": ["parts/cc3m-00000/d579c7dbfc22.parquet"], "errors": [], "n_ok": 1, "n_err": 0,
     "expected": 1, "frames": 1, "bytes_in": 3316, "bytes_out": 35545, "media": {"image": 1}, "ignored_members": {},
     "committed_at": 1796160780.8858776},
    {"shard": "webvid-00000", "parts": ["parts/webvid-00000/c6c11744017d.parquet"], "errors": [], "n_ok": 2,
     "n_err": 0, "expected": 2, "frames": 4, "bytes_in": 9676, "bytes_out": 66370, "media": {"video": 2},
     "ignored_members": {}, "committed_at": 1796160780.8980458},
]
OLD_MANIFEST = {
    "format": "vlp-features/1", "vlp_version": "0.1.0", "created_at": 1796160780.92666, "host": "vm",
    "inputs": ["/tmp/oldrun/shards/cc3m-00000.tar", "/tmp/oldrun/shards/webvid-00000.tar"],
    "shard_names": {"/tmp/oldrun/shards/cc3m-00000.tar": "cc3m-00000",
                    "/tmp/oldrun/shards/webvid-00000.tar": "webvid-00000"},
    "shards": {"cc3m-00000": {"n_ok": 1, "n_err": 0, "expected": 1, "frames": 1, "media": {"image": 1},
                              "ignored_members": {}},
               "webvid-00000": {"n_ok": 2, "n_err": 0, "expected": 2, "frames": 4, "media": {"video": 2},
                                "ignored_members": {}}},
    "encoder": ENCODER, "layer": -2, "mode": "valley_pooled", "sampling": SAMPLING, "preprocess": PREPROCESS,
    "totals": {"samples_ok": 3, "samples_failed": 0},
    "config": {"run_name": None, "data": {"shards": ["/tmp/oldrun/shards"]}, "output": {"uri": "/tmp/oldrun/feats"}},
}
OLD_EXPORT_INFO = {
    "model": {"vision_hidden_size": 64, "pooler": {"type": "valley"},
              "connector": {"type": "linear", "trainable": True,
                            "init_from": "/tmp/oldrun/export/connector.safetensors"},
              "llm": {"path": "/tmp/oldrun/export/llm", "tokenizer": "/tmp/oldrun/export/tokenizer", "trainable": False,
                      "gradient_checkpointing": False, "dtype": "float32"}},
    "template": "vicuna_v1", "feature_mode": "valley_pooled", "encoder": ENCODER, "sampling": SAMPLING,
    "preprocess": PREPROCESS, "run": "stage2"}


@pytest.mark.parametrize("record, data", [(Fingerprint, OLD_FINGERPRINT), (ShardCommit, OLD_COMMITS[0]),
                                          (Manifest, OLD_MANIFEST), (ExportInfo, OLD_EXPORT_INFO)])
def test_records_read_and_write_todays_json_key_for_key(record, data):
    rec = record.from_json(copy.deepcopy(data), "old.json")
    assert rec.to_json() == data and list(rec.to_json()) == list(data)  # same keys, same order, same values
    assert json.loads(rec.to_bytes()) == data
    again = {**data, "added_by_a_later_minor_version": {"x": 1}}  # unknown keys are kept, not dropped
    assert record.from_json(again, "new.json").to_json() == again


def test_records_give_typed_access_and_refuse_what_they_cannot_read():
    fp = Fingerprint.from_json(OLD_FINGERPRINT, "fp")
    assert fp.encoder.hidden_size == 64 and fp.preprocess.mean == PREPROCESS["mean"] and fp.mode == "valley_pooled"
    man = Manifest.from_json(OLD_MANIFEST, "m")
    assert man.totals.samples_ok == 3 and man.shards["webvid-00000"].frames == 4 and man.format == "vlp-features/1"
    assert ShardCommit.from_json(OLD_COMMITS[1], "c").counts().to_json() == OLD_MANIFEST["shards"]["webvid-00000"]
    other = Fingerprint.from_json({**OLD_FINGERPRINT, "mode": "frames"}, "fp2")
    assert fp.differences(other) == ["mode"] and fp.differences(fp) == []
    with pytest.raises(RecordError, match="manifest.json is not a valid Manifest record .*totals"):
        Manifest.from_json({"format": FEATURES_FORMAT}, "x/manifest.json")
    with pytest.raises(RecordError, match="not valid JSON"):
        Fingerprint.from_bytes(b'{"encoder": ', "x/fingerprint.json")
    assert issubclass(RecordError, UserError)


def _old_feature_set(root, manifest=OLD_MANIFEST):
    """A feature set on disk as the code before the records wrote it (one real Parquet part per shard)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "shards").mkdir(parents=True)
    (root / "fingerprint.json").write_text(json.dumps(OLD_FINGERPRINT, indent=2))
    for c in OLD_COMMITS:
        (root / "shards" / f"{c['shard']}.json").write_text(json.dumps(c, indent=2))
        n = c["n_ok"]  # the vlp-features/1 columns: one media item per row
        table = pa.table({
            "uid": [f"{c['shard']}/k{i}" for i in range(n)], "key": [f"k{i}" for i in range(n)],
            "shard": [c["shard"]] * n, "media_type": ["video"] * n, "caption": ["c"] * n, "conversations": [""] * n,
            "meta": [""] * n, "timestamps": pa.array([[0.0, 0.5]] * n, pa.list_(pa.float32())),
            "num_frames": pa.array([2] * n, pa.int32()), "n_source_frames": pa.array([0] * n, pa.int32()),
            "features": pa.array([np.full((258, 64), i, np.float16).tobytes() for i in range(n)], pa.binary()),
            "shape": pa.array([[258, 64]] * n, pa.list_(pa.int32())), "mode": ["valley_pooled"] * n})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        (root / c["parts"][0]).parent.mkdir(parents=True)
        (root / c["parts"][0]).write_bytes(buf.getvalue())
    if manifest is not None:
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def test_a_feature_set_written_before_the_records_loads_through_every_reader(tmp_path):
    from vlp.inspect_ import inspect_features, is_feature_set

    root = str(_old_feature_set(tmp_path / "fs"))
    info = read_feature_set(root)
    assert (info.hidden_size, info.mode, info.samples) == (64, "valley_pooled", 3)
    assert info.fingerprint.to_json() == OLD_FINGERPRINT
    assert {n: c.to_json() for n, c in committed_shards(root).items()} == {c["shard"]: c for c in OLD_COMMITS}
    rows = list(iter_feature_rows(root))
    assert len(rows) == 3 and [f.shape for f in rows[0]["features"]] == [(258, 64)]  # lifted to /2
    rep = inspect_features(root)
    assert rep["complete"] and rep["samples"] == 3 and rep["frames"] == 5 and rep["encoder"] == ENCODER
    assert is_feature_set(root) and not is_feature_set(str(tmp_path))

    no_format = {k: v for k, v in OLD_MANIFEST.items() if k != "format"}  # read as the first version, as today
    (tmp_path / "fs" / "manifest.json").write_text(json.dumps(no_format))
    assert read_feature_set(root).samples == 3 and len(list(iter_feature_rows(root))) == 3


@pytest.mark.parametrize("fmt, why", [("vlp-features/5", "newer than this vlp reads"),
                                      ("parquet-dump/7", "unknown to this vlp")])
def test_a_feature_set_in_a_newer_or_unknown_format_is_refused_with_how_to_rebuild_it(tmp_path, fmt, why):
    root = str(_old_feature_set(tmp_path / "fs", {**OLD_MANIFEST, "format": fmt, "totals": "moved elsewhere"}))
    for read in (read_feature_set, lambda u: list(iter_feature_rows(u))):
        with pytest.raises(FeatureSetFormatError) as e:
            read(root)
        msg = str(e.value)
        assert why in msg and fmt in msg and "vlp precompute" in msg and "output.overwrite=true" in msg
        assert isinstance(e.value, UserError)


def test_training_lists_a_feature_set_it_cannot_read_among_its_setup_problems(tmp_path):
    from vlp.train import TrainConfig, TrainSetupError, check_setup

    root = str(_old_feature_set(tmp_path / "fs", {**OLD_MANIFEST, "format": "vlp-features/9"}))
    cfg = validate(TrainConfig, dotted({"run_name": "x", "output_dir": str(tmp_path / "out")},
                                       **{"data.sets": [{"uri": root}], "data.template": "plain"}))
    with pytest.raises(TrainSetupError, match=r"data.sets\[0\].uri: feature set .* newer than this vlp reads"):
        check_setup(cfg, log=lambda m: None)


def test_precompute_refuses_to_resume_into_a_newer_format_and_overwrite_replaces_it(tmp_path):
    from vlp.data.tario import write_tar
    from vlp.precompute import FeatureSetMismatch, PrecomputeConfig, PrecomputeRun

    with open(tmp_path / "a-00000.tar", "wb") as f:
        write_tar(f, [("k", {"txt": b"x"})])
    out = _old_feature_set(tmp_path / "fs", {**OLD_MANIFEST, "format": "vlp-features/5"})
    d = {"data": {"shards": [str(tmp_path / "a-00000.tar")]}, "output": {"uri": str(out)}}
    run = PrecomputeRun(validate(PrecomputeConfig, d), log=lambda m: None)
    run.plan()
    with pytest.raises(FeatureSetMismatch, match="cannot resume .*newer than this vlp reads.*output.overwrite=true"):
        run.check_existing()
    assert json.loads((out / "manifest.json").read_text())["format"] == "vlp-features/5"  # nothing touched

    run = PrecomputeRun(validate(PrecomputeConfig, dotted(d, **{"output.overwrite": True})), log=lambda m: None)
    run.plan()
    run.check_existing()  # the old set is deleted, this run's fingerprint and config recorded
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "fingerprint.json"]
    assert Fingerprint.read(FeatureSetLayout(str(out))).to_json() == run.fp.to_json()


def test_precompute_refuses_to_add_to_a_first_format_set_and_a_changed_sample_config(tmp_path):
    """A complete /1 set is readable, but its rows have another shape: precompute (writing /2) must not add /2 parts
    to it; and the sample config decides which samples are kept, so a resume with another one is refused."""
    from vlp.data.tario import write_tar
    from vlp.precompute import FeatureSetMismatch, PrecomputeConfig, PrecomputeRun

    with open(tmp_path / "a-00000.tar", "wb") as f:
        write_tar(f, [("k", {"txt": b"x"})])
    out = _old_feature_set(tmp_path / "fs")
    assert read_feature_set(str(out)).manifest.format == "vlp-features/1"  # read, as /1 and /2 both are
    d = {"data": {"shards": [str(tmp_path / "a-00000.tar")]}, "output": {"uri": str(out)}}
    run = PrecomputeRun(validate(PrecomputeConfig, d), log=lambda m: None)
    run.plan()
    with pytest.raises(FeatureSetMismatch, match="format vlp-features/1; this vlp writes vlp-features/2"):
        run.check_existing()

    fresh = {**d, "output": {"uri": str(tmp_path / "new")}}
    run = PrecomputeRun(validate(PrecomputeConfig, fresh), log=lambda m: None)
    run.plan()
    run.check_existing()
    assert Fingerprint.read(FeatureSetLayout(str(tmp_path / "new"))).sample == {"max_items": 64,
                                                                                "max_json_bytes": 16 << 20,
                                                                                "max_sample_bytes": 1 << 30,
                                                                                "text_only": True}
    run = PrecomputeRun(validate(PrecomputeConfig, dotted(fresh, **{"data.sample.text_only": False})),
                        log=lambda m: None)
    run.plan()
    with pytest.raises(FeatureSetMismatch, match="different sample"):
        run.check_existing()


def test_the_layout_names_what_precompute_writes_and_writes_are_atomic(tmp_path):
    """WriteParts puts parts and error parts at the layout's names through storage.write_atomic: no temp files."""
    import numpy as np

    from vlp.precompute.stages import WriteParts, rows_batch, make_row

    layout = FeatureSetLayout(str(tmp_path / "fs"))
    rows = [make_row(shard="s", key="a", kind="sample", media_type="image", modalities=["image"], item_names=["jpg"],
                     frames_shape=["1,3,8,8"], timestamps=["0.0"], features_shape=["2,4"],
                     features=[np.ones((2, 4), np.float16).tobytes()]),
            make_row(shard="s", key="b", kind="error", stage="decode", error="bad")]
    meta = WriteParts(layout.uri, None, "valley_pooled")(rows_batch(rows))
    part, errors = meta["part"][0], meta["errors"][0]
    assert part.startswith("parts/s/") and part.endswith(".parquet") and errors.startswith("errors/s/")
    assert layout.shard_folders("s") == ["parts/s", "errors/s"] and layout.shard_marker("s") == "shards/s.json"
    files = sorted(str(p.relative_to(tmp_path / "fs")) for p in (tmp_path / "fs").rglob("*") if p.is_file())
    assert files == sorted([part, errors])  # nothing else: no .tmp left behind
    assert json.loads(layout.read(errors)) == {"shard": "s", "key": "b", "stage": "decode", "reason": "bad"}


# ------------------------------------------------------------------------------------------------ exports

def test_export_info_of_an_export_written_before_versions(tmp_path):
    info = ExportInfo.from_json(OLD_EXPORT_INFO, "old/vlp_model.json")
    assert info.format is None and info.prompt_template() == "vicuna_v1"
    enc, sampling = info.media()
    assert enc.layer == -2 and sampling.num_frames == 2 and info.geometry(336, (0, 0, 0), (1, 1, 1)).size == 224
    info.write(tmp_path)  # written again: stamped with the current format, every other key as it was
    assert json.loads((tmp_path / MODEL_CONFIG).read_text()) == {"format": EXPORT_FORMAT, **OLD_EXPORT_INFO}

    bare = ExportInfo.from_json({"model": OLD_EXPORT_INFO["model"]}, "bare")  # e.g. a benchmark's export
    with pytest.raises(ExportFormatError, match="records no encoder/sampling"):
        bare.media()
    with pytest.raises(ExportFormatError, match="records no conversation template"):
        bare.prompt_template()


def test_an_export_without_a_format_loads_and_a_newer_one_is_refused(export, tmp_path):
    import shutil

    exp = tmp_path / "export"
    shutil.copytree(export, exp)
    written = json.loads((exp / MODEL_CONFIG).read_text())
    assert written["format"] == EXPORT_FORMAT and written["template"] == "vicuna_v1"
    (exp / MODEL_CONFIG).write_text(json.dumps({k: v for k, v in written.items() if k != "format"}))
    _, _, info = load_model(exp)  # an export from before versions: the same layout
    assert info.format is None and info.template == "vicuna_v1" and info.encoder.path == "preset:tiny-clip"

    for fmt, why in (("vlp-export/2", "newer than this vlp reads"), ("onnx/1", "unknown to this vlp")):
        (exp / MODEL_CONFIG).write_text(json.dumps({**written, "format": fmt, "model": "moved"}))
        with pytest.raises(ExportFormatError, match=why) as e:
            load_model(exp)
        assert isinstance(e.value, UserError) and fmt in str(e.value)


def test_a_missing_folder_or_one_that_is_no_export_is_a_user_error(tmp_path):
    with pytest.raises(NotAnExport, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(NotAnExport, match="is not a model export"):
        ExportInfo.read(tmp_path / "run")
    assert issubclass(NotAnExport, UserError)


# ------------------------------------------------------------------ /1 rows lifted to /2 (vlp-features/2 readers)

def _v1_table():
    """Three rows in the vlp-features/1 columns (one media item per row), as the /1 writer made them."""
    import numpy as np
    import pyarrow as pa

    no_placeholder = json.dumps([{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Red."}])
    placed = json.dumps([{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A disc."}])
    two = json.dumps([{"from": "human", "value": "<video><video> Same?"}, {"from": "gpt", "value": "Yes."}])
    feats = [np.arange(12, dtype=np.float16).tobytes(), np.ones(8, np.float16).tobytes(), np.zeros(8, np.float16).tobytes()]
    return pa.table({
        "uid": ["s/v", "s/i", "s/bad"], "key": ["v", "i", "bad"], "shard": ["s"] * 3,
        "media_type": ["video", "image", "video"], "caption": ["c"] * 3, "conversations": [no_placeholder, placed, two],
        "meta": [""] * 3, "timestamps": pa.array([[0.0, 0.5], [0.0], [0.0, 0.5]], pa.list_(pa.float32())),
        "num_frames": pa.array([2, 1, 2], pa.int32()), "n_source_frames": pa.array([12, 1, 2], pa.int32()),
        "features": pa.array(feats, pa.binary()), "shape": pa.array([[3, 4], [2, 4], [2, 4]], pa.list_(pa.int32())),
        "mode": ["valley_pooled"] * 3})


def test_a_v1_batch_is_lifted_to_per_item_lists_and_an_old_conversation_gets_its_placeholder():
    import numpy as np

    from vlp.formats.featureset import decode_item_features, lift_v1_batch, lift_v1_row

    table = _v1_table()
    lifted = lift_v1_batch(table).to_pylist()
    assert [r["modalities"] for r in lifted] == [["video"], ["image"], ["video"]]
    assert [r["items"] for r in lifted] == [[""]] * 3
    v, i, bad = lifted
    assert v["shape"] == [[3, 4]] and v["num_frames"] == [2] and v["n_source_frames"] == [12]
    assert v["timestamps"] == [[0.0, 0.5]] and len(v["features"]) == 1 and isinstance(v["features"][0], bytes)
    np.testing.assert_array_equal(decode_item_features(v["features"], v["shape"])[0],
                                  np.arange(12, dtype=np.float16).reshape(3, 4))
    assert json.loads(v["conversations"])[0]["value"] == "<video>\nWhat colour?"  # the old row's features are used
    assert i["conversations"] == table.column("conversations")[1].as_py()  # already placed: kept byte for byte
    assert bad["conversations"] == table.column("conversations")[2].as_py()  # 2 placeholders, 1 item: kept (skipped later)
    assert (v["uid"], v["caption"], v["media_type"], v["mode"]) == ("s/v", "c", "video", "valley_pooled")
    assert [lift_v1_row(r) for r in table.to_pylist()] == lifted  # the row version agrees


def test_a_v2_feature_set_is_read_as_it_is(tmp_path):
    import io

    import numpy as np
    import pyarrow.parquet as pq

    from vlp.formats.featureset import lift_v1_batch

    root = _old_feature_set(tmp_path / "fs", {**OLD_MANIFEST, "format": "vlp-features/2"})
    for c in OLD_COMMITS:  # rewrite every part as /2 rows (what the /2 writer makes)
        buf = io.BytesIO()
        pq.write_table(lift_v1_batch(pq.read_table(str(root / c["parts"][0]))), buf)
        (root / c["parts"][0]).write_bytes(buf.getvalue())
    rows = list(iter_feature_rows(str(root)))
    assert len(rows) == 3 and all(r["modalities"] == ["video"] and r["shape"] == [[258, 64]] for r in rows)
    assert all(len(r["features"]) == 1 and r["features"][0].dtype == np.float16 for r in rows)  # not lifted twice


def test_an_export_loads_from_its_own_folder_wherever_it_was_written(export, tmp_path):
    """vlp_model.json records where the parts were written (a temporary folder when a run uploaded its export to
    S3); loading reads the parts of the folder being loaded."""
    import shutil

    from vlp.formats.export import MODEL_CONFIG, load_model

    moved = tmp_path / "moved"
    shutil.copytree(export, moved)
    info = json.loads((moved / MODEL_CONFIG).read_text())
    info["model"]["llm"].update(path="/gone/llm", tokenizer="/gone/tokenizer")
    info["model"]["connector"]["init_from"] = "/gone/connector.safetensors"
    (moved / MODEL_CONFIG).write_text(json.dumps(info))
    model, tok, _ = load_model(moved)
    assert model.cfg.llm.path == str(moved / "llm") and len(tok) > 0
