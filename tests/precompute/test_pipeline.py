"""The Ray Data precompute pipeline on a local Ray: outputs, feature values, manifest, resume, kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from conftest import dotted
import torch
import yaml

from vlp.config import validate
from featrows import feature_rows
from vlp.precompute import FeatureSetMismatch, PrecomputeConfig, committed_shards, open_feature_dataset, run_precompute
from vlp.storage import StorageError

pytestmark = pytest.mark.ray


def _cfg(shards, out, **kw) -> PrecomputeConfig:
    d = {"data": {"shards": [str(s) for s in shards]}, "output": {"uri": str(out)}, "ray": {"progress_bars": False}}
    dotted(d, **kw)
    return validate(PrecomputeConfig, d)


def _keys(out) -> Counter:
    return Counter(r["uid"] for r in feature_rows(str(out)))


def test_features_pooled_shapes_values_and_manifest(ray_local, synth_shards, tmp_path, tiny_clip_path):
    out = tmp_path / "feat"
    cfg = _cfg([synth_shards / "webvid-00000.tar", synth_shards / "cc3m-00000.tar"], out)
    summary = run_precompute(cfg, log=lambda *_: None)
    assert summary["samples_ok"] == 12 and summary["samples_failed"] == 0
    rows = {r["uid"]: r for r in feature_rows(str(out))}
    assert len(rows) == 12
    vids = [r for r in rows.values() if r["media_type"] == "video"]
    imgs = [r for r in rows.values() if r["media_type"] == "image"]
    assert len(vids) == 6 and len(imgs) == 6
    assert all(r["modalities"] == ["video"] and r["items"] == ["mp4"] and r["num_frames"] == [8] for r in vids)
    assert all(r["modalities"] == ["image"] and r["items"] == ["jpg"] and r["num_frames"] == [1] for r in imgs)
    assert all(r["shape"] == [[256 + 8, 64]] and r["blocks"][0].dtype == np.float16 for r in vids)
    assert all(r["shape"] == [[256 + 1, 64]] and r["timestamps"] == [[0.0]] for r in imgs)
    assert all(len(r["timestamps"][0]) == 8 and r["timestamps"][0] == sorted(r["timestamps"][0]) for r in vids)
    assert all(r["caption"] and json.loads(r["meta"])["key"] == r["key"] for r in rows.values())

    # recompute one clip by hand: decode -> preprocess -> CLIP penultimate layer -> Valley pooling
    from transformers import CLIPVisionModel

    from vlp.data.media import DecodeConfig, SamplingConfig, decode_media
    from vlp.data.preprocess import clip_preprocess
    from vlp.data.tario import iter_tar_samples

    raw = next(iter_tar_samples(open(synth_shards / "webvid-00000.tar", "rb")))
    _, dec = decode_media(raw.members["mp4"], "mp4", SamplingConfig(), DecodeConfig())
    model = CLIPVisionModel.from_pretrained(tiny_clip_path).eval()
    with torch.no_grad():
        h = model(pixel_values=clip_preprocess(dec.frames), output_hidden_states=True).hidden_states[-2]
    expect = torch.cat([h[:, 1:].mean(0), h[:, 0]])  # (T, 257, D) -> (256 + T, D)
    got = torch.from_numpy(rows["webvid-00000/" + raw.key]["blocks"][0].astype(np.float32))
    assert torch.allclose(got, expect, atol=2e-2, rtol=1e-2), (got - expect).abs().max()

    man = json.loads((out / "manifest.json").read_text())
    assert man["mode"] == "valley_pooled" and man["layer"] == -2 and man["format"] == "vlp-features/2"
    assert man["totals"]["samples_text"] == 0 and man["totals"]["items_by_modality"] == {"video": 6, "image": 6}
    assert man["shards"]["cc3m-00000"]["items"] == {"image": 6} and man["shards"]["cc3m-00000"]["media"] == {"image": 6}
    assert man["encoder"]["path"] == "preset:tiny-clip" and len(man["encoder"]["weights_sha256"]) == 64
    assert man["vlp_version"] and man["config"]["data"]["shards"] == cfg.data.shards
    assert set(man["shards"]) == {"webvid-00000", "cc3m-00000"}
    assert man["shards"]["webvid-00000"]["n_ok"] == 6 and len(man["inputs"]) == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["output"]["uri"] == str(out)
    s = json.loads((out / "summary.json").read_text())
    assert s["this_run"]["frames"] == 6 * 8 + 6 and s["this_run"]["bytes_in"] > 0 and s["this_run"]["bytes_out"] > 0

    ds = open_feature_dataset(str(out), decode=False)  # per-item decoding is the readers' (lift) side
    assert ds.count() == 12
    row = ds.take(1)[0]
    assert [list(s) for s in row["shape"]] in ([[264, 64]], [[257, 64]])


def test_frames_mode_and_fps_sampling(ray_local, synth_shards, tmp_path):
    out = tmp_path / "frames"
    cfg = _cfg([synth_shards / "webvid-00001.tar"], out, **{"output.mode": "frames", "data.sampling.mode": "fps",
                                                            "data.sampling.fps": 2.0, "data.sampling.max_frames": 3})
    run_precompute(cfg, log=lambda *_: None)
    rows = feature_rows(str(out))
    assert len(rows) == 6
    # 12 frames at 8 fps = 1.5 s -> targets 0, 0.5, 1.0, 1.5 s, thinned to max_frames=3
    assert all(len(r["blocks"]) == 1 and r["blocks"][0].shape == (3, 257, 64) for r in rows)


def test_resume_skips_complete_shards_and_mismatch_is_refused(ray_local, synth_shards, tmp_path):
    out = tmp_path / "feat"
    first = _cfg([synth_shards / "webvid-00000.tar"], out)
    assert run_precompute(first, log=lambda *_: None)["shards_run"] == 1
    both = _cfg([synth_shards / "webvid-0000*.tar"], out)
    s = run_precompute(both, log=lambda *_: None)
    assert s["shards_skipped_complete"] == 1 and s["shards_run"] == 1 and s["samples_ok"] == 12
    assert set(_keys(out).values()) == {1} and len(_keys(out)) == 12
    # same folder, different layer: refused, nothing deleted
    other = _cfg([synth_shards / "webvid-00000.tar"], out, **{"encoder.tower.layer": -1})
    with pytest.raises(FeatureSetMismatch, match="different encoder"):
        run_precompute(other, log=lambda *_: None)
    assert len(_keys(out)) == 12
    over = _cfg([synth_shards / "webvid-00000.tar"], out, **{"encoder.tower.layer": -1, "output.overwrite": True})
    run_precompute(over, log=lambda *_: None)
    assert len(_keys(out)) == 6


def test_missing_shards_fail_before_any_work(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        run_precompute(_cfg([tmp_path / "webvid-{00000..00001}.tar"], tmp_path / "o"), log=lambda *_: None)
    with pytest.raises(StorageError, match="glob matched nothing"):
        run_precompute(_cfg([tmp_path / "*.tar"], tmp_path / "o"), log=lambda *_: None)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_killed_run_leaves_nothing_complete_and_resume_is_exactly_once(ray_local, tmp_path):
    """SIGKILL a precompute run mid-way; readers see only committed shards; the rerun ends exactly once."""
    from vlp.synth.shards import MakeShardsConfig, make_shards

    shards = tmp_path / "shards"
    make_shards(MakeShardsConfig(out=str(shards), videos=40, images=0, instructions=0, heldout=0,
                                 samples_per_shard=4, num_frames=12, seed=3))
    out = tmp_path / "feat"
    cfg_path = tmp_path / "p.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data": {"shards": [str(shards / "webvid-*.tar")]}, "output": {"uri": str(out)},
        "encoder": {"batch_size": 2}, "ray": {"address": ray_local.get_runtime_context().gcs_address,
                                             "progress_bars": False}}))
    cmd = [sys.executable, "-m", "vlp.cli", "precompute", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            done = list((out / "shards").glob("*.json")) if (out / "shards").exists() else []
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    committed = committed_shards(str(out))
    assert 2 <= len(committed) < 10
    assert not (out / "manifest.json").exists()
    # readers see exactly the committed shards' rows, each once
    keys = _keys(out)
    assert set(keys.values()) == {1} and len(keys) == sum(r.n_ok for r in committed.values())

    s = run_precompute(_cfg([shards / "webvid-*.tar"], out, **{"encoder.batch_size": 2}), log=lambda *_: None)
    assert s["shards_skipped_complete"] == len(committed)
    keys = _keys(out)
    assert len(keys) == 40 and set(keys.values()) == {1}
    assert s["samples_ok"] == 40 and s["samples_failed"] == 0


# ------------------------------------------------------------------------------------ normalisation (no Ray)

def _encoded(cfg, media: bytes, ext: str):
    """Run the stages the driver plans for ``cfg`` on one sample, as the Ray graph would, without Ray:
    (fingerprint, decoded uint8 frames (T, 3, S, S), features (T, 1 + P, D) float32)."""
    from vlp.precompute.pipeline import plan_stages
    from vlp.precompute.stages import EncodeFeatures, rows_batch, batch_rows, make_row, shape_of

    fp, decode, encode = plan_stages(cfg)
    dec = decode(rows_batch([make_row(shard="s", key="k", kind="sample", media=[media], media_ext=[ext],
                                  item_names=[ext], modalities=["image"], item_refs=[""])]))
    d = batch_rows(dec)[0]
    assert d["kind"] == "sample", d["error"]
    frames = np.frombuffer(d["frames"][0], np.uint8).reshape(shape_of(d["frames_shape"][0]))
    e = batch_rows(EncodeFeatures(**encode)(dec))[0]
    feats = np.frombuffer(e["features"][0], np.float16).reshape(shape_of(e["features_shape"][0]))
    return fp, torch.from_numpy(frames.copy()), torch.from_numpy(feats.astype(np.float32))


def _by_hand(tower_path: str, frames: torch.Tensor, mean, std) -> torch.Tensor:
    """(T, 3, S, S) uint8 -> (T, 1 + P, D): the tower's penultimate layer on frames normalised with mean/std."""
    from transformers import CLIPVisionModel

    from vlp.data.preprocess import normalize

    model = CLIPVisionModel.from_pretrained(tower_path).eval()
    with torch.no_grad():
        return model(pixel_values=normalize(frames, mean, std), output_hidden_states=True).hidden_states[-2]


