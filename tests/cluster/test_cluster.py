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


def test_aws_ships_the_package_and_demands_a_token(aws):
    mounts = aws["file_mounts"]
    for remote, local in mounts.items():
        if remote.startswith("~/vlp/"):
            assert (ROOT / local).exists(), local                      # run `ray up` from the repository root
    assert {"~/vlp/pyproject.toml", "~/vlp/constraints.txt", "~/vlp/platform"} <= set(mounts)
    assert not any(local.strip("./") in ("", ".venv", "runs") for local in mounts.values())  # no venv, no runs
    starts = aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


# ---------------------------------------------------------------------------------------------------------
# KubeRay. Field names are those of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/raycluster_types.go and
# rayjob_types.go). No CRD schema ships with a Python package here, so the fields the CRD requires are checked
# by hand: RayClusterSpec.headGroupSpec; HeadGroupSpec.template + rayStartParams; WorkerGroupSpec.groupName,
# minReplicas, maxReplicas, rayStartParams, template; a pod template's containers[].name + image.

import json
import re

KUBE_FILES = sorted((ROOT / "cluster").glob("kuberay-*.yaml"))
AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
SECRETISH = re.compile(r"(aws_secret_access_key|aws_access_key_id|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|"
                       r"AWS_SESSION_TOKEN|RAY_AUTH_TOKEN\s*[:=]|auth_token\s*:\s*[^\s~/.])")  # a path to a token file is fine
GPU_GROUPS = {"a100-40g": "p4d.24xlarge", "a100-80g": "p4de.24xlarge", "a100-40g-spot": "p4d.24xlarge"}


def _docs(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def kube():
    docs = {p.name: _docs(p) for p in KUBE_FILES}
    (rc,) = [d for d in docs["kuberay-a100.yaml"] if d["kind"] == "RayCluster"]
    jobs = [d for ds in docs.values() for d in ds if d["kind"] == "RayJob"]
    return {"docs": docs, "cluster": rc, "jobs": jobs}


def _containers(template):
    return template["spec"]["containers"]


def _ray_resources(params) -> dict:
    """rayStartParams.resources is a quoted JSON string, '"{\\"name\\": 1}"', as KubeRay passes it to ray start."""
    raw = params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), raw
    return json.loads(raw[1:-1].replace('\\"', '"'))


