"""Training end to end on a local Ray with real DeepSpeed engines (gloo, CPU): stage 1 (ZeRO-1) ->
stage 2 (ZeRO-2) -> export -> reload; fault injection and exact resume; re-run reuse; setup errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from conftest import dotted
import torch

from vlp.config import validate
from vlp.train import TrainConfig, TrainSetupError, check_setup, load_model, run_train

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="session")
def demo_features(ray_local, tmp_path_factory) -> Path:
    from vlp.synth.demo import DemoConfig, run_demo

    root = tmp_path_factory.mktemp("traindemo")
    run_demo(validate(DemoConfig, {"root": str(root), "shards": {"videos": 16, "images": 8, "instructions": 16,
                                                                  "heldout": 8, "samples_per_shard": 8},
                                   "train": False, "ray": {"progress_bars": False}}), log=lambda *_: None)
    return root


def _cfg(root: Path, out: Path, **over) -> TrainConfig:
    d = {"run_name": "s1", "output_dir": str(out), "data": {"sets": [{"uri": str(root / "features/pretrain")}],
                                                           "template": "plain", "max_length": 512},
         "batch": {"global_size": 8, "micro_size": 2}, "deepspeed": {"zero_stage": 1},
         "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}, "checkpoint": {"every_n_steps": 2, "keep_last": 2},
         "ray": {"progress_bars": False}}
    dotted(d, **over)
    return validate(TrainConfig, d)


def _steps(run_dir: Path) -> dict[int, list[str]]:
    """step -> uids trained on in it (the last record wins: a step redone after a failure replaces the first)."""
    out = {}
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["uids"]
    return out


def _mid_epoch_states(run_dir: Path) -> list[dict]:
    """vlp_state.json of the run's kept checkpoints taken inside an epoch (not the final one), by step."""
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/vlp_state.json")]
    return sorted((s for s in states if not s["final"]), key=lambda s: s["step"])


def test_held_sets_give_the_streaming_graphs_epoch(demo_features, tmp_path):
    """The held path (sets tokenised once, each epoch planned on the workers) trains on exactly the rows the
    streaming graph gives (Mixture with a fractional weight, DropSeen after a resume, Tokenize), split over
    the ranks without overlap."""
    from vlp.train.data import write_state
    from vlp.train.held import HeldRows
    from vlp.train.trainer import build_dataset, build_held, should_materialize

    sets = [{"uri": str(demo_features / "features/pretrain")},
            {"uri": str(demo_features / "features/instruct"), "weight": 1.5}]
    cfg = _cfg(demo_features, tmp_path, **{"data.sets": sets})
    held = HeldRows(build_held(cfg))
    state, epoch, seen = str(tmp_path / "state.json"), 3, set(held.plan_sets[0][1][:3])  # resumed: 3 rows seen
    write_state(state, epoch, sorted(seen))
    stream = sorted((str(r["uid"]), list(r["input_ids"])) for r in build_dataset(cfg, state).take_all())
    shares = [held.plan(cfg.data.seed, epoch, seen, rank, 2) for rank in range(2)]
    assert abs(len(shares[0]) - len(shares[1])) <= 1 and not {e[2] for e in shares[0]} & {e[2] for e in shares[1]}
    rows = sorted((str(r["uid"]), list(r["input_ids"])) for share in shares for r in held.rows(share))
    assert rows == stream and 24 + 16 - 3 < len(rows) < 24 + 32, len(rows)  # 1.5: a seeded subset again
    assert not seen & {u for u, _ in rows}
    auto = _cfg(demo_features, tmp_path, **{"data.materialize_max_mb": 1e-3})  # a few KB: the set is bigger
    assert not should_materialize(auto) and should_materialize(_cfg(demo_features, tmp_path))


