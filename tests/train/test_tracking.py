"""Tracking settings (the real MLflow run is in tests/train/test_train.py: a run with a worker failure logs every
second step into one MLflow run)."""

from __future__ import annotations

import pytest

from vlp.config import ConfigError, validate
from vlp.train.config import TrainConfig
from vlp.train.recipe import flat_config


def test_flat_config_names_params_by_dotted_path():
    assert flat_config({"optim": {"lr": 2e-5, "betas": [0.9, 0.99]}, "epochs": 1}) == {
        "optim.lr": 2e-5, "optim.betas": "[0.9, 0.99]", "epochs": 1}


@pytest.mark.parametrize("over, path", [({"report_every": 0}, "tracking.report_every"),
                                        ({"mlflow": {"experiment_name": "x"}}, "tracking.mlflow.tracking_uri")])
def test_tracking_settings_are_checked(over, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "x"}]}, "tracking": over})
