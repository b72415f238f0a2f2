"""Typed parts (vlp.models.parts, poolers, connectors, towers): token counts equal what the forward makes,
precompute pools with the Valley pooler's own function, configs are registry-backed unions that round-trip and
fail by dotted path, plugins register types, and old configs / exports keep loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import yaml
from pydantic import Field

from vlp.config import Cfg, ConfigError, dump_config, validate
from vlp.models.connectors import CONNECTORS
from vlp.models.parts import PartCfg, PartRegistry, import_plugin, plugin_root, share_with_local_workers
from vlp.models.poolers import POOLERS
from vlp.models.towers import TOWERS
from vlp.models.videollm import ModelConfig, visual_token_count
from vlp.train import TrainConfig

T, P, D = 4, 16, 8
TRAIN = {"run_name": "r", "data": {"sets": [{"uri": "feats"}]}}  # what TrainConfig requires
SHAPES = {"frames": (T, 1 + P, D), "valley_pooled": (P + T, D)}


def _feats(mode: str) -> torch.Tensor:
    return torch.randn(SHAPES[mode], generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", POOLERS.builtin_names())
@pytest.mark.parametrize("mode", ["frames", "valley_pooled"])
def test_pooler_num_tokens_is_what_its_forward_makes(name, mode):
    pooler = POOLERS.part(name)
    f = _feats(mode)
    if mode not in pooler.modes:  # the count refuses what the forward refuses
        for call in (lambda: pooler(f, mode, T), lambda: pooler.num_tokens(f.shape, mode, T)):
            with pytest.raises(ValueError, match="output.mode=frames"):
                call()
        return
    out = pooler(f, mode, T)  # -> (N, D)
    assert out.shape == (pooler.num_tokens(list(f.shape), mode, T), D)


NEEDS = {"per_modality": {"image": {"type": "mlp2x_gelu"}}}  # types without a config of defaults alone


@pytest.mark.parametrize("name", CONNECTORS.builtin_names())
def test_connector_num_tokens_is_what_its_module_makes(name):
    part = CONNECTORS.part({"type": name, **NEEDS.get(name, {})})
    with torch.device("meta"):  # each type's default sizes (mPLUG-Owl's abstractor is 100 M parameters): shapes only
        out = part.build(D, 12)(torch.randn(7, D))  # (7, D) -> (num_tokens(7), 12)
    assert out.shape == (part.num_tokens(7), 12)


def test_visual_token_count_asks_pooler_then_connector():
    import toy_connector  # noqa: F401  (tests/: a connector with its own count)

    for pooler, n in (("valley", P + T), ("patch_mean", P)):
        cfg = validate(ModelConfig, {"pooler": {"type": pooler}})
        assert visual_token_count(cfg, SHAPES["valley_pooled"], "valley_pooled", T) == n
    toy = validate(ModelConfig, {"connector": {"type": "toy_queries", "num_queries": 3}})
    assert visual_token_count(toy, SHAPES["frames"], "frames", T) == 3


def test_tokenize_counts_with_the_run_connector_and_fails_on_a_bad_model_config():
    """Tokenize counts the visual span with the model's parts; a model config that does not validate where rows
    are tokenised (a plugin the worker cannot import) fails the batch instead of skipping every row."""
    from vlp.train.data import Tokenize

    row = {"format": "caption", "conversations": "", "caption": "A red circle.", "media_type": "video",
           "modalities": ["video"], "shape": [[264, 64]], "mode": "valley_pooled", "num_frames": [8]}  # a /2 row
    count = {}
    for name, model in (("valley", "valley"), ("toy", {"plugins": ["toy_connector"],
                                                      "connector": {"type": "toy_queries", "num_queries": 3}})):
        count[name] = Tokenize("preset:tiny-tokenizer", "plain", 1000, "skip", model).one(row)[2]
    assert count["valley"] - count["toy"] == 264 - 3
    bad = Tokenize("preset:tiny-tokenizer", "plain", 1000, "skip", {"plugins": ["no_such_plugin_module"]})
    batch = {}
    for k, v in {**row, "uid": "u", "features": [b""]}.items():
        batch[k] = np.empty(1, dtype=object)
        batch[k][0] = v
    with pytest.raises(ConfigError, match=r"plugins\[0\].*no_such_plugin_module"):
        bad(batch)


def test_precompute_pools_with_the_valley_pooler():
    """output.mode=valley_pooled is the Valley pooler's own function; its stored features equal the pooler's
    output on the same tower's frames (fp16 storage apart)."""
    from vlp.models.poolers import valley
    from vlp.precompute import stages

    assert stages.valley_pool is valley.valley_pool
    frames = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)  # (T, 3, S, S)
    row = stages.make_row(shard="s", key="k", kind="sample", modalities=["video"], frames=[frames.tobytes()],
                          frames_shape=[",".join(map(str, frames.shape))])
    tower = {"device": "cpu", "dtype": "float32"}
    enc = stages.EncodeFeatures(TOWERS.config(tower), "frames")
    out = {}
    for mode in ("frames", "valley_pooled"):
        enc.mode = mode
        got = enc(stages.rows_batch([row]))
        got = stages.batch_rows(got)[0]  # one row, one item
        out[mode] = torch.from_numpy(np.frombuffer(got["features"][0], np.float16)
                                     .reshape(stages.shape_of(got["features_shape"][0])).astype(np.float32))
    assert out["frames"].shape == (3, 257, 64) and out["valley_pooled"].shape == (256 + 3, 64)
    pooled = POOLERS.part("valley")(out["frames"], "frames", 3)  # (P + T, D)
    assert torch.equal(out["valley_pooled"][256:], pooled[256:])  # CLS tokens: copied, not computed
    torch.testing.assert_close(out["valley_pooled"], pooled, rtol=2e-3, atol=2e-3)  # fp16 rounding of the mean
    assert TOWERS.part(tower).num_tokens(3) == out["frames"].shape[0] * out["frames"].shape[1]