def test_stage1_zero1_then_stage2_zero2_export_and_reload(demo_features, tmp_path):
    out = tmp_path / "runs"
    s1 = run_train(_cfg(demo_features, out, epochs=2), log=print)
    run1 = Path(s1["run_dir"])
    assert s1["steps"] == 6 and not s1["reused"]  # 24 samples / 8 x 2 epochs
    metrics = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    for k in ("loss", "lr", "tokens_per_s", "samples_per_s", "data_wait_frac", "padding_frac", "peak_mem_bytes",
              "compute_samples_per_s", "step_wall_s"):
        assert all(m[k] is not None for m in metrics), k
    for m in metrics:  # end to end (wall per step incl. data wait) is never faster than compute alone
        assert m["step_wall_s"] >= m["compute_s"] and m["samples_per_s"] <= m["compute_samples_per_s"]
        assert m["samples_per_s"] == pytest.approx(8 / m["step_wall_s"])
    assert list((run1 / "tensorboard").iterdir())
    ckpts = sorted(p for p in run1.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert len(ckpts) == 2  # keep_last
    assert (ckpts[-1] / "vlp_state.json").exists() and (ckpts[-1] / "state").is_dir()
    exp = run1 / "export"
    assert (exp / "connector.safetensors").exists() and (exp / "llm" / "config.json").exists()
    assert (exp / "tokenizer").is_dir() and json.loads((exp / "vlp_model.json").read_text())["template"] == "plain"
    assert (run1 / "config.yaml").exists()
    # the LLM was frozen in stage 1: exported LLM weights equal the preset's
    from safetensors.torch import load_file

    from vlp.models.presets import resolve_model_path

    base = load_file(str(Path(resolve_model_path("preset:tiny-llama")) / "model.safetensors"))
    after = load_file(str(exp / "llm" / "model.safetensors"))
    assert all(torch.equal(base[k], after[k]) for k in base)

    # stage 2: from stage 1's connector, LLM trained, ZeRO-2, conversations
    c2 = _cfg(demo_features, out, run_name="s2", **{
        "data.sets": [{"uri": str(demo_features / "features/instruct")}], "data.template": "vicuna_v1",
        "deepspeed.zero_stage": 2, "model.llm.trainable": True, "model.llm.gradient_checkpointing": True,
        "model.connector.init_from": str(exp), "optim.lr": 1e-3})
    s2 = run_train(c2, log=print)
    assert s2["steps"] == 2
    exp2 = Path(s2["export"])
    after2 = load_file(str(exp2 / "llm" / "model.safetensors"))
    assert any(not torch.equal(base[k], after2[k]) for k in base)  # the LLM moved

    model, tok, info = load_model(exp2)
    assert info.template == "vicuna_v1" and info.feature_mode == "valley_pooled"
    from safetensors.torch import load_file as lf

    conn = lf(str(exp2 / "connector.safetensors"))
    assert all(torch.equal(v, model.connector.state_dict()[k]) for k, v in conn.items())
    from vlp.data.conversation import prompt_ids

    ids = torch.tensor(prompt_ids([{"from": "human", "value": "<video>\nWhat color is the shape?"}], tok, "vicuna_v1"))
    toks = list(model.generate(ids, torch.randn(264, 64), "valley_pooled", 8, max_new_tokens=5,
                               eos_token_id=tok.eos_token_id))
    assert len(toks) <= 5

    # the same command again: the finished run is reused, not retrained
    again = run_train(_cfg(demo_features, out, epochs=2), log=print)
    assert again["reused"] and again["steps"] == 6


def test_worker_failure_resumes_with_the_same_steps_and_samples(demo_features, tmp_path):
    """Rank 1 dies at step 5 (streaming data path); Ray Train restarts the group from the step-4 checkpoint and the
    run ends with exactly the steps and samples of an uninterrupted one: steps 1-6, each of the epoch's 24 samples
    once (an uninterrupted run of this config trains every sample of the epoch once in 6 steps)."""
    common = {"batch.global_size": 4, "batch.micro_size": 1, "checkpoint.every_n_steps": 2, "epochs": 1}
    store = f"file://{tmp_path}/mlruns"  # a real MLflow local store: metrics every 2 steps, one run across attempts
    bad = run_train(_cfg(demo_features, tmp_path / "b", run_name="fault", **common,  # the streaming path here
                         **{"debug.fail_at_step": 5, "debug.fail_rank": 1, "data.materialize": "never",
                            "tracking": {"report_every": 2, "mlflow": {"tracking_uri": store}}}), log=print)
    assert (Path(bad["run_dir"]) / ".injected_failure").exists()
    assert bad["steps"] == 6
    b = _steps(Path(bad["run_dir"]))
    assert sorted(b) == list(range(1, 7))
    seen_b = Counter(u for uids in b.values() for u in uids)
    assert set(seen_b.values()) == {1} and len(seen_b) == 24
    # the failed run really redid step 5 after restoring step 4 (samples.jsonl holds step 5 twice)
    lines = [json.loads(x)["step"] for x in (Path(bad["run_dir"]) / "samples.jsonl").read_text().splitlines()]
    assert lines.count(5) == 2 and lines.count(4) == 1
    # the step-6 checkpoint: the epoch's 24 rows, all trained, as done part passes (no uids)
    st = _mid_epoch_states(Path(bad["run_dir"]))[-1]
    print("step-6 vlp_state.json:", len(json.dumps(st)), "bytes:", st)
    assert st["step"] == 6 and st["mode"] == "stream" and st["epoch_steps"] == 6 and "seen" not in st
    assert st["parts"]["open"] == {} and st["parts"]["done"] and st["counters"]["skipped"] == {}
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the file store needs MLflow 3's switch too
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("vlp").experiment_id])
    assert run.info.run_name == "fault" and run.data.params["checkpoint.every_n_steps"] == "2"
    assert [h.step for h in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]


