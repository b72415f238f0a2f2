"""Adding a connector touches no vlp file: tests/toy_connector.py defines ``toy_queries`` and a config names it
(``model.plugins: [toy_connector]``). One training step runs with it through the real path (Ray Data tokenising
with its token count, a Ray Train worker with DeepSpeed), then the export reloads to the model that was trained.

The training runs in a fresh interpreter whose PYTHONPATH holds only vlp: tests/ is on its sys.path (as pytest
puts it on the driver's), not on PYTHONPATH, so the workers of the local Ray it starts can import the plugin
only because validating the config shared its folder with them (vlp.models.parts.import_plugin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from vlp.config import validate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRAIN = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])  # tests/: on the driver's sys.path only
    from vlp.config import validate
    from vlp.train import TrainConfig, run_train

    cfg = validate(TrainConfig, json.loads(sys.argv[2]))  # imports toy_connector: before Ray starts
    print("RESULT", json.dumps(run_train(cfg, log=print)))
""")


def test_toy_connector_trains_one_step_without_library_changes(ray_local, synth_shards, tmp_path):
    from vlp.precompute import PrecomputeConfig, run_precompute

    feats = tmp_path / "feat"
    run_precompute(validate(PrecomputeConfig, {"data": {"shards": [str(synth_shards / "webvid-00000.tar")]},
                                               "output": {"uri": str(feats)}, "ray": {"progress_bars": False}}),
                   log=lambda *_: None)
    cfg = {"run_name": "toy", "output_dir": str(tmp_path / "runs"), "max_steps": 1,
           "data": {"sets": [{"uri": str(feats)}], "template": "plain", "max_length": 256},
           "batch": {"global_size": 2, "micro_size": 2}, "deepspeed": {"zero_stage": 1},
           "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
           "model": {"plugins": ["toy_connector"], "connector": {"type": "toy_queries", "num_queries": 3}},
           "ray": {"num_cpus": 2, "progress_bars": False}}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    out = subprocess.run([sys.executable, "-c", TRAIN, str(ROOT / "tests"), json.dumps(cfg)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    summary = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert summary["steps"] == 1 and summary["probe"] is not None

    from vlp.formats.export import load_model, probe_logits

    info = json.loads((Path(summary["export"]) / "vlp_model.json").read_text())
    assert info["model"]["plugins"] == ["toy_connector"]
    assert info["model"]["connector"] | {"init_from": None} == {"type": "toy_queries", "num_queries": 3,
                                                                "trainable": True, "init_from": None}
    model, _, _ = load_model(summary["export"])  # validating the export's config imports the plugin here too
    assert type(model.connector).__name__ == "QueryPool"
    probe = summary["probe"]
    assert len(probe["input_ids"]) + 3 - 1 <= 256  # the row was counted with the connector's 3 tokens
    torch.testing.assert_close(probe_logits(model, probe), torch.tensor(probe["logits"]), rtol=1e-4, atol=1e-4)
    assert model.visual_tokens(torch.randn(264, 64), "valley_pooled", 8).shape == (3, model.llm.config.hidden_size)
