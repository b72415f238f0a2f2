"""Training pieces without Ray: memory preflight, mixtures, tokenisation/truncation, length grouping, config."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from conftest import dotted
from vlp.config import ConfigError, validate
from vlp.data.conversation import IGNORE_INDEX, VISUAL_TOKEN_INDEX
from vlp.train.config import TrainConfig
from vlp.train.data import Mixture, Tokenize, base_uid, length_grouped, mixture_passes, padding_fraction, write_state
from vlp.train.memory import (LMShape, Plan, Workload, activation_bytes, bucket_bytes, default_bucket_elems, estimate,
                              head_bytes_per_token, layer_bytes_per_token, model_state_bytes, preflight, resolve_precision,
                              state_parts)


def test_zero_formulas_match_the_paper_in_mixed_precision():
    P, N = 7_000_000_000, 8
    assert model_state_bytes(P, 0, N, 0) == 16 * P  # bf16 is the default precision
    assert model_state_bytes(P, 0, N, 1, "fp16") == pytest.approx((4 + 12 / N) * P)
    assert model_state_bytes(P, 0, N, 2, "bf16") == pytest.approx((2 + 14 / N) * P)
    assert model_state_bytes(P, 0, N, 3, "bf16") == pytest.approx(20 / N * P)  # + DeepSpeed's fp32 grad buffer
    assert model_state_bytes(0, P, N, 1) == 2 * P  # frozen weights only
    assert model_state_bytes(0, P, N, 3) == 2 * P / N  # ... sharded under ZeRO-3
    with pytest.raises(ValueError, match="does not exist"):
        model_state_bytes(P, 0, N, 4)
    with pytest.raises(ValueError, match="not one of"):
        model_state_bytes(P, 0, N, 1, "fp8")


# Bytes per rank measured by bench/bench_train.py (bench/results/train.json, memory part, 2026-11-22 run):
# tiny VideoLLM, 154,368 trainable params, 2 ranks, every live tensor storage after the 2nd backward.
P_BENCH, N_BENCH = 154_368, 2
MEASURED = {  # (precision, stage): (weights, optimizer state incl. master copies, gradients) of the larger rank
    ("fp32", 0): (617472, 1235036, 617472), ("fp32", 2): (617472, 926216, 317184),
    ("bf16", 0): (308736, 1852508, 308736), ("bf16", 2): (308736, 926216, 158592),
}


@pytest.mark.parametrize("prec,stage", sorted(MEASURED))
def test_zero_formulas_match_what_deepspeed_allocated(prec, stage):
    measured = sum(MEASURED[prec, stage])
    formula = model_state_bytes(P_BENCH, 0, N_BENCH, stage, prec)
    assert formula == pytest.approx(measured, rel=0.01)  # partition padding + Adam's step counters
    assert formula <= measured


def test_fp32_counts_deepspeeds_master_copy_and_zero1_full_gradients():
    # fp32 ZeRO-2: 4 B weights + (4 B grads + 4 B fp32 partition copy + 8 B Adam) / N: 12 B/param at N=2
    assert model_state_bytes(P_BENCH, 0, 2, 2, "fp32") == 12 * P_BENCH
    # the old mixed-precision count undercounted it by a third (what the benchmark found)
    assert model_state_bytes(P_BENCH, 0, 2, 2, "fp32") / model_state_bytes(P_BENCH, 0, 2, 2, "bf16") == \
        pytest.approx(12 / 9)
    # ZeRO-1 holds full gradients during the backward pass (reduced into the partition only after it):
    # measured weights + optimizer partition, plus a whole gradient
    w, opt, _ = MEASURED["fp32", 2]  # ZeRO-1's weights and optimizer partition measured identical to ZeRO-2's
    assert model_state_bytes(P_BENCH, 0, 2, 1, "fp32") == pytest.approx(w + opt + 4 * P_BENCH, rel=0.01)
    assert model_state_bytes(0, 1000, 2, 2, "fp32") == 4000 and model_state_bytes(0, 1000, 2, 3, "fp32") == 2000
    assert model_state_bytes(1000, 0, 4, 3, "fp32") == 5000


def test_precision_and_bucket_resolution():
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=None) == "fp32"  # unknown: the larger count
    assert resolve_precision("fp16", on_gpu=False) == "fp16"
    assert default_bucket_elems(154_368) == 500_224  # floor 5e5, rounded up to a multiple of 512
    assert default_bucket_elems(7_000_000_000) == 500_000_256  # the cap 5e8, rounded up to a multiple of 512
    assert default_bucket_elems(20_000_001) % 512 == 0 and default_bucket_elems(20_000_001) >= 20_000_001
    assert bucket_bytes(0, "fp32", 10**6) == 0 and bucket_bytes(2, "fp32", 10**6) == 4e6


def test_preflight_without_the_lm_shape_counts_model_states_and_keeps_a_35_percent_margin():
    seven = Workload(7_000_000_000, 0)  # bf16, activations unknown
    # 7B fully trained on 8 x 80 GB, bf16: ZeRO-1 needs 4 + 1.5 = 5.5 B/param = 35.9 GiB (+ 0.9 GiB bucket) -> fits
    assert preflight(seven, Plan(1, 8), 80).fits
    # ... on 40 GB cards it does not (26 GiB usable); ZeRO-2 (3.75 B/param = 24.4 GiB) does: the cheapest fix
    pf = preflight(seven, Plan(1, 8), 40)
    assert not pf.fits and "ZeRO-1 x8 bf16" in pf.message and "would fit: deepspeed.zero_stage=2 (25.4 GiB" in pf.message
    assert pf.fix == Plan(2, 8) and pf.to_json()["recommended"]["stage"] == 2
    pf = preflight(seven, Plan(0, 1), 40)  # one 40 GB GPU: only ZeRO-3 with everything offloaded
    assert pf.fix == Plan(3, 1, offload_optimizer=True, offload_param=True)
    assert "deepspeed.zero_stage=3 deepspeed.offload_optimizer.device=cpu deepspeed.offload_param.device=cpu" in \
        pf.message and "117.3 GiB host memory per rank" in pf.message  # 2 + 16 B/param on the host
    assert "nothing up to 256 workers fits" in preflight(Workload(70_000_000_000_000, 0), Plan(1, 8), 40).message
    # the same 7B ZeRO-2 x8 in fp32 needs 4 + 2 = 6 B/param = 39.1 GiB + a 1.9 GiB bucket: over a 40 GB card's usable 26 GiB
    assert preflight(seven, Plan(2, 8), 40).fits
    pf = preflight(Workload(7_000_000_000, 0, "fp32"), Plan(2, 8), 40)
    assert not pf.fits and "ZeRO-2 x8 fp32, micro-batch 1, gradient checkpointing off, offload: none: 41.0 GiB" in pf.message
    # the reduction bucket counts: 1e9 elements x 4 B do not fit 2 GiB x 0.65 next to a tiny model
    assert preflight(Workload(1000, 0, "fp32", bucket_elems=500_224), Plan(2, 2), 2).fits
    assert not preflight(Workload(1000, 0, "fp32", bucket_elems=10**9), Plan(2, 2), 2).fits


def test_offload_moves_the_optimizer_and_weight_columns_to_the_host():
    P, N = 7_000_000_000, 8
    gpu, host = state_parts(P, 0, N, 2, "bf16")
    assert gpu == {"weights": 2 * P, "gradients": 2 * P / N, "optimizer": 12 * P / N} and host == 0
    assert sum(gpu.values()) == model_state_bytes(P, 0, N, 2)
    gpu, host = state_parts(P, 0, N, 2, "bf16", offload_optimizer=True)  # + the pinned fp32 gradient partition
    assert gpu == {"weights": 2 * P, "gradients": 2 * P / N, "optimizer": 0.0} and host == (12 + 4) * P / N
    gpu, host = state_parts(P, 1000, N, 3, "bf16", offload_optimizer=True, offload_param=True)
    assert gpu == {"weights": 0.0, "gradients": 2 * P / N, "optimizer": 0.0}
    assert host == pytest.approx((2 + 16) * P / N + 2 * 1000 / N)  # weights (frozen too), master, m, v, fp32 grads
    gpu, host = state_parts(P, 0, N, 3, "fp32", offload_optimizer=True)  # fp32 ZeRO-3: the master is the weights
    assert gpu == {"weights": 4 * P / N, "gradients": 4 * P / N, "optimizer": 0.0} and host == 12 * P / N


TINY = LMShape(hidden=64, layers=2, intermediate=128, heads=2, vocab=100)


def test_activation_estimate_on_known_numbers():
    # trained, fp32, sdpa: (10 h + 4 f) e + 4 heads = (640 + 512) x 4 + 8 = 4616 B per token and layer
    assert layer_bytes_per_token(TINY, 10, "fp32", trained=True) == 4616
    # the head: final norm 3 h e + its gradient h e, logits e + log-softmax 4 + its two fp32 gradients 8 per
    # vocabulary entry
    assert head_bytes_per_token(TINY, "fp32", trained=True) == 4 * 64 * 4 + 100 * 16 == 2624
    # the peak: every layer + the head (larger than a layer's backward, 3 f e = 1536)
    assert activation_bytes(TINY, 2, 10, "fp32") == 2 * 10 * (2 * 4616 + 2624)
    # checkpointing: each layer's input (h e) + one layer recomputed with its backward (larger than the head here)
    assert activation_bytes(TINY, 2, 10, "fp32", checkpointing=True) == 2 * 10 * (2 * 64 * 4 + 4616 + 3 * 128 * 4)
    # eager attention at long sequences: a layer's backward (the softmax's gradients, 8 heads seq_len) beats the head
    assert activation_bytes(TINY, 1, 1000, "fp32", attn="eager") == 1000 * (2 * (4608 + 2 * 1000 * 4) + 2 * 1000 * 8)
    # eager attention keeps the fp32 softmax: heads x seq_len x 4 per token; in bf16 its bf16 copy too
    assert layer_bytes_per_token(TINY, 10, "fp32", True, "eager") == 4608 + 2 * 10 * 4
    assert layer_bytes_per_token(TINY, 10, "bf16", True, "eager") == (1152 + 128) * 2 + 2 * 10 * 6
    # frozen LM in bf16: (6 h + 3 f + 2 h fp32 norm inputs) e
    assert layer_bytes_per_token(TINY, 10, "bf16", trained=False) == (384 + 384 + 128) * 2 + 8
    # LLaMA-7B, bf16, a 2048-token sample: 12.3 GiB without checkpointing, 1.4 GiB with (its 32000-entry head)
    llama7b = LMShape(4096, 32, 11008, 32, 32000)
    assert activation_bytes(llama7b, 1, 2048) / 2**30 == pytest.approx(12.32, abs=0.01)
    assert activation_bytes(llama7b, 1, 2048, checkpointing=True) / 2**30 == pytest.approx(1.43, abs=0.01)
    with pytest.raises(ValueError, match="not one of sdpa"):
        layer_bytes_per_token(TINY, 10, "fp32", True, "flash")
    from transformers import GPT2Config, LlamaConfig

    assert LMShape.of(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  vocab_size=100)) == TINY
    assert LMShape.of(GPT2Config()) is None  # named otherwise (n_embd, n_inner): activations not counted


LLAMA7B = LMShape(4096, 32, 11008, 32, 32000)


def test_preflight_recommends_checkpointing_when_only_it_makes_the_run_fit():
    # 7B trained under ZeRO-2 on 8 x 40 GB: 25.4 GiB of states + 12.3 GiB of activations for one 2048-token
    # sample; micro-batch 1 cannot shrink, checkpointing (1.4 GiB) makes it fit without ZeRO-3 or offload
    work = Workload(7_000_000_000, 0, "bf16", LLAMA7B, 2048, global_size=16)
    pf = preflight(work, Plan(2, 8, micro=1), 40)
    assert not pf.fits and pf.fix == Plan(2, 8, 1, checkpointing=True)
    assert "would fit: model.llm.gradient_checkpointing=true (26.8 GiB per GPU)" in pf.message
    assert "activations 12.3 GiB" in pf.message and pf.to_json()["per_gpu_gib"]["activations"] == pytest.approx(12.3, abs=0.05)
    # when checkpointing does not apply (a frozen LM, here with the same counts), ZeRO-3 is next
    assert preflight(replace(work, can_checkpoint=False), Plan(2, 8, micro=1), 40).fix == Plan(3, 8, 1)
    # a smaller micro-batch comes before checkpointing, keeping the global batch (16 = 1 x 2 x 8) ...
    pf = preflight(work, Plan(2, 8, micro=2), 48)
    assert pf.fix == Plan(2, 8, 1) and "would fit: batch.micro_size=1 (37.7 GiB" in pf.message
    # ... but checkpointing at the run's micro-batch comes before ZeRO-3
    assert preflight(work, Plan(2, 8, micro=2), 40).fix == Plan(2, 8, 2, checkpointing=True)
    fits = preflight(work, Plan(2, 8, micro=2, checkpointing=True), 80)
    assert fits.fits and fits.max_micro == 32 and "the largest micro-batch that fits: 32" in fits.message
    assert "fits without gradient checkpointing too" in fits.message  # 25.4 + 2 x 12.3 < 72


def test_preflight_recommends_offload_when_only_it_makes_the_run_fit():
    # 7B on 8 x 16 GB (14.4 GiB usable), checkpointed micro-batch 1: ZeRO-3 alone needs 20.0 GiB; with the optimizer
    # on the host 6.9 GiB (13.0 GiB of host memory per rank)
    work = Workload(7_000_000_000, 0, "bf16", LLAMA7B, 2048, global_size=8)
    pf = preflight(work, Plan(2, 8, micro=1, checkpointing=True), 16)
    assert not pf.fits and pf.fix == Plan(3, 8, 1, True, offload_optimizer=True)
    assert "would fit: deepspeed.zero_stage=3 deepspeed.offload_optimizer.device=cpu (6.9 GiB per GPU, " \
        "13.0 GiB host memory per rank)" in pf.message
    est = estimate(work, pf.fix)
    assert est.optimizer == 0 and est.host == pytest.approx(16 * 7e9 / 8 / 2**30)
    assert est.gathered == pytest.approx((default_bucket_elems(7e9) + LLAMA7B.layer_params()) * 2 / 2**30)


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


def test_offload_is_validated_against_the_zero_stage_and_the_device():
    with pytest.raises(ConfigError) as ei:
        _cfg(**{"deepspeed.zero_stage": 2, "deepspeed.offload_param.device": "cpu",
                "deepspeed.offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}})
    got = dict(ei.value.problems)  # both problems, on one line of the section
    assert "offload_param.device=cpu needs zero_stage=3" in got["deepspeed"]
    assert "offload_optimizer.device=nvme needs zero_stage=3" in got["deepspeed"]
    with pytest.raises(ConfigError) as ei:
        _cfg(**{"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer.device": "nvme", "optim.lr": -1})
    got = dict(ei.value.problems)  # every problem by dotted path
    assert got["deepspeed.offload_optimizer"].startswith("Value error, device=nvme needs nvme_path") and "optim.lr" in got
    with pytest.raises(ConfigError, match="offload_optimizer.device=cpu needs zero_stage 1, 2 or 3"):
        _cfg(**{"deepspeed.zero_stage": 0, "deepspeed.offload_optimizer.device": "cpu"})
    with pytest.raises(ConfigError, match=r"deepspeed.offload_param: Value error, nvme_path is only used with device=nvme"):
        _cfg(**{"deepspeed.zero_stage": 3, "deepspeed.offload_param.nvme_path": "/nvme"})
    nvme = {"deepspeed.zero_stage": 3, "deepspeed.offload_param": {"device": "nvme", "nvme_path": "/nvme"}}
    with pytest.raises(ConfigError, match="deepspeed.offload_param.device=nvme needs scaling.use_gpu=true"):
        _cfg(**nvme)  # a CPU run: its states already are in host memory
    assert _cfg(**nvme, **{"scaling.use_gpu": True}).deepspeed.offloads() == (False, True)


def test_deepspeed_config_carries_the_offload_sections_only_when_set():
    from vlp.train.recipe import deepspeed_config

    plain = deepspeed_config(_cfg(**{"deepspeed.zero_stage": 3}), "bf16", 1000)["zero_optimization"]
    assert "offload_optimizer" not in plain and "offload_param" not in plain
    cfg = _cfg(**{"deepspeed.zero_stage": 3, "scaling.use_gpu": True,
                  "deepspeed.offload_optimizer": {"device": "cpu", "pin_memory": False},
                  "deepspeed.offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}})
    zero = deepspeed_config(cfg, "bf16", 1000)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme"}
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    parsed = DeepSpeedZeroConfig(**zero)  # DeepSpeed's own model of the section reads it as meant
    assert parsed.offload_param.device == "nvme" and str(parsed.offload_param.nvme_path) == "/local_nvme"
    assert parsed.offload_optimizer.device == "cpu" and parsed.offload_optimizer.pin_memory is False


def test_learning_rates_by_part_must_name_a_trained_part_and_be_positive():
    with pytest.raises(ConfigError) as ei:
        _cfg(**{"optim.lr_by_part": {"llm": 1e-5, "connector": 0.0}})
    text = str(ei.value)
    assert "optim.lr_by_part" in text and "connector: 0.0" in text
    with pytest.raises(ConfigError, match="optim.lr_by_part names llm, which this run does not train"):
        _cfg(**{"optim.lr_by_part": {"llm": 1e-5}})
    with pytest.raises(ConfigError, match="optim.lr_by_part names tower, which this run does not train"):
        _cfg(**{"optim.lr_by_part": {"tower": 1e-5}})  # no model.tower
    with pytest.raises(ConfigError, match="optim.lr_by_part names tower"):
        _cfg(**{"optim.lr_by_part": {"tower": 1e-5}, "model.tower": {"trainable": False}})
    with pytest.raises(ConfigError, match="optim.lr_by_part"):
        _cfg(**{"optim.lr_by_part": {"vision": 1e-5}})
    ok = _cfg(**{"optim.lr_by_part": {"llm": 1e-5}, "lora.enabled": True})
    assert ok.optim.lr_by_part == {"llm": 1e-5}
    assert _cfg(**{"optim.lr_by_part": {"tower": 1e-5}, "model.tower": {}}).optim.lr_by_part == {"tower": 1e-5}


def test_param_counts_count_the_model_tower(tiny_clip_path):
    from transformers import CLIPVisionModel

    from vlp.models.presets import resolve_model_path
    from vlp.train.trainer import param_counts

    clip = CLIPVisionModel.from_pretrained(resolve_model_path("preset:tiny-clip"))
    n_tower = sum(p.numel() for p in clip.parameters())
    # layer -1: every layer feeds the features but the final norm (never in a hidden state) does not train
    n_late = sum(p.numel() for n, p in clip.named_parameters() if n.startswith("post_layernorm."))
    n_layer1 = sum(p.numel() for n, p in clip.named_parameters() if n.startswith("encoder.layers.1."))
    base = _cfg(**{"model.vision_hidden_size": 64})
    trained = _cfg(**{"model.vision_hidden_size": 64, "model.tower": {"trainable": True, "layer": -1}})
    penultimate = _cfg(**{"model.vision_hidden_size": 64, "model.tower": {"trainable": True}})
    frozen = _cfg(**{"model.vision_hidden_size": 64, "model.tower": {"trainable": False}})
    t0, f0 = param_counts(base)
    assert param_counts(trained) == (t0 + n_tower - n_late, f0 + n_late)
    assert param_counts(penultimate) == (t0 + n_tower - n_late - n_layer1, f0 + n_late + n_layer1)
    assert param_counts(frozen) == (t0, f0 + n_tower)


def _finished_run(tmp_path, cfg, finished=True):
    """A run folder as run_train leaves it: config.yaml, plus the markers of a finished run (or a checkpoint)."""
    from vlp.config import dump_config

    run = tmp_path / cfg.run_name
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    if finished:
        (run / "export").mkdir()
        (run / "export" / "vlp_model.json").write_text("{}")
        (run / "train_summary.json").write_text(json.dumps({"steps": 3}))
    else:
        (run / "checkpoint_000000").mkdir()
    return run


def test_rerun_with_a_changed_config_is_refused_with_every_difference(tmp_path):
    from vlp.train import run_train

    first = _cfg(output_dir=str(tmp_path), **{"model.vision_hidden_size": 64})  # as check_setup resolved it
    _finished_run(tmp_path, first)
    logs = []
    # the same config, up to what may change between attempts (and vision_hidden_size left to the data): reused
    same = _cfg(output_dir=str(tmp_path), max_failures=0, log_every=5, tensorboard=False,
                **{"ray.num_cpus": 1, "debug.fail_at_step": 2, "checkpoint.every_n_steps": 7,
                   "scaling.cpus_per_worker": 0.5, "data.sets": [{"uri": "x", "storage": {"region": "eu-west-1"}}]})
    res = run_train(same, log=logs.append)
    assert res["reused"] and res["steps"] == 3 and "reusing" in logs[0]
    changed = _cfg(output_dir=str(tmp_path), epochs=3, **{
        "optim.lr": 1e-4, "optim.betas": [0.9, 0.95], "model.llm.path": "preset:other", "data.sets": [{"uri": "y"}],
        "model.vision_hidden_size": 32, "scaling.num_workers": 1, "batch.global_size": 64, "batch.micro_size": 16})
    with pytest.raises(ConfigError) as ei:
        run_train(changed, log=logs.append)
    got = {p: m for p, m in ei.value.problems}
    assert got == {"epochs": "1 -> 3", "optim.lr": "0.002 -> 0.0001", "optim.betas[1]": "0.999 -> 0.95",
                   "model.llm.path": "'preset:tiny-llama' -> 'preset:other'", "data.sets[0].uri": "'x' -> 'y'",
                   "model.vision_hidden_size": "64 -> 32", "scaling.num_workers": "2 -> 1",
                   "batch.global_size": "128 -> 64"}
    msg = str(ei.value)
    assert "use a new run_name or delete the run folder" in msg and "epochs: 1 -> 3" in msg
    # a differing number of feature sets is one difference of the whole list
    two = _cfg(output_dir=str(tmp_path), **{"data.sets": [{"uri": "x"}, {"uri": "z"}]})
    with pytest.raises(ConfigError) as ei:
        run_train(two, log=logs.append)
    assert [p for p, _ in ei.value.problems] == ["data.sets"]


def test_resuming_an_unfinished_run_with_a_changed_config_is_refused(tmp_path):
    from vlp.train import run_train

    run = _finished_run(tmp_path, _cfg(output_dir=str(tmp_path)), finished=False)
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"lora.enabled: False -> True"):  # refused before Ray starts
        run_train(_cfg(output_dir=str(tmp_path), **{"lora.enabled": True}), log=lambda *_: None)
    assert (run / "config.yaml").read_text() == before


def test_a_checkpoint_in_a_held_epoch_is_not_resumed_on_the_streaming_path(tmp_path):
    """A held epoch's checkpoint holds its step count, which only the held sets' replay turns into rows: resumed
    with data.materialize changed to the streaming path it is refused (a TrainSetupError: one line) before Ray
    Train starts; a checkpoint between epochs, or one from the streaming path, resumes anywhere."""
    from vlp.train.trainer import resume_problem

    run = tmp_path / "run"
    assert resume_problem(str(run), held=False) is None  # no run folder yet
    held = {"epoch": 0, "final": False, "format": 2, "mode": "held", "world": 2}
    for name, st in (("checkpoint_a", {**held, "step": 2, "epoch_steps": 2}),
                     ("checkpoint_b", {**held, "step": 4, "epoch_steps": 4})):
        (run / name).mkdir(parents=True)
        (run / name / "vlp_state.json").write_text(json.dumps(st))
    msg = resume_problem(str(run), held=False)
    assert "(step 4)" in msg and "data.materialize: always" in msg and resume_problem(str(run), held=True) is None
    (run / "checkpoint_c").mkdir()
    (run / "checkpoint_c" / "vlp_state.json").write_text(json.dumps({**held, "step": 6, "epoch": 1, "epoch_steps": 0}))
    assert resume_problem(str(run), held=False) is None


def rows_batch(uids):
    n = len(uids)
    return {"uid": np.asarray(uids, dtype=object), "x": np.arange(n)}


def test_mixture_is_seeded_and_replayable(tmp_path):
    state = str(tmp_path / "state.json")
    write_state(state, 0, [])
    uids = [f"u{i}" for i in range(400)]
    half = Mixture("a", 0.5, seed=1, state_path=state, fmt="auto")
    a, b = half(rows_batch(uids)), half(rows_batch(uids))
    assert list(a["uid"]) == list(b["uid"]) and 150 < len(a["uid"]) < 250
    assert list(Mixture("a", 0.5, seed=2, state_path=state, fmt="auto")(rows_batch(uids))["uid"]) != list(a["uid"])
    write_state(state, 1, [])
    assert list(half(rows_batch(uids))["uid"]) != list(a["uid"])  # a new epoch draws a new half
    # weight 2: copy k of every sample in pass k (not adjacent), uids unique per copy
    passes = [Mixture("b", 2.0, seed=1, state_path=state, fmt="caption", copy=k)(rows_batch(uids[:3])) for k in (0, 1)]
    assert [list(p["uid"]) for p in passes] == [["b:u0", "b:u1", "b:u2"], ["b:u0#1", "b:u1#1", "b:u2#1"]]
    assert [list(p["x"]) for p in passes] == [[0, 1, 2], [0, 1, 2]] and set(passes[1]["format"]) == {"caption"}
    with pytest.raises(ValueError, match="pass 2 of a set with weight 2.0 does not exist"):
        Mixture("b", 2.0, seed=1, state_path=state, fmt="auto", copy=2)


def test_fractional_weight_samples_a_seeded_subset_in_the_last_pass(tmp_path):
    state = str(tmp_path / "state.json")
    write_state(state, 0, [])
    uids = [f"u{i}" for i in range(400)]
    assert [mixture_passes(w) for w in (0.5, 1.0, 2.0, 2.5)] == [1, 1, 2, 3]
    run = lambda: [list(Mixture("c", 2.5, seed=3, state_path=state, fmt="auto", copy=k)(rows_batch(uids))["uid"])
                   for k in range(3)]
    p0, p1, p2 = run()
    assert run() == [p0, p1, p2]  # replayed exactly from the seed
    assert len(p0) == len(p1) == 400 and 150 < len(p2) < 250 and all(u.endswith("#2") for u in p2)
    allu = p0 + p1 + p2
    assert len(set(allu)) == len(allu)  # uids unique per copy: DropSeen can drop exactly what a checkpoint saw
    assert {base_uid(u) for u in p2} <= set(p0)


def _rows_with_copies(n_samples=40, copies=2, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 300, n_samples)
    rows = []
    for k in range(copies):  # one pass per copy, as the data graph streams them
        rows += [{"uid": f"s0:u{i}" + (f"#{k}" if k else ""), "media_type": "video", "length": int(lengths[i])}
                 for i in range(n_samples)]
    return rows


def test_copies_of_a_sample_never_share_a_micro_batch():
    rows = _rows_with_copies()  # a window holding both copies of each sample: same length, sorted next to each other
    plain_sort = sorted(rows, key=lambda r: r["length"])
    assert any(base_uid(plain_sort[i]["uid"]) == base_uid(plain_sort[i + 1]["uid"]) for i in range(0, 79, 2))
    for by_mod in (False, True):
        mbs = length_grouped(rows, 4, np.random.default_rng(1), group=True, by_modality=by_mod)
        assert sum(len(mb) for mb in mbs) == 80
        for mb in mbs:
            assert len({base_uid(r["uid"]) for r in mb}) == len(mb), [r["uid"] for r in mb]
        assert padding_fraction(mbs) < 0.1  # the swaps stay between neighbouring (similar-length) micro-batches
    a = length_grouped(rows, 4, np.random.default_rng(5), group=True)
    b = length_grouped(rows, 4, np.random.default_rng(5), group=True)
    assert [[r["uid"] for r in mb] for mb in a] == [[r["uid"] for r in mb] for mb in b]  # replayable


def _row(conv=None, caption="", media="video", shape=(264, 64), mode="valley_pooled", t=8, fmt="auto", items=None):
    """A /2 row: ``items`` = [(modality, shape, num_frames)], one item (media, shape, t) by default."""
    items = [(media, shape, t)] if items is None else items
    media_type = "text" if not items else items[0][0] if len({m for m, _, _ in items}) == 1 else "mixed"
    return {"format": fmt, "conversations": json.dumps(conv) if conv else "", "caption": caption,
            "media_type": media_type, "modalities": [m for m, _, _ in items], "shape": [list(s) for _, s, _ in items],
            "mode": mode, "num_frames": [n for _, _, n in items]}


TWO_ITEMS = [("image", (257, 64), 1), ("video", (264, 64), 8)]  # valley_pooled: (P + T, D) -> P + T tokens each


def test_a_two_item_sample_costs_each_items_visual_tokens():
    conv = [{"from": "human", "value": "<image>\nand <video>\nWhat changed?"}, {"from": "gpt", "value": "It moved."}]
    tk = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=2048, overlong="truncate", model="valley")
    assert tk.visual_counts(_row(items=TWO_ITEMS)) == [257, 264]
    ids, labels, length, reason = tk.one(_row(conv, items=TWO_ITEMS))
    assert reason == "" and ids.count(VISUAL_TOKEN_INDEX) == 2 and length == len(ids) - 2 + 257 + 264
    assert len(ids) == len(labels) and all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t == VISUAL_TOKEN_INDEX)
    # caption data: one placeholder per item, in the row's order
    cap = tk.one(_row(caption="A red disc, then a blue square.", fmt="caption", items=TWO_ITEMS))
    assert cap[3] == "" and cap[0].count(VISUAL_TOKEN_INDEX) == 2 and cap[2] == len(cap[0]) - 2 + 521


def test_truncation_keeps_every_visual_span_of_a_multi_item_sample():
    conv = [{"from": "human", "value": "<image>\n<video>\nWhat changed?"},
            {"from": "gpt", "value": "The shape is red. " * 20}]
    full = Tokenize("preset:tiny-tokenizer", "vicuna_v1", 4096, "truncate", "valley").one(_row(conv, items=TWO_ITEMS))
    ids, labels = full[0], full[1]
    end_last = len(ids) - 1 - ids[::-1].index(VISUAL_TOKEN_INDEX) - 1 + 257 + 264  # end of the 2nd span, expanded
    keep = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX) - 2 + 521 + 5  # 5 answer tokens left
    cut = Tokenize("preset:tiny-tokenizer", "vicuna_v1", keep, "truncate", "valley").one(_row(conv, items=TWO_ITEMS))
    assert cut[3] == "" and cut[2] == keep and cut[0].count(VISUAL_TOKEN_INDEX) == 2 and keep > end_last
    assert cut[0] == ids[:len(cut[0])] and len(cut[0]) - 2 + 521 == keep
    # the first span fits, the second does not: skipped, never cut
    short = Tokenize("preset:tiny-tokenizer", "vicuna_v1", end_last - 10, "truncate", "valley")
    assert short.one(_row(conv, items=TWO_ITEMS))[3] == "over max_length"


def test_a_text_only_sample_is_tokenised_without_visuals():
    conv = [{"from": "human", "value": "What is two plus two?"}, {"from": "gpt", "value": "Four."}]
    tk = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=512, overlong="truncate", model="valley")
    ids, labels, length, reason = tk.one(_row(conv, items=[]))
    assert reason == "" and VISUAL_TOKEN_INDEX not in ids and length == len(ids) == len(labels)
    assert tk.visual_counts(_row(conv, items=[])) == []
    cap = tk.one(_row(caption="Just words.", fmt="caption", items=[]))
    assert cap[3] == "" and VISUAL_TOKEN_INDEX not in cap[0] and cap[2] == len(cap[0])


@pytest.mark.parametrize("value, items", [
    ("<video>\nWhat color?", [("image", (257, 64), 1)]),                  # other modality
    ("<video><video>\nSame?", [("video", (264, 64), 8)]),                 # two placeholders, one item
    ("What color?", [("video", (264, 64), 8)]),                             # no placeholder, one item
    ("<video>\nWhat color?", []),                                          # a placeholder, no item
    ("<video>\n<image>\nWhich first?", TWO_ITEMS),                        # right items, wrong order
])
def test_placeholders_that_do_not_match_the_media_items_are_skipped(value, items):
    conv = [{"from": "human", "value": value}, {"from": "gpt", "value": "Red."}]
    tk = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=2048, overlong="truncate", model="valley")
    assert tk.one(_row(conv, items=items)) == ([], [], 0, "placeholders do not match the media items")


def test_truncation_never_cuts_the_visual_span():
    conv = [{"from": "human", "value": "<video>\nWhat color is the shape?"},
            {"from": "gpt", "value": "The shape is red. " * 20}]
    tk = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=360, overlong="truncate", model="valley")
    ids, labels, length, reason = tk.one(_row(conv))
    assert reason == "" and length == 360
    p = ids.index(VISUAL_TOKEN_INDEX)
    assert len(ids) - 1 + 264 == 360 and p < len(ids) and any(l != IGNORE_INDEX for l in labels)
    # a visual span that alone passes max_length: skipped, never cut
    tk_small = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=200, overlong="truncate", model="valley")
    assert tk_small.one(_row(conv))[3] == "over max_length"
    tk_skip = Tokenize("preset:tiny-tokenizer", "vicuna_v1", max_length=360, overlong="skip", model="valley")
    assert tk_skip.one(_row(conv))[3] == "over max_length"
    # visual tokens counted per pooler and feature mode
    tk_pm = Tokenize("preset:tiny-tokenizer", "plain", max_length=1000, overlong="skip", model="patch_mean")
    n_plain = tk_pm.one(_row(caption="A red circle.", fmt="caption"))[2]
    tk_v = Tokenize("preset:tiny-tokenizer", "plain", max_length=1000, overlong="skip", model="valley")
    assert tk_v.one(_row(caption="A red circle.", fmt="caption"))[2] - n_plain == 8
    assert tk_v.one(_row(caption="A red circle.", shape=(8, 257, 64), mode="frames"))[2] == \
        tk_v.one(_row(caption="A red circle."))[2]


def test_length_grouping_cuts_padding():
    rng = np.random.default_rng(0)
    rows = [{"media_type": ("video", "image", "text", "mixed")[i % 4], "length": int(l)}
            for i, l in enumerate(rng.integers(20, 300, 512))]
    grouped = length_grouped(rows, 8, np.random.default_rng(1), group=True)
    random = length_grouped(list(rng.permutation(rows)), 8, np.random.default_rng(1), group=False)
    assert len(grouped) == len(random) == 64
    assert padding_fraction(grouped) < 0.1 < padding_fraction(random)
    by_mod = length_grouped(rows, 8, np.random.default_rng(1), group=True, by_modality=True)
    mixed = sum(len({r["media_type"] for r in mb}) > 1 for mb in by_mod)
    assert mixed <= 3  # media_type first (text-only rows together too): at most the boundary micro-batches mix
    assert padding_fraction(grouped) <= padding_fraction(by_mod) < padding_fraction(random)


def test_sets_from_different_encoders_or_preprocessing_are_refused(tmp_path):
    """Features from another tower (or normalisation) mixed into one run would train on two vector spaces."""
    from vlp.train import TrainSetupError, check_setup

    def fset(name, sha, mean):
        d = tmp_path / name
        d.mkdir()
        fp = {"encoder": {"type": "clip", "path": "preset:tiny-clip", "weights_sha256": sha, "layer": -2,
                          "hidden_size": 64, "image_size": 224},
              "mode": "valley_pooled", "sampling": {"mode": "uniform", "num_frames": 8 if name != "img" else 1},
              "preprocess": {"size": 224, "pad_to_square": False, "mean": mean, "std": [0.27, 0.26, 0.28]}}
        (d / "fingerprint.json").write_text(json.dumps(fp))
        (d / "manifest.json").write_text(json.dumps({"totals": {"samples_ok": 64}}))
        return {"uri": str(d)}

    base = {"run_name": "x", "output_dir": str(tmp_path / "out"), "batch": {"global_size": 8, "micro_size": 4},
            "scaling": {"num_workers": 2}, "data": {"template": "plain"}}
    a, img = fset("a", "aaa", [0.48, 0.46, 0.41]), fset("img", "aaa", [0.48, 0.46, 0.41])
    b, c = fset("b", "bbb", [0.48, 0.46, 0.41]), fset("c", "aaa", [0.5, 0.5, 0.5])
    with pytest.raises(TrainSetupError) as e:
        check_setup(validate(TrainConfig, dotted(dict(base), **{"data.sets": [a, img, b, c]})), log=lambda m: None)
    msg = str(e.value)
    assert "data.sets[2]: made with another encoder" in msg and "weights_sha256: 'aaa' vs 'bbb'" in msg
    assert "data.sets[3]: made with another preprocess" in msg and "data.sets[1]" not in msg  # sampling may differ


def _saved_for_backward(model, feats, mode: str, t: int) -> int:
    """Bytes autograd keeps for the backward of one forward (each storage once)."""
    import torch

    from vlp.data.conversation import VISUAL_TOKEN_INDEX

    seen: dict = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    ids = torch.tensor([1, VISUAL_TOKEN_INDEX, 5, 6])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model([ids], [ids.clamp(min=0)], [[feats]], [mode], [[t]], [None]).loss.backward()
    return sum(seen.values())


def test_the_run_model_is_in_training_mode_so_activation_checkpointing_is_live(tiny_clip_path):
    """from_pretrained hands the LLM and the tower over in eval mode, where transformers skips activation
    checkpointing: build_model puts the whole model in training mode, and checkpointing then keeps less."""
    import torch

    from vlp.train.recipe import build_model

    def model(ckpt: bool):
        torch.manual_seed(0)
        return build_model(_cfg(**{"model.vision_hidden_size": 64, "model.llm.trainable": True,
                                   "model.llm.gradient_checkpointing": ckpt,
                                   "model.tower": {"trainable": True, "gradient_checkpointing": ckpt}}))

    plain, ckpt = model(False), model(True)
    assert all(m.training for m in ckpt.modules())
    px = torch.randint(0, 256, (2, 3, 224, 224), generator=torch.Generator().manual_seed(0)).float()
    assert _saved_for_backward(ckpt, px, "pixels", 2) < 0.7 * _saved_for_backward(plain, px, "pixels", 2)


def test_llm_init_from_loads_an_earlier_stages_lm_and_tokenizer(export, tmp_path, monkeypatch):
    """model.llm.init_from: the LM and tokenizer of an earlier stage's export (LEGO's stage 3 after stage 2), paths
    made absolute for Ray's workers and tasks; a folder without an export is one setup problem."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from vlp.models.videollm import VideoLLM
    from vlp.train.trainer import TrainSetupError, check_inputs

    monkeypatch.chdir(tmp_path)
    shutil.copytree(export, tmp_path / "runs" / "s2" / "export")
    cfg = _cfg(**{"model.vision_hidden_size": 64, "model.llm.init_from": "runs/s2/export"})
    assert cfg.model.llm.source() == str(tmp_path / "runs" / "s2" / "export" / "llm")
    assert cfg.model.llm.tokenizer_source() == str(tmp_path / "runs" / "s2" / "export" / "tokenizer")
    model = VideoLLM(cfg.model)
    want = load_file(str(tmp_path / "runs" / "s2" / "export" / "llm" / "model.safetensors"))
    got = model.llm.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got)
    bad = _cfg(**{"model.vision_hidden_size": 64, "model.llm.init_from": "runs/nothing"})
    with pytest.raises(TrainSetupError, match="model.llm.init_from: no export with an llm/ at runs/nothing"):
        check_inputs(bad)