def test_bad_setups_fail_before_any_worker_starts(demo_features, tmp_path):
    cfg = _cfg(demo_features, tmp_path, **{
        "data.sets": [{"uri": str(demo_features / "features/pretrain")}, {"uri": str(tmp_path / "nope")}],
        "model.vision_hidden_size": 1024, "model.connector.init_from": str(tmp_path / "missing")})
    with pytest.raises(TrainSetupError) as ei:
        check_setup(cfg, log=lambda *_: None)
    msg = str(ei.value)
    assert "data.sets[1].uri" in msg and "no manifest.json" in msg
    assert "model.vision_hidden_size=1024 does not match the feature set's hidden size 64" in msg
    assert "model.connector.init_from" in msg
    too_big = _cfg(demo_features, tmp_path, **{"batch.global_size": 64, "batch.micro_size": 32})
    with pytest.raises(TrainSetupError, match="larger than an epoch"):
        check_setup(too_big, log=lambda *_: None)
    no_mem = _cfg(demo_features, tmp_path, **{"scaling.device_memory_gb": 0.0001})
    with pytest.raises(TrainSetupError, match="memory preflight: does not fit"):
        check_setup(no_mem, log=lambda *_: None)
    assert not (tmp_path / "s1").exists()


def test_rerunning_the_same_command_resumes_an_unfinished_run(demo_features, tmp_path):
    common = {"batch.global_size": 4, "batch.micro_size": 1, "checkpoint.every_n_steps": 2, "epochs": 1,
              "scaling.num_workers": 1}  # one worker: the resume is the point here (two ranks: the test above)
    dying = _cfg(demo_features, tmp_path, run_name="again", max_failures=0, **common,
                 **{"debug.fail_at_step": 3, "debug.fail_rank": 0})
    with pytest.raises(Exception, match="injected failure at step 3"):
        run_train(dying, log=print)
    run_dir = tmp_path / "again"
    assert not (run_dir / "export").exists()
    done = run_train(_cfg(demo_features, tmp_path, run_name="again", **common), log=print)
    assert done["steps"] == 6 and not done["reused"]
    steps = [json.loads(x)["step"] for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6]  # resumed from the step-2 checkpoint, step 3 redone
    redone = [json.loads(x)["uids"] for x in (run_dir / "samples.jsonl").read_text().splitlines()
              if json.loads(x)["step"] == 3]
    assert redone[0] == redone[1]  # the held path replays the epoch: step 3 again is the same step
    st = _mid_epoch_states(run_dir)[-1]  # the held path: the steps done in the epoch say which rows
    assert (st["step"], st["mode"], st["epoch_steps"], st["world"]) == (6, "held", 6, 1) and "seen" not in st
    seen = Counter(u for uids in _steps(run_dir).values() for u in uids)
    assert len(seen) == 24 and set(seen.values()) == {1}


def _probe_matches_export(summary: dict) -> "torch.Tensor":
    """Reload the export and run the loop's probe: the logits must equal the trained engine's."""
    from vlp.formats.export import probe_logits

    probe = summary["probe"]
    assert probe is not None and len(probe["logits"]) > 0
    model, _, _ = load_model(summary["export"])
    after = probe_logits(model, probe)
    assert torch.isfinite(after).all()
    assert torch.allclose(after, torch.tensor(probe["logits"]), atol=1e-4), (after[:5], probe["logits"][:5])
    return model


