"""The per-worker training loop: a DeepSpeed engine fed by this worker's split of the dataset."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Optional

import numpy as np

from .config import TrainConfig
from .data import iter_rows, length_grouped, padding_fraction, write_state
from .memory import default_bucket_elems, resolve_precision

PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peak per device
    "A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12, "T4": 65e12,
}


def deepspeed_config(cfg: TrainConfig, precision: str, n_trainable: int) -> dict:
    """The DeepSpeed JSON config of a run; ``precision`` is resolved (bf16/fp16/fp32), bucket sizes not set in
    ``cfg.deepspeed`` are sized to the trainable parameter count (:func:`vlp.train.memory.default_bucket_elems`)."""
    b, ds = cfg.batch, cfg.deepspeed
    bucket = ds.reduce_bucket_size or default_bucket_elems(n_trainable)
    zero = {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": bucket, "allgather_bucket_size": ds.allgather_bucket_size or bucket}
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=bucket if ds.stage3_prefetch_bucket_size is None
                    else ds.stage3_prefetch_bucket_size,
                    stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_batch_size": b.global_size,
        "train_micro_batch_size_per_gpu": b.micro_size,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total: int, warmup_ratio: float, schedule: str):
    warm = max(1, int(round(total * warmup_ratio))) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _peak_flops(device) -> Optional[float]:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _fs_append(path: str, text: str) -> None:
    from ..storage import get_fs

    fs, p = get_fs(path)
    if "://" not in path:
        with open(p, "a") as f:
            f.write(text)
    else:  # object stores cannot append: rewrite (metrics files stay small)
        old = fs.cat(p).decode() if fs.exists(p) else ""
        with fs.open(p, "w") as f:
            f.write(old + text)


def build_model(cfg: TrainConfig, load_init: bool = True):
    """VideoLLM of the run (connector from ``init_from``, LoRA adapters when enabled), before DeepSpeed."""
    from ..models.videollm import VideoLLM
    from ..formats.export import load_connector

    model = VideoLLM(cfg.model)
    if load_init and cfg.model.connector.init_from:
        load_connector(model.connector, cfg.model.connector.init_from)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model.llm = get_peft_model(model.llm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                         lora_dropout=cfg.lora.dropout,
                                                         target_modules=cfg.lora.target_modules))
    return model


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from ..formats.export import export_model, probe_logits

    cfg = TrainConfig.model_validate(config["cfg"])
    meta = config["meta"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, state_path = meta["run_dir"], meta["state_path"]
    torch.manual_seed(cfg.data.seed)
    if torch.cuda.is_available() and cfg.scaling.use_gpu:
        device = torch.device("cuda", ray.train.torch.get_device().index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    precision = resolve_precision(cfg.deepspeed.precision, device.type == "cuda",
                                  device.type == "cuda" and torch.cuda.is_bf16_supported())
    feat_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]

    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them (numel 0 after)
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)
    total_steps = meta["total_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.optim.warmup_ratio, cfg.optim.schedule))
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                 config=deepspeed_config(cfg, precision, n_trainable))

    step, start_epoch, seen, done = 0, 0, [], False
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="state", load_module_strict=False)
            st = json.loads(open(os.path.join(d, "vlp_state.json")).read())
        step, start_epoch, seen = st["step"], st["epoch"], st["seen"]
        done = bool(st.get("final"))
        if rank == 0:
            print(f"[vlp] resumed from step {step} (epoch {start_epoch}, {len(seen)} samples already seen in it)")

    micro, accum = cfg.batch.micro_size, cfg.batch.grad_accum
    peak = _peak_flops(device)
    counters = {"skipped": {}, "tail_dropped": 0}
    tb = None
    if rank == 0 and cfg.tensorboard and "://" not in run_dir:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(f"{run_dir}/tensorboard")
    metrics: dict = {}
    probe_row = None
    done = done or (cfg.max_steps is not None and step >= cfg.max_steps)

    def save(epoch: int, seen_epoch: list[str], final: bool = False) -> None:
        gathered = [None] * world
        dist.all_gather_object(gathered, seen_epoch)
        merged = [u for part in gathered for u in part]
        with tempfile.TemporaryDirectory() as d:
            engine.save_checkpoint(d, tag="state")
            if rank == 0:
                with open(os.path.join(d, "vlp_state.json"), "w") as f:
                    json.dump({"step": step, "epoch": epoch, "seen": merged, "final": final}, f)
            ray.train.report({**metrics, "step": step, "epoch": epoch},
                             checkpoint=Checkpoint.from_directory(d))

    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        seen_epoch_local: list[str] = []
        if rank == 0:
            write_state(state_path, epoch, seen if epoch == start_epoch else [])
        dist.barrier()
        rng = np.random.default_rng([cfg.data.seed, epoch, rank, len(seen)])
        shard = ray.train.get_dataset_shard("train")
        buf_n = cfg.data.local_shuffle_buffer_size
        rows = iter_rows(shard.iter_batches(  # the shuffle reorders; which samples an epoch holds is DropSeen's
            batch_size=64, batch_format="numpy", prefetch_batches=2, local_shuffle_buffer_size=buf_n or None,
            local_shuffle_seed=int(rng.integers(2**31)) if buf_n else None))
        window = micro * accum * cfg.data.group_window

        def micro_batches():
            buf = []
            for r in rows:
                if r["skip"]:
                    counters["skipped"][r["skip"]] = counters["skipped"].get(r["skip"], 0) + 1
                    continue
                buf.append(r)
                if len(buf) >= window:
                    yield from length_grouped(buf, micro, rng, cfg.data.group_by_length,
                                              cfg.data.group_by_modality)
                    buf = []
            if buf:
                mbs = length_grouped(buf, micro, rng, cfg.data.group_by_length, cfg.data.group_by_modality)
                counters["tail_dropped"] += len(buf) - micro * len(mbs)
                yield from mbs

        gen = micro_batches()
        t_mark = time.perf_counter()  # end-to-end step time runs from here to the same point after each step
        while True:
            t0 = time.perf_counter()
            group = []
            for _ in range(accum):
                mb = next(gen, None)
                if mb is None:
                    break
                group.append(mb)
            t_data = time.perf_counter() - t0
            flag = torch.tensor([1 if len(group) == accum else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 0:
                counters["tail_dropped"] += sum(len(mb) for mb in group)
                break
            t1 = time.perf_counter()
            loss_sum, tokens, vis_tokens = 0.0, 0, 0
            for mb in group:
                feats = [torch.from_numpy(np.frombuffer(r["features"], np.float16).reshape(tuple(r["shape"])).copy())
                         .to(device, feat_dtype) for r in mb]
                out = engine([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
                             feats, [r["mode"] for r in mb], [int(r["num_frames"]) for r in mb])
                engine.backward(out.loss)
                engine.step()
                loss_sum += float(out.loss.detach())
                tokens += sum(int(r["length"]) for r in mb)
            t_compute = time.perf_counter() - t1
            if probe_row is None:  # a fixed input for the export check (train_summary.json "probe")
                r = group[0][0]
                probe_row = {"input_ids": [int(x) for x in r["input_ids"]], "shape": [int(x) for x in r["shape"]],
                             "mode": str(r["mode"]), "num_frames": int(r["num_frames"]), "seed": 0}
            step += 1
            seen_epoch_local += [str(r["uid"]) for mb in group for r in mb]
            red = torch.tensor([loss_sum / accum, tokens, micro * accum, t_data, t_compute, padding_fraction(group)],
                               dtype=torch.float64)
            dist.all_reduce(red)
            wall = torch.tensor([time.perf_counter() - t_mark], dtype=torch.float64)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
            t_mark = time.perf_counter()
            dt = wall.item()  # end to end: data wait, compute, the previous step's logging and checkpoint
            dt_c = red[4].item() / world
            flops = (4 * n_total + 2 * n_trainable) * red[1].item()  # fwd 2N + act-grad 2N + weight-grad 2N_train
            mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                   __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024)
            metrics = {
                "step": step, "epoch": epoch, "loss": red[0].item() / world, "lr": sched.get_last_lr()[0],
                "tokens_per_s": red[1].item() / dt if dt else 0.0, "samples_per_s": red[2].item() / dt if dt else 0.0,
                "compute_tokens_per_s": red[1].item() / dt_c if dt_c else 0.0,
                "compute_samples_per_s": red[2].item() / dt_c if dt_c else 0.0,
                "step_wall_s": dt, "data_wait_s": red[3].item() / world, "compute_s": dt_c,
                "data_wait_frac": red[3].item() / (red[3] + red[4]).item() if (red[3] + red[4]).item() else 0.0,
                "padding_frac": red[5].item() / world,
                "mfu": (flops / dt / world / peak) if (peak and dt) else None,
                "peak_mem_bytes": int(mem), "time": time.time(),
            }
            all_uids = [None] * world
            dist.all_gather_object(all_uids, [str(r["uid"]) for mb in group for r in mb])
            if rank == 0:
                _fs_append(f"{run_dir}/metrics.jsonl", json.dumps(metrics) + "\n")
                if tb is not None:
                    for k, v in metrics.items():
                        if isinstance(v, (int, float)) and k not in ("step", "time"):
                            tb.add_scalar(f"train/{k}", v, step)
                _fs_append(f"{run_dir}/samples.jsonl", json.dumps({"step": step, "uids": sum(all_uids, [])}) + "\n")
                if step % cfg.log_every == 0:
                    print(f"[vlp] step {step}/{total_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                          f"{metrics['samples_per_s']:.1f} samples/s pad {metrics['padding_frac']:.1%} "
                          f"data-wait {metrics['data_wait_frac']:.0%}", flush=True)
            if cfg.debug.fail_at_step == step and rank == cfg.debug.fail_rank:
                marker = f"{run_dir}/.injected_failure"
                if not os.path.exists(marker):
                    open(marker, "w").write(str(step))
                    raise RuntimeError(f"injected failure at step {step} on rank {rank}")
            done = cfg.max_steps is not None and step >= cfg.max_steps
            if step % cfg.checkpoint.every_n_steps == 0 and not done:
                save(epoch, seen + seen_epoch_local if epoch == start_epoch else seen_epoch_local)
            if done:
                break
        if epoch == start_epoch:
            seen = []

    if tb is not None:
        tb.close()
    counts = [None] * world
    dist.all_gather_object(counts, counters)
    save(cfg.epochs, [], final=True)
    probe = [probe_row]
    dist.broadcast_object_list(probe, src=0)
    if probe[0] is not None:  # every rank: a ZeRO-3 forward gathers the partitioned weights collectively
        probe[0]["logits"] = probe_logits(engine.module, probe[0]).tolist()
    # ZeRO-3: every rank takes part in gathering the full weights (layer by layer, to CPU on rank 0), and rank 0
    # exports a fresh copy of the model holding them
    full_state = engine._zero3_consolidated_16bit_state_dict() if cfg.deepspeed.zero_stage == 3 else None
    if rank == 0:
        to_export = engine.module
        if full_state is not None:
            to_export = build_model(cfg, load_init=False)
            to_export.load_state_dict(full_state, strict=True)
        skipped: dict = {}
        for c in counts:
            for k, v in c["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
        summary = {"steps": step, "skipped": skipped, "tail_dropped": sum(c["tail_dropped"] for c in counts),
                   "final_metrics": metrics, "probe": probe[0]}
        from ..storage import get_fs

        fs, p = get_fs(f"{run_dir}/train_summary.json")
        with fs.open(p, "w") as f:
            f.write(json.dumps(summary, indent=2))
        from transformers import AutoTokenizer

        from ..models.presets import resolve_model_path

        tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.llm.tokenizer or cfg.model.llm.path))
        if "://" in run_dir:  # save_pretrained writes locally; upload the folder afterwards
            with tempfile.TemporaryDirectory() as tmp:
                export_model(to_export, tok, tmp, extra=meta["export_extra"])
                fs.put(tmp, f"{p.rsplit('/', 1)[0]}/export", recursive=True)
        else:
            export_model(to_export, tok, f"{run_dir}/export", extra=meta["export_extra"])
    dist.barrier()