def test_the_valley7b_configs_pass_their_preflight_and_say_what_smaller_gpus_need(tmp_path):
    """configs/valley7b at their GPUs' memory, counted from a LLaMA-7B config.json (vicuna-7b-v1.5's sizes; the
    weights are never built: param_counts uses the meta device)."""
    from transformers import LlamaConfig

    from vlp.config import load_config
    from vlp.train.trainer import memory_workload, param_counts

    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(tmp_path / "llama7b")
    llm = [f"model.llm.path={tmp_path / 'llama7b'}", "model.connector.init_from=null"]
    s1 = load_config(TrainConfig, "configs/valley7b/train_stage1.yaml", llm)
    work, plan = memory_workload(s1, *param_counts(s1), "bf16")
    assert (work.trained_lm, work.can_checkpoint, work.seq_len, plan) == (False, False, 512, Plan(1, 8, 8))
    pf = preflight(work, plan, 40)  # accelerator_type A100: 40 GB
    assert pf.fits and pf.parts.activations == pytest.approx(17.9, abs=0.05), pf.message
    s2 = load_config(TrainConfig, "configs/valley7b/train_stage2.yaml", llm)
    work, plan = memory_workload(s2, *param_counts(s2), "bf16")
    assert plan == Plan(2, 8, 4, checkpointing=True) and preflight(work, plan, 80).fits
    assert preflight(work, plan, 24).fix == Plan(3, 8, 2, checkpointing=True)  # what the config's comment says
    assert preflight(work, plan, 16).fix == Plan(3, 8, 4, True, offload_optimizer=True)