def test_lora_stage2_under_zero2_trains_checkpoints_and_exports_merged(demo_features, tmp_path):
    from safetensors.torch import load_file

    from vlp.models.presets import resolve_model_path

    cfg = _cfg(demo_features, tmp_path, run_name="lora", max_steps=2, **{
        "data.sets": [{"uri": str(demo_features / "features/instruct")}], "data.template": "vicuna_v1",
        "deepspeed.zero_stage": 2, "lora.enabled": True, "lora.r": 4, "lora.target_modules": ["q_proj", "v_proj"],
        "optim.lr": 5e-2, "checkpoint.every_n_steps": 1})
    s = run_train(cfg, log=print)
    assert s["steps"] == 2
    run = Path(s["run_dir"])
    ckpts = sorted(p for p in run.iterdir() if p.name.startswith("checkpoint_") and p.is_dir())
    assert ckpts and all((c / "state").is_dir() for c in ckpts)
    exp = Path(s["export"])
    after = load_file(str(exp / "llm" / "model.safetensors"))
    assert not any("lora" in k for k in after)  # merged into plain HF weights
    base = load_file(str(Path(resolve_model_path("preset:tiny-llama")) / "model.safetensors"))
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved and all(("q_proj" in k or "v_proj" in k) for k in moved), moved  # only adapted layers changed
    _probe_matches_export(s)


def test_zero3_trains_resumes_from_a_checkpoint_and_exports_full_weights(demo_features, tmp_path):
    from safetensors.torch import load_file

    cfg = _cfg(demo_features, tmp_path, run_name="z3", max_steps=3, **{"batch.global_size": 4, "batch.micro_size": 1,
        "data.sets": [{"uri": str(demo_features / "features/instruct")}], "data.template": "vicuna_v1",
        "deepspeed.zero_stage": 3, "model.llm.trainable": True, "optim.lr": 1e-2,
        "checkpoint.every_n_steps": 1, "debug.fail_at_step": 2, "debug.fail_rank": 1})
    s = run_train(cfg, log=print)
    run = Path(s["run_dir"])
    assert s["steps"] == 3 and (run / ".injected_failure").exists()
    lines = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 2, 3]  # resumed from the partitioned step-1 checkpoint
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(l == l and l < 100 for l in losses)
    exp = Path(s["export"])
    weights = load_file(str(exp / "llm" / "model.safetensors"))
    from vlp.models.presets import resolve_model_path

    base = load_file(str(Path(resolve_model_path("preset:tiny-llama")) / "model.safetensors"))
    assert set(weights) == set(base) and all(weights[k].shape == base[k].shape for k in base)  # gathered, not shards
    assert any(not torch.equal(base[k], weights[k]) for k in base)
    model = _probe_matches_export(s)
    from vlp.formats.export import probe_logits

    assert torch.isfinite(probe_logits(model, s["probe"])).all()



def test_zero2_with_the_optimizer_offloaded_trains_through_vlp_train_on_cpu(demo_features, tmp_path):
    """deepspeed.offload_optimizer cpu under ZeRO-2 on 2 CPU workers (DeepSpeed's CPU accelerator): DeepSpeedCPUAdam
    steps each rank's host-memory partition; the run checkpoints, exports and the export reproduces the probe.
    The preflight's numbers land in the run folder with the optimizer counted on the host."""
    logs = []
    cfg = _cfg(demo_features, tmp_path, run_name="offload", max_steps=2, **{
        "data.sets": [{"uri": str(demo_features / "features/instruct")}], "data.template": "vicuna_v1",
        "deepspeed.zero_stage": 2, "deepspeed.offload_optimizer.device": "cpu", "model.llm.trainable": True,
        "optim.lr": 1e-2, "checkpoint.every_n_steps": 1})
    s = run_train(cfg, log=logs.append)
    assert s["steps"] == 2
    run = Path(s["run_dir"])
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(l == l and l < 100 for l in losses)
    pre = json.loads((run / "preflight.json").read_text())
    assert pre["fits"] and pre["plan"]["offload_optimizer"] and pre["per_gpu_gib"]["optimizer"] == 0
    assert pre["host_gib_per_rank"] > 0 and pre["per_gpu_gib"]["activations"] > 0
    assert any("memory preflight: fits: ZeRO-2 x2 fp32" in str(x) and "offload: optimizer" in str(x) for x in logs)
    from vlp.models.presets import resolve_model_path
    from safetensors.torch import load_file

    base = load_file(str(Path(resolve_model_path("preset:tiny-llama")) / "model.safetensors"))
    after = load_file(str(Path(s["export"]) / "llm" / "model.safetensors"))
    assert any(not torch.equal(base[k], after[k]) for k in base)  # the offloaded optimizer moved the LLM
    _probe_matches_export(s)