@pytest.fixture(scope="module")
def wide_photo() -> bytes:
    """A 64x96 (non-square) JPEG, so that pad_to_square shows its colour."""
    from vlp.synth.shards import Attributes, encode_jpeg, render_clip

    return encode_jpeg(render_clip(Attributes("red", "square", "left"), np.random.default_rng(0), 64, 96, 1)[0])


def test_preprocess_std_and_mean_reach_the_encoder_and_the_fingerprint(tmp_path, tiny_clip_path, wide_photo,
                                                                        synth_shards):
    """data.preprocess.std changes what the encoder sees (its features), mean also the padding colour; both are
    recorded in the fingerprint, so a resume with other values is refused before any work."""
    from vlp.data.preprocess import CLIP_MEAN, CLIP_STD

    kw = {"output.mode": "frames", "data.preprocess.pad_to_square": True}
    fp0, frames0, f0 = _encoded(_cfg(["x.tar"], tmp_path / "a", **kw), wide_photo, "jpg")
    assert fp0.preprocess.mean == list(CLIP_MEAN) and fp0.preprocess.std == list(CLIP_STD)

    std = (0.1, 0.2, 0.3)
    fp1, frames1, f1 = _encoded(_cfg(["x.tar"], tmp_path / "a", **kw, **{"data.preprocess.std": list(std)}),
                                wide_photo, "jpg")
    assert fp1.preprocess.std == list(std) and fp1.preprocess.mean == list(CLIP_MEAN)
    assert torch.equal(frames1, frames0)  # std is not a geometry setting
    assert torch.allclose(f1, _by_hand(tiny_clip_path, frames1, CLIP_MEAN, std), atol=2e-2, rtol=1e-2)
    assert (f1 - f0).abs().max() > 0.5  # the std shows in the features: the check above could fail

    mean = (0.9, 0.1, 0.6)
    fp2, frames2, f2 = _encoded(_cfg(["x.tar"], tmp_path / "a", **kw, **{"data.preprocess.std": list(std),
                                                                         "data.preprocess.mean": list(mean)}),
                                wide_photo, "jpg")
    assert fp2.preprocess.mean == list(mean) and fp2.preprocess.std == list(std)
    assert frames2[0, :, 0, 0].tolist() == [int(m * 255) for m in mean]  # padded rows: the configured mean
    assert torch.allclose(f2, _by_hand(tiny_clip_path, frames2, mean, std), atol=2e-2, rtol=1e-2)

    # a folder of default-normalised features refuses features made with another std
    out = tmp_path / "feat"
    out.mkdir()
    (out / "fingerprint.json").write_text(json.dumps(fp0.to_json()))
    with pytest.raises(FeatureSetMismatch, match="different preprocess"):
        run_precompute(_cfg([synth_shards / "cc3m-00000.tar"], out, **kw, **{"data.preprocess.std": list(std)}),
                       log=lambda *_: None)
    assert json.loads((out / "fingerprint.json").read_text()) == fp0.to_json() and os.listdir(out) == ["fingerprint.json"]