def _problems(cls, data) -> dict[str, str]:
    with pytest.raises(ConfigError) as ei:
        validate(cls, data)
    return dict(ei.value.problems)


def test_unknown_type_or_parameter_fails_by_dotted_path_with_the_known_types():
    probs = _problems(TrainConfig, {**TRAIN, "model": {
        "connector": {"type": "qformer", "num_queries": 32}, "pooler": {"type": "valley", "window": 2},
        "plugins": ["no_such_plugin_module"]}})
    assert set(probs) == {"model.connector.type", "model.pooler.window", "model.plugins[0]"}
    assert probs["model.connector.type"].startswith(
        "unknown connector type 'qformer'; known: abstractor, linear, mlp2x_gelu, per_modality, perceiver")
    assert probs["model.pooler.window"] == "unknown key"
    assert "cannot import plugin module 'no_such_plugin_module'" in probs["model.plugins[0]"]
    assert "PYTHONPATH" in probs["model.plugins[0]"]
    from vlp.precompute import PrecomputeConfig

    probs = _problems(PrecomputeConfig, {"data": {"shards": ["x"]}, "output": {"uri": "o"},
                                         "encoder": {"tower": {"type": "clip", "patch": 14}}})
    assert probs == {"encoder.tower.patch": "unknown key"}
    assert "known: none, patch_mean, valley" in _problems(ModelConfig, {"pooler": {"type": 3}})["pooler.type"]
    assert "valid dictionary" in _problems(ModelConfig, {"pooler": "valley"})["pooler"]


class _WidgetCfg(PartCfg):
    type: str = "plain"


WIDGETS = PartRegistry("widget", _WidgetCfg)


@WIDGETS.register
class _Plain:
    class Cfg(_WidgetCfg):
        type: Literal["plain"] = "plain"

    def __init__(self, cfg):
        self.cfg = cfg


@WIDGETS.register
class _Tuned:
    class Cfg(_WidgetCfg):
        type: Literal["tuned"] = "tuned"
        knob: int = Field(3, ge=1, description="how far")

    def __init__(self, cfg):
        self.cfg = cfg


_Plain.__module__ = _Tuned.__module__ = "vlp.widgets"  # as if vlp shipped them: the docs list them


class _Holder(Cfg):
    """A config holding a widget."""

    widget: WIDGETS.field = WIDGETS.config()
    widgets: list[WIDGETS.field] = []


