"""ServeConfig: validation, the Serve deployment options it implies, the model id, the API key; the shipped
serve configs (configs/**/serve*.yaml), the Serve deploy file and the KubeRay RayService load. No Ray started."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlp.config import ConfigError, load_config, validate
from vlp.serve.config import MissingKey, ServeConfig

ROOT = Path(__file__).resolve().parents[2]


def cfg(**kw) -> ServeConfig:
    return validate(ServeConfig, {"model": "runs/local/train/stage2/export", **kw})


def test_defaults_bind_loopback_and_fixed_cpu_replica():
    c = cfg()
    assert (c.host, c.port, c.api_key, c.device()) == ("127.0.0.1", 8000, None, "cpu")
    assert c.deployment_options() == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
                                      "max_ongoing_requests": 16, "max_queued_requests": 64, "num_replicas": 1}


def test_gpus_and_autoscaling():
    c = cfg(deployment={"num_gpus": 1, "accelerator_type": "A100", "autoscaling": {"min_replicas": 0,
                                                                                  "max_replicas": 4}})
    opts = c.deployment_options()
    assert c.device() == "cuda"
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "A100"}
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 4.0,
                                          "upscale_delay_s": 30.0, "downscale_delay_s": 600.0}
    from ray.serve.config import AutoscalingConfig

    AutoscalingConfig(**opts["autoscaling_config"])  # Serve takes it as is


def test_problems_listed():
    with pytest.raises(ConfigError) as ei:
        validate(ServeConfig, {"port": 0, "deployment": {"num_gpus": -1, "accelerator_type": "A1000",
                                                         "autoscaling": {"min_replicas": 3, "max_replicas": 2}},
                               "limits": {"max_media_bytes": 0}, "api_key": "a", "api_key_env": "B", "bogus": 1})
    paths = {p for p, _ in ei.value.problems}
    assert {"model", "port", "deployment.num_gpus", "deployment.accelerator_type", "deployment.autoscaling",
            "limits.max_media_bytes", "bogus"} <= paths


def test_one_key_source():
    with pytest.raises(ConfigError, match="not both"):
        cfg(api_key="a", api_key_env="B")


def test_served_model_name():
    assert cfg().served_model() == "stage2"
    assert cfg(model="runs/x/my-model/").served_model() == "my-model"
    assert cfg(model="s3://bucket/runs/valley/export").served_model() == "valley"
    assert cfg(model_name="vlp-7b").served_model() == "vlp-7b"


def test_api_key_from_the_environment(monkeypatch):
    assert cfg(api_key="k").resolve_api_key() == "k"
    c = cfg(api_key_env="VLP_TEST_SERVE_KEY")
    monkeypatch.delenv("VLP_TEST_SERVE_KEY", raising=False)
    with pytest.raises(MissingKey, match="VLP_TEST_SERVE_KEY"):
        c.resolve_api_key()
    monkeypatch.setenv("VLP_TEST_SERVE_KEY", "from-env")
    assert c.resolve_api_key() == "from-env"


def test_serve_run_args_are_a_file_and_dotted_overrides():
    from vlp.serve.app import config_from_args

    c = config_from_args({"config": str(ROOT / "configs/local/serve.yaml"), "port": "9000",
                          "deployment.num_cpus": "0.5", "batch": {"max_batch_size": 2}})
    assert (c.port, c.deployment.num_cpus, c.batch.max_batch_size) == (9000, 0.5, 2)
    assert c.model == "runs/local/train/stage2/export"
    with pytest.raises(ConfigError):
        config_from_args({"config": str(ROOT / "configs/local/serve.yaml"), "prot": "1"})


def in_repo(path: str) -> str:
    """A config path as the cluster image holds it (/home/ray/vlp/..., cluster/Dockerfile's WORKDIR) -> here."""
    return str(ROOT / path.removeprefix("/home/ray/vlp/"))


def test_serve_deploy_file_and_rayservice_build_the_shipped_configs():
    """cluster/serve_local.yaml (serve deploy) and the RayService's serveConfigV2 name vlp's builder with args
    that make a valid config; the RayService's cluster is kuberay-a100.yaml's head and a100-40g group, with
    Serve's port on the head and the API key from a Secret on the workers."""
    from vlp.serve.app import config_from_args

    local = yaml.safe_load((ROOT / "cluster/serve_local.yaml").read_text())
    docs = [d for d in yaml.safe_load_all((ROOT / "cluster/kuberay-rayservice.yaml").read_text()) if d]
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    (rc,) = [d for d in yaml.safe_load_all((ROOT / "cluster/kuberay-a100.yaml").read_text())
             if d and d["kind"] == "RayCluster"]
    v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    built = []
    for conf in (local, v2):
        (app,) = conf["applications"]
        assert app["import_path"] == "vlp.serve.app:build" and app["route_prefix"] == "/"
        built.append(config_from_args({**app["args"], "config": in_repo(app["args"]["config"])}))
    assert local["http_options"]["host"] == "127.0.0.1" and v2["http_options"] == {"host": "0.0.0.0", "port": 8000}
    gpu = built[1]
    assert gpu.deployment.num_gpus == 1 and gpu.deployment.accelerator_type == "A100" and gpu.api_key_env

    spec, ref = svc["spec"]["rayClusterConfig"], rc["spec"]
    assert {k: v for k, v in spec.items() if k not in ("headGroupSpec", "workerGroupSpecs")} == {
        k: v for k, v in ref.items() if k not in ("headGroupSpec", "workerGroupSpecs")}
    head, ref_head = spec["headGroupSpec"], ref["headGroupSpec"]
    assert head["rayStartParams"] == ref_head["rayStartParams"] and head["serviceType"] == "ClusterIP"
    (c,) = head["template"]["spec"]["containers"]
    (ref_c,) = ref_head["template"]["spec"]["containers"]
    assert c["ports"] == ref_c["ports"] + [{"containerPort": 8000, "name": "serve"}]
    groups = {g["groupName"]: g for g in ref["workerGroupSpecs"]}
    (g,) = spec["workerGroupSpecs"]
    (w,) = g["template"]["spec"]["containers"]
    assert w.pop("env") == [{"name": gpu.api_key_env, "valueFrom": {"secretKeyRef": {"name": "vlp-api-key",
                                                                                     "key": "key"}}}]
    assert g == groups["a100-40g"]


def test_shipped_local_config():
    c = load_config(ServeConfig, ROOT / "configs/local/serve.yaml")
    assert c.model == "runs/local/train/stage2/export" and c.host == "127.0.0.1" and c.api_key is None


def test_cli_prints_the_config_and_refuses_a_missing_model_before_ray_starts(capsys, tmp_path, monkeypatch):
    import ray

    from vlp.cli import main

    ray_before = ray.is_initialized()  # another test file's Ray may run in this process
    local = str(ROOT / "configs/local/serve.yaml")
    assert main(["serve", "--config", local, "--print-config", "port=9001"]) == 0
    assert "port: 9001" in capsys.readouterr().out
    assert main(["serve", "--config", local, f"model={tmp_path}/nothing"]) == 2
    assert f"vlp serve: error: model {tmp_path}/nothing does not exist" in capsys.readouterr().err
    monkeypatch.delenv("VLP_TEST_SERVE_KEY", raising=False)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "vlp_model.json").write_text("{}")
    assert main(["serve", "--config", local, f"model={tmp_path}/export", "api_key_env=VLP_TEST_SERVE_KEY"]) == 2
    assert "VLP_TEST_SERVE_KEY" in capsys.readouterr().err
    assert ray.is_initialized() == ray_before
