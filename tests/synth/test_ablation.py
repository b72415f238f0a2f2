"""The premise of the Valley pooling ablation, checked without training (fast, no Ray).

A synthetic clip of a shape moving left is the same clip moving right played backwards (same texture, same
path), so features averaged over time (pooler ``patch_mean``) cannot tell the two apart, while Valley's
per-frame CLS tokens keep the order. If synth leaked the direction through a start position or the texture,
or if ``valley`` lost its CLS tokens, these tests fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlp.data.preprocess import clip_preprocess
from vlp.synth.shards import Attributes, render_clip
from vlp.models.poolers import POOLERS

OPPOSITE = [("left", "right"), ("up", "down")]


def _clip(direction: str, seed: int) -> np.ndarray:
    return render_clip(Attributes("blue", "triangle", direction), np.random.default_rng(seed), 64, 96, 8)


@pytest.mark.parametrize("a,b", OPPOSITE)
def test_opposite_directions_are_the_same_frames_reversed(a, b):
    for seed in range(3):
        fa, fb = _clip(a, seed), _clip(b, seed)
        assert np.array_equal(fa, fb[::-1])
        assert not np.array_equal(fa, fb)


@pytest.fixture(scope="module")
def tower():
    from vlp.models.towers import TOWERS, build_vision_tower

    return build_vision_tower(TOWERS.config(path="preset:tiny-clip", device="cpu", dtype="float32"))


@pytest.mark.parametrize("a,b", OPPOSITE)
def test_patch_mean_is_blind_to_order_and_valley_is_not(tower, a, b):
    fa = tower.features(clip_preprocess(_clip(a, 0)))  # (T, 1 + P, D)
    fb = tower.features(clip_preprocess(_clip(b, 0)))
    t = fa.shape[0]
    pm_a, pm_b = POOLERS.part("patch_mean")(fa, "frames", t), POOLERS.part("patch_mean")(fb, "frames", t)
    assert pm_a.shape == (256, 64)
    torch.testing.assert_close(pm_a, pm_b, rtol=0, atol=1e-5)  # (P, D): only float summation order differs
    va, vb = POOLERS.part("valley")(fa, "frames", t), POOLERS.part("valley")(fb, "frames", t)  # (P + T, D)
    torch.testing.assert_close(va[:256], vb[:256], rtol=0, atol=1e-5)
    torch.testing.assert_close(va[256:], vb[256:].flip(0))  # the CLS tokens: same frames, reverse order
    assert (va[256:] - vb[256:]).abs().max() > 1e-3  # ... which valley's token sequence keeps apart


def test_unknown_ablation_pooler_fails_at_config_load():
    from vlp.config import ConfigError, validate
    from vlp.synth.demo import DemoConfig

    with pytest.raises(ConfigError, match="ablation_pooler"):
        validate(DemoConfig, {"ablation_pooler": "mean_of_everything"})
    assert validate(DemoConfig, {"ablation_pooler": None}).ablation_pooler is None


def test_demo_refuses_to_reuse_shards_made_with_other_settings(tmp_path):
    import json

    """A re-run with changed shard settings must not silently train on the old shards."""
    from vlp.config import ConfigError, validate
    from vlp.synth.demo import DemoConfig, run_demo

    base = {"root": str(tmp_path / "demo"), "train": False,
            "shards": {"videos": 2, "images": 0, "instructions": 0, "heldout": 0, "samples_per_shard": 2}}
    shards = tmp_path / "demo" / "shards"
    shards.mkdir(parents=True)
    made = validate(DemoConfig, base).shards.model_copy(update={"out": str(shards)}).model_dump(mode="json")
    from vlp.synth.shards import SYNTH_VERSION

    (shards / "_SUCCESS").write_text(json.dumps(made | {"videos": 5, "synth_version": SYNTH_VERSION}))
    with pytest.raises(ConfigError) as e:
        run_demo(validate(DemoConfig, base), log=lambda m: None)
    assert "shards.videos" in str(e.value) and "made with 5" in str(e.value) and "says 2" in str(e.value)
    older = {k: v for k, v in made.items() if k != "audio"}  # made before shards.audio existed: it was off
    (shards / "_SUCCESS").write_text(json.dumps(older | {"synth_version": SYNTH_VERSION}))
    from vlp.storage import StorageError

    with pytest.raises(StorageError, match="matched nothing"):  # reused, not refused: on to their (absent) tars
        run_demo(validate(DemoConfig, base), log=lambda m: None)
    with pytest.raises(ConfigError, match="shards.audio: the shards in .* were made with False, this config says True"):
        run_demo(validate(DemoConfig, {**base, "shards": {**base["shards"], "audio": True}}), log=lambda m: None)
    (shards / "_SUCCESS").write_text("ok\n")  # a run folder from before the check: an older generator
    with pytest.raises(ConfigError, match="older shard generator"):
        run_demo(validate(DemoConfig, base), log=lambda m: None)


def test_heldout_clips_come_in_reversed_pairs(tmp_path):
    """Clip 2k+1 of the held-out split is clip 2k played backwards: the pairs that make an order-blind
    model score exactly chance on direction-vs-opposite."""
    import json

    from vlp.data.media import DecodeConfig, SamplingConfig, decode_video_pyav
    from vlp.synth.shards import OPPOSITE, MakeShardsConfig, make_shards
    from vlp.data.tario import iter_tar_samples

    make_shards(MakeShardsConfig(out=str(tmp_path), videos=0, images=0, instructions=0, heldout=4,
                                 samples_per_shard=4, num_frames=8))
    samples = list(iter_tar_samples(open(tmp_path / "heldout-00000.tar", "rb")))
    metas = [json.loads(s.members["json"]) for s in samples]
    sampling = SamplingConfig(mode="uniform", num_frames=8)
    frames = [decode_video_pyav(s.members["mp4"], sampling, DecodeConfig()).frames.astype(np.int16) for s in samples]
    for a, b in ((0, 1), (2, 3)):
        assert metas[b]["reverse_of"] == metas[a]["key"] and "reverse_of" not in metas[a]
        assert metas[b]["direction"] == OPPOSITE[metas[a]["direction"]]
        assert (metas[b]["color"], metas[b]["shape"]) == (metas[a]["color"], metas[a]["shape"])
        assert np.array_equal(frames[a], frames[b][::-1])  # held-out clips are lossless
        assert np.abs(frames[a] - frames[b]).mean() > 5  # ... and not simply the same clip
    assert np.abs(frames[0] - frames[2]).mean() > 5  # pairs differ from each other


def test_demo_tower_encodes_position_in_its_cls_token():
    """preset:tiny-clip-synth (the demo's stand-in for a pretrained CLIP): its penultimate CLS token must carry
    the shape's position linearly, on frames it never saw, or no pooler can show what temporal CLS tokens buy."""
    import json
    from pathlib import Path

    from vlp.synth.shards import render_stills
    from vlp.models.presets import resolve_model_path
    from vlp.models.towers import TOWERS, build_vision_tower

    path = resolve_model_path("preset:tiny-clip-synth")
    assert Path(path).name == "tiny-clip-synth.v2"  # versioned folder: a new recipe never reuses an old build
    stats = json.loads((Path(path) / "pretraining.json").read_text())
    assert stats["steps"] == 600 and stats["color_acc"] >= 0.9, stats
    tower = build_vision_tower(TOWERS.config(path="preset:tiny-clip-synth", device="cpu", dtype="float32"))
    assert tower.image_size == 112
    frames, y = render_stills(np.random.default_rng(123), 160, 64, 96)
    cls = tower.features(clip_preprocess(frames, tower.image_size, mean=tower.mean, std=tower.std))[:, 0]  # (N, D)
    x = torch.cat([cls, torch.ones(len(cls), 1)], 1).double()
    t = torch.as_tensor(y["xy"], dtype=torch.float64)
    w = torch.linalg.lstsq(x[:100], t[:100]).solution  # a linear read-out fitted on 100 frames ...
    err = (x[100:] @ w - t[100:]).abs().mean().item()  # ... and tested on 60 others (positions span [-1, 1])
    assert err < 0.2, err