def test_default_normalisation_is_the_towers_own(tmp_path, wide_photo):
    """mean/std None = the tower's preprocessor_config.json values (here not CLIP's): used for padding and
    normalisation and recorded in the fingerprint."""
    from vlp.data.preprocess import CLIP_MEAN, CLIP_STD
    from vlp.models.presets import build_tiny_clip

    tower = tmp_path / "tower"
    build_tiny_clip(tower, image_size=56)
    pp = json.loads((tower / "preprocessor_config.json").read_text())
    mean, std = (0.5, 0.25, 0.75), (0.2, 0.4, 0.6)
    (tower / "preprocessor_config.json").write_text(json.dumps({**pp, "image_mean": mean, "image_std": std}))

    fp, frames, feats = _encoded(_cfg(["x.tar"], tmp_path / "o", **{
        "output.mode": "frames", "data.preprocess.pad_to_square": True, "encoder.tower.path": str(tower)}),
        wide_photo, "jpg")
    assert fp.preprocess.mean == list(mean) and fp.preprocess.std == list(std)
    assert fp.preprocess.size == 56 and frames.shape == (1, 3, 56, 56)
    assert frames[0, :, 0, 0].tolist() == [int(m * 255) for m in mean]
    assert torch.allclose(feats, _by_hand(str(tower), frames, mean, std), atol=2e-2, rtol=1e-2)
    assert not torch.allclose(feats, _by_hand(str(tower), frames, CLIP_MEAN, CLIP_STD), atol=0.1)


