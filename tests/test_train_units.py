"""Training pieces without Ray: memory preflight, mixtures, tokenisation/truncation, length grouping, config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import dotted
from vlp.config import ConfigError, validate
from vlp.data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX
from vlp.train.config import TrainConfig
from vlp.train.data import Mixture, Tokenize, length_grouped, padding_fraction, write_state
from vlp.train.memory import model_state_bytes, preflight


def test_zero_formulas_match_the_paper():
    P, N = 7_000_000_000, 8
    assert model_state_bytes(P, 0, N, 0) == 16 * P
    assert model_state_bytes(P, 0, N, 1) == pytest.approx((4 + 12 / N) * P)
    assert model_state_bytes(P, 0, N, 2) == pytest.approx((2 + 14 / N) * P)
    assert model_state_bytes(P, 0, N, 3) == pytest.approx(16 / N * P)
    assert model_state_bytes(0, P, N, 1) == 2 * P  # frozen weights only
    with pytest.raises(ValueError, match="does not exist"):
        model_state_bytes(P, 0, N, 4)


def test_preflight_says_what_would_fit():
    # 7B fully trained on 8 x 80 GB: ZeRO-1 needs 4 + 1.5 = 5.5 B/param = 35.9 GiB -> fits
    assert preflight(7_000_000_000, 0, 8, 1, 80).fits
    # ... on 40 GB cards it does not; ZeRO-2 (3.75 B/param = 24.4 GiB) does
    pf = preflight(7_000_000_000, 0, 8, 1, 40)
    assert not pf.fits and "ZeRO-1 x8" in pf.message and "zero_stage=2 with 8 worker(s)" in pf.message
    pf = preflight(7_000_000_000, 0, 1, 0, 40)
    assert not pf.fits and "zero_stage=2 with 8 worker(s)" in pf.message and "zero_stage=3 with 8" in pf.message
    assert "nothing up to 256 workers fits" in preflight(70_000_000_000_000, 0, 8, 1, 40).message


BASE = {"run_name": "r", "data": {"sets": [{"uri": "x"}]}, "scaling": {"num_workers": 2}}


def _cfg(**over):
    d = json.loads(json.dumps(BASE))
    dotted(d, **over)
    return validate(TrainConfig, d)


def test_global_batch_is_checked_at_config_load():
    assert _cfg(**{"batch.global_size": 32, "batch.micro_size": 4}).batch.grad_accum == 4
    with pytest.raises(ConfigError, match="not a multiple of batch.micro_size x scaling.num_workers"):
        _cfg(**{"batch.global_size": 30, "batch.micro_size": 4})
    with pytest.raises(ConfigError, match=r"!= micro_size x grad_accum x num_workers"):
        _cfg(**{"batch.global_size": 32, "batch.micro_size": 4, "batch.grad_accum": 2})
    with pytest.raises(ConfigError) as ei:
        _cfg(**{"deepspeed.zero_stage": 5, "data.template": "alpaca", "model.connector.type": "qformer"})
    paths = {p for p, _ in ei.value.problems}
    assert {"deepspeed.zero_stage", "data.template", "model.connector.type"} <= paths


def _batch(uids):
    n = len(uids)
    return {"uid": np.asarray(uids, dtype=object), "x": np.arange(n)}


def test_mixture_is_seeded_and_replayable(tmp_path):
    state = str(tmp_path / "state.json")
    write_state(state, 0, [])
    uids = [f"u{i}" for i in range(400)]
    half = Mixture("a", 0.5, seed=1, state_path=state, fmt="auto")
    a, b = half(_batch(uids)), half(_batch(uids))
    assert list(a["uid"]) == list(b["uid"]) and 150 < len(a["uid"]) < 250
    assert list(Mixture("a", 0.5, seed=2, state_path=state, fmt="auto")(_batch(uids))["uid"]) != list(a["uid"])
    write_state(state, 1, [])
    assert list(half(_batch(uids))["uid"]) != list(a["uid"])  # a new epoch draws a new half
    twice = Mixture("b", 2.0, seed=1, state_path=state, fmt="caption")(_batch(uids[:3]))
    assert list(twice["uid"]) == ["b:u0", "b:u0#1", "b:u1", "b:u1#1", "b:u2", "b:u2#1"]
    assert list(twice["x"]) == [0, 0, 1, 1, 2, 2] and set(twice["format"]) == {"caption"}


def _row(conv=None, caption="", media="video", shape=(264, 64), mode="valley_pooled", t=8, fmt="auto"):
    return {"format": fmt, "conversations": json.dumps(conv) if conv else "", "caption": caption,
            "media_type": media, "shape": list(shape), "mode": mode, "num_frames": t}


def test_truncation_never_cuts_the_visual_span():
    conv = [{"from": "human", "value": "<video>\nWhat color is the shape?"},
            {"from": "gpt", "value": "The shape is red. " * 20}]
    tk = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=360, overlong="truncate", pooler="valley")
    ids, labels, length, reason = tk.one(_row(conv))
    assert reason == "" and length == 360
    p = ids.index(VISUAL_TOKEN_INDEX)
    assert len(ids) - 1 + 264 == 360 and p < len(ids) and any(l != IGNORE_INDEX for l in labels)
    # a visual span that alone passes max_length: skipped, never cut
    tk_small = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=200, overlong="truncate", pooler="valley")
    assert tk_small.one(_row(conv))[3] == "over max_length"
    tk_skip = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=360, overlong="skip", pooler="valley")
    assert tk_skip.one(_row(conv))[3] == "over max_length"
    # visual tokens counted per pooler and feature mode
    tk_pm = Tokenize("preset:tiny-tokenizer", "plain", max_length=1000, overlong="skip", pooler="patch_mean")
    n_plain = tk_pm.one(_row(caption="A red circle.", fmt="caption"))[2]
    tk_v = Tokenize("preset:tiny-tokenizer", "plain", max_length=1000, overlong="skip", pooler="valley")
    assert tk_v.one(_row(caption="A red circle.", fmt="caption"))[2] - n_plain == 8
    assert tk_v.one(_row(caption="A red circle.", shape=(8, 257, 64), mode="frames"))[2] == \
        tk_v.one(_row(caption="A red circle."))[2]


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    rows = [{"media_type": "video" if i % 2 else "image", "length": int(l)}
            for i, l in enumerate(rng.integers(20, 300, 512))]
    grouped = length_grouped(rows, 8, np.random.default_rng(1), group=True)
    random = length_grouped(list(rng.permutation(rows)), 8, np.random.default_rng(1), group=False)
    assert len(grouped) == len(random) == 64
    assert padding_fraction(grouped) < 0.1 < padding_fraction(random)
    by_mod = length_grouped(rows, 8, np.random.default_rng(1), group=True, by_modality=True)
    mixed = sum(len({r["media_type"] for r in mb}) > 1 for mb in by_mod)
    assert mixed <= 1  # modality first: at most the boundary micro-batch mixes
    assert padding_fraction(grouped) <= padding_fraction(by_mod) < padding_fraction(random)