def test_union_validates_each_type_with_its_own_parameters_and_round_trips():
    h = validate(_Holder, {"widget": {"type": "tuned", "knob": 5}, "widgets": [{}, {"type": "tuned"}]})
    assert type(h.widget) is _Tuned.Cfg and h.widget.knob == 5 and type(h.widgets[0]) is _Plain.Cfg
    dumped = yaml.safe_load(dump_config(h))
    assert dumped == {"widget": {"type": "tuned", "knob": 5}, "widgets": [{"type": "plain"}, {"type": "tuned",
                                                                                              "knob": 3}]}
    assert validate(_Holder, dumped) == h
    assert _problems(_Holder, {"widgets": [{"type": "plain", "knob": 2}, {"type": "tuned", "knob": 0}]}) == {
        "widgets[0].knob": "unknown key", "widgets[1].knob": "Input should be greater than or equal to 1 (got 0)"}
    with pytest.raises(ValueError, match="already registered"):
        WIDGETS.register(_Tuned)
    with pytest.raises(TypeError, match="Literal"):
        WIDGETS.register(type("Loose", (), {"Cfg": _WidgetCfg}))

    from vlp.configdoc import part_rows

    rows = part_rows(_WidgetCfg, "widget.", h.widget)
    assert rows[0].startswith("| `widget.type` | 'plain' \\| 'tuned' | `'tuned'` |")
    assert rows[1] == "| `widget.knob` | int | `5` | how far |"
    assert part_rows(_WidgetCfg, "w.", WIDGETS.config())[1] == "| `w.knob` | int | `3` | (type tuned) how far |"


def test_existing_yaml_and_saved_configs_load_unchanged():
    old = {"vision_hidden_size": 64, "pooler": {"type": "valley"},
           "connector": {"type": "linear", "trainable": True, "init_from": "runs/s1/export"},
           "llm": {"path": "preset:tiny-llama", "tokenizer": None, "trainable": False,
                   "gradient_checkpointing": False, "dtype": "float32"}}
    cfg = validate(ModelConfig, old)  # a vlp_model.json / config.yaml written before model.plugins existed
    want = {"plugins": [], **old, "audio_hidden_size": None, "tower": None, "frame_times": "none"}  # new keys: defaults
    want["llm"] = {**old["llm"], "init_from": None, "attn_implementation": "sdpa"}
    assert cfg.model_dump(mode="json") == want
    from vlp.train.trainer import config_changes

    train = validate(TrainConfig, {**TRAIN, "model": {**old, "connector": {"type": "mlp2x_gelu", "trainable": False}}})
    saved = yaml.safe_load(dump_config(train))
    assert validate(TrainConfig, saved) == train and config_changes(saved, train) == []
    del saved["model"]["plugins"]  # a run saved before plugins existed re-runs as the same run
    del saved["model"]["tower"]  # and one saved before model.tower existed (a new field at its None default)
    del saved["model"]["llm"]["attn_implementation"]  # or before the attention kernel was a setting (its default)
    del saved["model"]["frame_times"]
    del saved["deepspeed"]["offload_optimizer"]  # a section added later, at its default (no offload)
    assert config_changes(saved, train) == []
    saved["deepspeed"]["offload_param"] = {"device": "cpu", "pin_memory": True, "nvme_path": None}
    assert [c[0] for c in config_changes(saved, train)] == ["deepspeed.offload_param.device"]
    del saved["deepspeed"]["offload_param"]
    saved["model"]["llm"]["attn_implementation"] = "eager"  # a kernel other than the default is a change
    assert [c[0] for c in config_changes(saved, train)] == ["model.llm.attn_implementation"]
    saved["model"]["llm"]["attn_implementation"] = "sdpa"
    saved["model"]["connector"]["type"] = "linear"
    assert [c[0] for c in config_changes(saved, train)] == ["model.connector.type"]


def test_old_and_new_exports_load(tmp_path):
    from transformers import AutoTokenizer

    from vlp.formats.export import MODEL_CONFIG, export_model, load_model
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import VideoLLM

    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64, "connector": {"type": "mlp2x_gelu"}}))
    exp = export_model(model, AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer")),
                       tmp_path / "exp", {"template": "plain"})
    f = torch.randn(264, 64)
    want = model.visual_tokens(f, "valley_pooled", 8)
    info = json.loads((exp / MODEL_CONFIG).read_text())
    for variant in ("new", "old"):
        if variant == "old":  # written before model.plugins existed
            del info["model"]["plugins"]
            (exp / MODEL_CONFIG).write_text(json.dumps(info))
        loaded, _, got_info = load_model(exp)
        assert loaded.cfg.connector == model.cfg.connector.model_copy(update={"init_from": str(Path(exp) /
                                                                                               "connector.safetensors")})
        torch.testing.assert_close(loaded.visual_tokens(f, "valley_pooled", 8), want)


