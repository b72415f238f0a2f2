"""Typed configs: YAML + dotted overrides, every problem reported at once by dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from vlp.config import ConfigError, apply_overrides, dump_config, load_config, parse_override
from vlp.config_kinds import kind_of
from vlp.precompute import PrecomputeConfig

SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 4


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads(path: Path):
    cls = kind_of(path.name)
    cfg = load_config(cls, path)
    # round trip: the resolved config written into a run loads back to the same thing
    again = cls.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_all_problems_listed_by_dotted_path(tmp_path):
    p = _write(tmp_path, """
data:
  shards: [a.tar]
  sampling: {num_frames: 0, mode: sideways}
  decode: {backend: ffmpeg9}
  colour: blue
encoder:
  batch_size: "many"
  tower: {type: resnet}
output: {uri: out, mode: frames}
bogus_top: 1
""")
    with pytest.raises(ConfigError) as ei:
        load_config(PrecomputeConfig, p)
    paths = {path for path, _ in ei.value.problems}
    assert {"data.sampling.num_frames", "data.sampling.mode", "data.decode.backend", "data.colour",
            "encoder.batch_size", "encoder.tower.type", "bogus_top"} <= paths
    msg = str(ei.value)
    assert "7 problem(s)" in msg and "unknown key" in msg and "unknown vision tower type 'resnet'" in msg


def test_missing_required_fields(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(PrecomputeConfig, _write(tmp_path, "data: {}\n"))
    paths = {p for p, _ in ei.value.problems}
    assert paths == {"data.shards", "output"}


def test_overrides_parse_yaml_values_and_apply(tmp_path):
    p = _write(tmp_path, "data: {shards: [a.tar]}\noutput: {uri: out}\n")
    cfg = load_config(PrecomputeConfig, p, ["data.sampling.num_frames=4", "output.mode=frames",
                                             "data.shards=[x.tar, y.tar]", "encoder.tower.dtype=float16"])
    assert cfg.data.sampling.num_frames == 4 and cfg.output.mode == "frames"
    assert cfg.data.shards == ["x.tar", "y.tar"] and cfg.encoder.tower.dtype == "float16"


def test_override_errors(tmp_path):
    p = _write(tmp_path, "data: {shards: [a.tar]}\noutput: {uri: out}\n")
    with pytest.raises(ConfigError, match="data.sampling.nmu_frames: unknown key"):
        load_config(PrecomputeConfig, p, ["data.sampling.nmu_frames=4"])
    with pytest.raises(ConfigError, match="override must look like"):
        load_config(PrecomputeConfig, p, ["data.sampling.num_frames"])
    with pytest.raises(ConfigError, match="is a list, cannot set"):
        apply_overrides({"a": [1]}, ["a.b=2"])
    assert parse_override("a.b=") == (["a", "b"], "")


def test_semantic_validation(tmp_path):
    p = _write(tmp_path, "data: {shards: [a.tar], decode: {device: cuda, backend: pyav}}\noutput: {uri: o}\n")
    with pytest.raises(ConfigError, match="data.decode: .*device=cuda needs a backend that decodes there"):
        load_config(PrecomputeConfig, p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PrecomputeConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(PrecomputeConfig, _write(tmp_path, "data: [unclosed\n"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(PrecomputeConfig, _write(tmp_path, "- a\n- b\n"))


def test_cli_reports_config_errors_without_traceback(capsys):
    from vlp.cli import main

    rc = main(["precompute", "data.shards=[a.tar]", "output.uri=o", "data.sampling.num_frames=-1", "foo=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.sampling.num_frames" in err and "foo: unknown key" in err and "Traceback" not in err


def test_cli_print_config(capsys):
    from vlp.cli import main

    assert main(["precompute", "--config", str(ROOT / "configs/local/precompute.yaml"), "--print-config",
                 "data.sampling.num_frames=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["data"]["sampling"]["num_frames"] == 3 and out["output"]["mode"] == "valley_pooled"


def test_configuration_reference_is_current():
    from vlp.configdoc import config_reference

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed.strip() == config_reference().strip(), "run: vlp config-docs > docs/configuration.md"
    assert "`data.sampling.num_frames`" in committed and "`deepspeed.zero_stage`" in committed


def test_override_inside_a_default_section_keeps_the_rest_of_that_default():
    """`vlp demo stage2.epochs=1` changes one key of the demo's stage-2 defaults (before: lr went missing and
    global_batch silently fell back to the class default 16 instead of the demo's 32)."""
    from vlp.synth.demo import DemoConfig

    cfg = load_config(DemoConfig, None, ["stage2.epochs=1", "stage1.epochs=2"])
    default = DemoConfig()
    assert cfg.stage2.epochs == 1 and cfg.stage1.epochs == 2
    assert cfg.stage2.lr == default.stage2.lr and cfg.stage2.global_batch == default.stage2.global_batch == 32
    assert cfg.stage2.zero_stage == default.stage2.zero_stage == 2
    assert cfg.tower.path == "preset:tiny-clip-synth"
    cfg = load_config(DemoConfig, None, ["tower.layer=-1"])  # a default section with a non-default path kept
    assert cfg.tower.path == "preset:tiny-clip-synth" and cfg.tower.layer == -1


def test_switching_a_part_type_by_override_drops_the_default_types_parameters(tmp_path):
    """``format.type=sharegpt`` on a config without a format section: the section copied from the default
    (llava, with llava's own keys) must not carry llava's parameters into sharegpt; a file's own section does."""
    from vlp.pack import PackConfig

    base = ["annotations=[a.json]", "out=o"]
    cfg = load_config(PackConfig, None, ["format.type=sharegpt", "format.max_items=3", *base])
    assert cfg.format.type == "sharegpt" and cfg.format.max_items == 3
    assert load_config(PackConfig, None, base).format.type == "llava"
    (tmp_path / "pack.yaml").write_text("format: {type: llava, image_key: picture}\n")
    with pytest.raises(ConfigError, match=r"format\.image_key"):
        load_config(PackConfig, tmp_path / "pack.yaml", ["format.type=sharegpt", *base])
