"""Shared fixtures: an isolated model cache, synthetic shards, a tiny untrained export, and one local Ray for
the session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDIA = ROOT.parent / "shared" / "media" / "llamafactory_mllm_demo"

# Presets are built once per test session into a private cache (set before Ray starts so workers see it).
_CACHE = Path(os.environ.get("VLP_TEST_CACHE", "/tmp/vlp-test-cache"))
os.environ["VLP_CACHE"] = str(_CACHE)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests only ever talk to S3 servers on loopback (moto); these dummy credentials are what they accept.
# Set before Ray starts so that Ray workers inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"


# The longest test files, longest first (measured in `make test`'s --durations on 2 cores). `make test` hands
# files to its xdist workers in collection order (--no-loadscope-reorder), so these start first and the
# short files fill in around them, instead of one long file starting last and running alone at the end.
LONGEST_FIRST = ("train/test_train.py", "synth/test_learning.py", "cluster/test_job_submit.py", "test_s3_train.py",
                 "test_mplug_owl_local.py", "test_readme_local.py", "test_lego_local.py", "test_runlog.py", "cluster/test_autoscale.py",
                 "models/test_toy_connector.py", "precompute/test_pipeline.py", "pack/test_pack.py",
                 "serve/test_serve_app.py", "precompute/test_one_writer.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        rel = Path(str(item.fspath)).resolve().relative_to(ROOT / "tests").as_posix()
        return LONGEST_FIRST.index(rel) if rel in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the other files is kept


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for every test that needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 object_store_memory=1 << 30, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip_path() -> str:
    from vlp.models.presets import resolve_model_path

    return resolve_model_path("preset:tiny-clip")


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """A small synthetic shard set: 2 webvid, 1 cc3m, 1 instruct, 1 heldout shard."""
    from vlp.synth.shards import MakeShardsConfig, make_shards

    out = tmp_path_factory.mktemp("shards")
    make_shards(MakeShardsConfig(out=str(out), videos=12, images=6, instructions=6, heldout=6,
                                 samples_per_shard=6, num_frames=12))
    return out


@pytest.fixture(scope="session")
def export(tmp_path_factory) -> Path:
    """An (untrained) tiny export with the metadata a trained run writes, built in seconds (chat, infer, the
    CLI error matrix). Read-only: tests that need a variant copy it."""
    import torch
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM

    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    out = tmp_path_factory.mktemp("chat") / "export"
    export_model(model, tok, out, extra={
        "template": "vicuna_v1", "feature_mode": "valley_pooled",
        "encoder": {"type": "clip", "path": "preset:tiny-clip", "layer": -2, "hidden_size": 64, "image_size": 224},
        "sampling": {"mode": "uniform", "num_frames": 8, "fps": 1.0, "max_frames": 32},
        "preprocess": {"size": 224, "pad_to_square": False}})
    return out


def dotted(base: dict, **kw) -> dict:
    """Set nested keys named by dotted paths: dotted(d, **{"a.b": 1}) sets d["a"]["b"] = 1."""
    for k, v in kw.items():
        node = base
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """A one-rank gloo process group in this process (what DeepSpeed and the recipe's collectives run on). Torn
    down through DeepSpeed when an engine used it, so DeepSpeed drops the groups it cached: the next test's engine
    (in another file on the same xdist worker too) would otherwise be handed this test's destroyed group."""
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # torch's, and DeepSpeed's cached references to its groups
    else:
        dist.destroy_process_group()


def recipe_on_one_rank(cfg, run_dir: str, total_steps: int):
    """A TrainRecipe of ``cfg`` set up in this process (under the ``one_rank`` fixture's group: the DeepSpeed
    engine built, run logs open), ready for ``train_step``; its template goes to the export. No Ray."""
    from vlp.train.recipe import RunLogs, TrainRecipe

    recipe = TrainRecipe(cfg, {"run_dir": run_dir, "state_path": f"{run_dir}/data_state.json",
                               "total_steps": total_steps, "export_extra": {"template": cfg.data.template}})
    recipe.setup()
    recipe.logs = RunLogs(run_dir, tensorboard=False)
    return recipe


def start_moto(env_extra: dict | None = None):
    port = free_port()
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    return proc, url


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-speaking server (moto in server mode) on loopback. Yields its endpoint URL."""
    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3_server_strict():
    """A moto server that enforces IAM auth: every request with unknown keys is rejected."""
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    yield url
    proc.terminate()
    proc.wait(10)


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