def test_param_counts_builds_the_connector_on_meta():
    import toy_connector  # noqa: F401

    from vlp.train.trainer import param_counts

    base = {**TRAIN, "model": {"vision_hidden_size": 64}}
    t_lin, f_lin = param_counts(validate(TrainConfig, base))
    toy = validate(TrainConfig, {**TRAIN, "model": {"vision_hidden_size": 64, "connector": {"type": "toy_queries",
                                                                                   "num_queries": 5}}})
    t_toy, f_toy = param_counts(toy)
    d_model = t_lin // 65  # linear: 64 x d_model weights + d_model biases
    assert t_lin == 65 * d_model and t_toy == t_lin + 5 * d_model and f_toy == f_lin


def test_plugin_folder_is_shared_with_local_workers(tmp_path, monkeypatch):
    """A local Ray hands the driver's PYTHONPATH to its workers: importing a plugin from a folder only on
    sys.path puts that folder there (before Ray starts), once."""
    (tmp_path / "pkg_plug").mkdir()
    (tmp_path / "pkg_plug" / "__init__.py").write_text("")
    (tmp_path / "pkg_plug" / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    assert plugin_root(importlib.import_module("pkg_plug.mod")) == str(tmp_path.resolve())
    env = {"PYTHONPATH": "/a"}
    assert share_with_local_workers(str(tmp_path), env) and env["PYTHONPATH"] == f"{tmp_path}:/a"
    assert not share_with_local_workers(str(tmp_path), env) and env["PYTHONPATH"] == f"{tmp_path}:/a"
    assert import_plugin("pkg_plug.mod") == "pkg_plug.mod"
    (tmp_path / "broken_plug.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="cannot import plugin module 'broken_plug' .RuntimeError: boom"):
        import_plugin("broken_plug")


def test_setup_refuses_feature_modes_the_pooler_cannot_take():
    from vlp.models.videollm import feature_mode_problems

    none = validate(ModelConfig, {"pooler": {"type": "none"}})
    assert feature_mode_problems(none, ["frames", "valley_pooled"]) == [
        "data.sets[1]: model.pooler.type=none needs feature sets precomputed with output.mode=frames, this one has "
        "output.mode=valley_pooled"]
    assert feature_mode_problems(validate(ModelConfig, {}), ["frames", "valley_pooled"]) == []


def test_a_tower_plugin_is_named_from_the_precompute_config():
    """tests/toy_tower.py registers ``toy_clip`` outside vlp; ``encoder.plugins`` imports it before the tower is
    validated, the driver plans with the tower type's own geometry, and its features are what it builds."""
    from vlp.config import ConfigError
    from vlp.models.towers import TOWERS, build_vision_tower
    from vlp.precompute import PrecomputeConfig
    from vlp.precompute.pipeline import plan_stages

    base = {"data": {"shards": ["unused.tar"]}, "output": {"uri": "unused"}}
    cfg = validate(PrecomputeConfig, {**base, "encoder": {"plugins": ["toy_tower"],
                                                          "tower": {"type": "toy_clip", "gain": 3.0}}})
    fp = plan_stages(cfg)[0]
    assert (fp.encoder.type, fp.encoder.image_size, fp.encoder.hidden_size) == ("toy_clip", 224, 64)
    px = torch.randn(2, 3, 224, 224)
    clip = build_vision_tower({"type": "clip", "device": "cpu"})
    torch.testing.assert_close(TOWERS.part(cfg.encoder.tower).build().features(px), 3.0 * clip.features(px))
    with pytest.raises(ConfigError, match=r"encoder\.tower\.gian"):
        validate(PrecomputeConfig, {**base, "encoder": {"plugins": ["toy_tower"], "tower": {"type": "toy_clip",
                                                                                          "gian": 1}}})