def _check_cluster_spec(spec, image):
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    opts = spec["autoscalerOptions"]
    assert opts["upscalingMode"] in ("Default", "Aggressive", "Conservative") and opts["version"] == "v2"
    assert 60 <= opts["idleTimeoutSeconds"] <= 3600
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    assert set(head) >= {"template", "rayStartParams"}
    assert head["rayStartParams"]["num-cpus"] == "0"                      # no work lands on the head
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert "headService" not in head                                      # no LoadBalancer / NodePort
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for tmpl in [head["template"]] + [g["template"] for g in groups.values()]:
        assert tmpl["spec"]["serviceAccountName"] == "vlp-ray"            # S3 via IRSA
        for c in _containers(tmpl):
            assert c["name"] and c["image"] == image
            assert "env" not in c or not any("AWS_" in e["name"] for e in c["env"])
            assert c["resources"]["limits"] == c["resources"]["requests"]  # guaranteed pods
    for name, g in groups.items():
        assert set(g) >= {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}, name
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0 and 1 <= g["maxReplicas"] <= 32, name
        sel = g["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
        (c,) = _containers(g["template"])
        res = _ray_resources(g["rayStartParams"])
        if name in GPU_GROUPS:
            assert sel == GPU_GROUPS[name], name
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 8, name
            assert res.get("accelerator_type:A100") == 1, name             # Ray's accelerator resource, known at 0
            tol = g["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tol), name
        else:
            assert "nvidia.com/gpu" not in c["resources"]["limits"] and "accelerator_type:A100" not in res
    return groups


def test_kuberay_cluster_structure(kube, aws):
    rc = kube["cluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"] == "vlp-a100"
    image = aws["docker"]["image"]
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311-cu\d+", image)   # pinned, never :latest
    groups = _check_cluster_spec(rc["spec"], image)
    # the node groups of aws-a100.yaml
    assert set(groups) == {"a100-40g", "a100-80g", "a100-40g-spot", "cpu-decode"}
    aws_types = aws["available_node_types"]
    assert groups["a100-40g"]["maxReplicas"] == aws_types["gpu_a100_40g"]["max_workers"]
    assert groups["a100-80g"]["maxReplicas"] == aws_types["gpu_a100_80g"]["max_workers"]
    assert groups["cpu-decode"]["maxReplicas"] == aws_types["cpu_decode"]["max_workers"]
    assert _ray_resources(groups["a100-80g"]["rayStartParams"])["accelerator_type:A100-80G"] == 1
    spot = groups["a100-40g-spot"]["template"]["spec"]["nodeSelector"]
    assert "SPOT" in spot.values() or "spot" in spot.values()
    (sa,) = [d for d in kube["docs"]["kuberay-a100.yaml"] if d["kind"] == "ServiceAccount"]
    assert sa["metadata"]["name"] == "vlp-ray"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    # the Dockerfile builds on the same pinned base image
    assert f"FROM {image}\n" in (ROOT / "cluster" / "Dockerfile").read_text()


def test_kuberay_rayjobs(kube, aws):
    from vlp.config import load_config
    from vlp.config_kinds import kind_of

    jobs = {j["metadata"]["name"]: j for j in kube["jobs"]}
    entry = {n: j["spec"]["entrypoint"] for n, j in jobs.items()}
    assert any("jobs/precompute.py" in e for e in entry.values()) and any("jobs/train.py" in e for e in entry.values())
    cluster_groups = {g["groupName"]: g for g in kube["cluster"]["spec"]["workerGroupSpecs"]}
    for name, job in jobs.items():
        assert job["apiVersion"] == "ray.io/v1", name
        spec = job["spec"]
        # entrypoint: python jobs/X.py --config configs/Y.yaml, both files exist and the config loads
        m = re.fullmatch(r"python (jobs/\w+\.py) --config (configs/\S+\.yaml)", spec["entrypoint"])
        assert m, spec["entrypoint"]
        script, cfg = ROOT / m.group(1), ROOT / m.group(2)
        assert script.is_file() and cfg.is_file(), spec["entrypoint"]
        load_config(kind_of(cfg.name), cfg)
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert set(env["excludes"]) >= {".venv", "runs", ".git"}
        assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
        # exactly one of: an existing cluster (clusterSelector) or its own (rayClusterSpec, deleted after)
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), name
        if "clusterSelector" in spec:
            assert spec["clusterSelector"] == {"ray.io/cluster": kube["cluster"]["metadata"]["name"]}
            assert not spec.get("shutdownAfterJobFinishes") and "ttlSecondsAfterFinished" not in spec
            for c in _containers(spec["submitterPodTemplate"]):
                assert c["image"] == aws["docker"]["image"]
        else:
            assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 3600
            own = _check_cluster_spec(spec["rayClusterSpec"], aws["docker"]["image"])
            # the same head and the same groups as the RayCluster: one definition, kept in step
            assert spec["rayClusterSpec"]["headGroupSpec"] == kube["cluster"]["spec"]["headGroupSpec"]
            assert all(g == cluster_groups[n] for n, g in own.items()) and own
            if "train" in spec["entrypoint"]:
                assert set(own) >= {"a100-40g"}


def test_cluster_files_hold_no_credentials():
    files = sorted((ROOT / "cluster").iterdir())
    assert len(files) >= 5
    for p in files:
        text = p.read_text()
        assert not AWS_KEY.search(text), p.name
        assert not SECRETISH.search(text), (p.name, SECRETISH.search(text).group(0))
    # the checks can fail: a key or a literal token in YAML is caught
    assert AWS_KEY.search("aws_key: AKIAABCDEFGHIJKLMNOP") and SECRETISH.search("auth_token: abc")
    assert SECRETISH.search("- {name: AWS_SECRET_ACCESS_KEY, value: x}")
    assert not SECRETISH.search("~/.ray/auth_token: ~/.ray/auth_token")


def test_every_accelerator_type_the_shipped_configs_ask_for_has_a_node_type(aws, kube):
    """A request no node type advertises is never scheduled: the autoscaler cannot start a node for it."""
    from vlp.config import load_config
    from vlp.config_kinds import kind_of

    wanted = {}
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = load_config(kind_of(path.name), str(path))
        for section in ("encoder", "scaling", "deployment"):  # deployment: vlp serve's replicas
            acc = getattr(getattr(cfg, section, None), "accelerator_type", None)
            if acc:
                wanted[f"{path.relative_to(ROOT)}:{section}"] = acc
    assert "A100-80G" in wanted.values() and "A100" in wanted.values(), wanted
    aws_offers = {k for t in aws["available_node_types"].values() for k in t["resources"]}
    cluster = kube["cluster"]
    kube_offers = {k for g in cluster["spec"]["workerGroupSpecs"] for k in _ray_resources(g["rayStartParams"])}
    for where, acc in wanted.items():
        assert f"accelerator_type:{acc}" in aws_offers, f"{where} asks for {acc}: no aws-a100.yaml node type has it"
        assert f"accelerator_type:{acc}" in kube_offers, f"{where} asks for {acc}: no KubeRay worker group has it"
