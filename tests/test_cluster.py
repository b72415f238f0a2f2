"""Cluster files: the AWS launcher config validates against Ray's own cluster schema."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import ROOT


@pytest.fixture(scope="module")
def aws():
    return yaml.safe_load((ROOT / "cluster" / "aws-a100.yaml").read_text())


def test_aws_config_validates_against_rays_schema(aws):
    from ray.autoscaler._private.util import validate_config

    validate_config(copy.deepcopy(aws))
    bad = copy.deepcopy(aws)
    bad["available_node_types"]["gpu_a100_40g"]["resources"]["GPU"] = "eight"
    with pytest.raises(Exception, match="eight"):
        validate_config(bad)


def test_aws_node_types_and_autoscaling(aws):
    types = aws["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"] for t in types} >= {"p4d.24xlarge", "p4de.24xlarge", "c6i.16xlarge"}
    assert all(t["min_workers"] == 0 for name, t in types.items() if name != aws["head_node_type"])
    assert types["gpu_a100_40g"]["resources"]["GPU"] == 8 and types[aws["head_node_type"]]["resources"]["CPU"] == 0
    assert types["gpu_a100_40g_spot"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert aws["idle_timeout_minutes"] > 0
    text = (ROOT / "cluster" / "aws-a100.yaml").read_text()
    assert "constraints.txt" in text and "dashboard-host=127.0.0.1" in text  # pinned installs; private dashboard
    assert "aws_secret_access_key" not in text.lower() and "IamInstanceProfile" in text  # S3 via role, no keys