def test_the_run_stops_when_its_states_do_not_fit_and_on_activations_only_when_strict():
    """The tiny run's model states (~5 MiB with the bucket) fit 0.1 GB; 16 samples x 2048 tokens of activations
    (~0.6 GiB) do not: by default the run starts with the report as a warning, under strict it stops, and
    either way the report says which micro-batch or checkpointing fits."""
    from vlp.train.trainer import TrainSetupError, memory_preflight, param_counts

    over = {"model.vision_hidden_size": 64, "model.llm.trainable": True, "data.max_length": 2048,
            "batch.global_size": 32, "batch.micro_size": 16}
    cfg = _cfg(**over)
    counts = param_counts(cfg)
    logs = []
    pf = memory_preflight(cfg, *counts, "fp32", 0.1, logs.append)
    assert not pf.fits and pf.states_fit and pf.fix == Plan(1, 2, 2)  # micro-batch 2 x 8 accumulation x 2 workers
    assert logs and logs[0].startswith("[vlp] memory preflight, warning: the model states fit, a micro-batch of "
                                       "2048-token samples would not") and "would fit: " in logs[0]
    with pytest.raises(TrainSetupError, match=r"memory preflight: does not fit: ZeRO-1 x2 fp32, micro-batch 16 x "
                                              r"2048 tokens(.|\n)*would fit: batch.micro_size="):
        memory_preflight(_cfg(**over, **{"scaling.memory_preflight": "strict"}), *counts, "fp32", 0.1, logs.append)
    with pytest.raises(TrainSetupError, match="memory preflight: does not fit"):  # states alone: always
        memory_preflight(cfg, *counts, "fp32", 0.001, logs.append)
    assert memory_preflight(cfg, *counts, "fp32", None, logs.append) is None and "skipped" in logs[-1]