def test_old_fingerprints_still_match_and_bad_values_are_refused(tmp_path, tiny_clip_path):
    """A feature set fingerprinted before mean/std were resolved recorded the config's defaults (CLIP's); with a
    tower whose preprocessor_config holds CLIP's values (tiny-clip, openai/clip-*) the resolved fingerprint is
    the same, so such sets resume. Bad values, in the config or the tower's file, are clear errors."""
    from vlp.config import ConfigError
    from vlp.data.preprocess import CLIP_MEAN, CLIP_STD, RESAMPLER
    from vlp.models.towers import tower_mean_std
    from vlp.precompute.pipeline import plan_stages

    fp, _, _ = plan_stages(_cfg(["x.tar"], tmp_path / "o"))
    old = {"size": 224, "pad_to_square": False, "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resampler": RESAMPLER}
    assert json.loads(json.dumps(fp.to_json()))["preprocess"] == old == fp.preprocess.to_json()

    with pytest.raises(ConfigError) as ei:
        _cfg(["x.tar"], tmp_path / "o", **{"data.preprocess.std": [0.2, 0, 0.2], "data.preprocess.mean": [1.5, 0, 0]})
    assert "data.preprocess.std" in str(ei.value) and "data.preprocess.mean" in str(ei.value)

    bad = tmp_path / "bad"
    bad.mkdir()
    for body, msg in (({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
                      ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be positive")):
        (bad / "preprocessor_config.json").write_text(json.dumps(body))
        with pytest.raises(ValueError, match=msg):
            tower_mean_std(str(bad))
    (bad / "preprocessor_config.json").unlink()
    assert tower_mean_std(str(bad)) == (CLIP_MEAN, CLIP_STD)  # no file: CLIP's
    (bad / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": 0.5}))
    assert tower_mean_std(str(bad)) == ((0.5,) * 3, (0.5,) * 3)  # one number: every channel


def test_a_set_fingerprinted_before_a_sample_key_existed_resumes(tmp_path, synth_shards):
    """``data.sample.max_sample_bytes`` came later: a fingerprint without it had the default, so the set resumes
    with the default and is refused with another value."""
    from vlp.precompute.pipeline import PrecomputeRun

    cfg = _cfg([synth_shards / "cc3m-00000.tar"], tmp_path / "out")
    run = PrecomputeRun(cfg, log=lambda *_: None)
    run.plan()
    old = run.fp.to_json()
    del old["sample"]["max_sample_bytes"]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fingerprint.json").write_text(json.dumps(old))
    run.check_existing()  # no FeatureSetMismatch
    (tmp_path / "out" / "fingerprint.json").write_text(json.dumps(old))
    other = PrecomputeRun(_cfg([synth_shards / "cc3m-00000.tar"], tmp_path / "out",
                               **{"data.sample.max_sample_bytes": 1 << 20}), log=lambda *_: None)
    other.plan()
    with pytest.raises(FeatureSetMismatch, match="different sample"):
        other.check_existing()
