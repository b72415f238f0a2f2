"""Training benchmark 2, ZeRO memory: per-rank model-state bytes under ZeRO-0/1/2 at world size 2.

    .venv/bin/python bench/train_zero_memory.py [--quick]

torch.distributed (gloo) in 2 local processes (torch.multiprocessing.spawn, MASTER_ADDR=127.0.0.1; not Ray
Train); each rank builds its model, AdamW, schedule and DeepSpeed engine with the library's
vlp.train.recipe.TrainRecipe.setup (the DeepSpeed config of vlp.train.recipe.deepspeed_config) and runs two
optimizer steps on micro-batches made by vlp.train.recipe.batch_inputs. Every live tensor storage of the rank
(gc sweep + param grads) is classified weights / gradients / optimizer state (incl. fp32 master copies) /
reduction bucket / other, late in the 2nd backward, after it (gradients and optimizer state both alive: the
number compared) and after the 2nd step. fp32 (the brief's setting) and, without --quick, bf16 (DeepSpeed's bf16
path runs on CPU too). Compared with vlp.train.memory.model_state_bytes and with the per-parameter byte counts.
Writes the ``memory`` part of bench/results/train.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_common import (SEED, TARGET_ZERO2, bench_main, free_port, log,  # noqa: E402
                           read_feature_rows, tokenise, train_config)

import numpy as np  # noqa: E402

WORLD = 2


def _storages(tensors) -> dict[int, int]:
    """{storage data_ptr: nbytes} of real (non-meta, non-empty) tensors."""
    import torch

    out = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        try:
            s = t.untyped_storage()
        except Exception:
            continue
        if s.nbytes() and s.data_ptr():
            out[s.data_ptr()] = s.nbytes()
    return out


def _tensors_in(obj, depth: int = 0):
    import torch

    if depth > 4 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


def _snapshot(model, engine) -> dict:
    """Bytes of every live tensor storage of this process (gc sweep + param grads), classified in this order:
    weights: storages of the model's parameters (ZeRO-1/2: the flat buffer they view);
    reduce_bucket: the ZeRO wrapper's ipg bucket buffers (param grads are views into it during backward);
    gradients: param .grad / .grad_accum, averaged_gradients, grads_in_partition;
    optimizer: everything else the DeepSpeed optimizer (wrapper) holds in its attributes: the torch optimizer's
    state (exp_avg, exp_avg_sq, step), fp32 master weights (ZeRO: single_partition_of_fp32_groups; bf16
    ZeRO-0: fp32_groups); other: the rest (inputs, rotary buffers...)."""
    import torch

    gc.collect()
    zopt = engine.optimizer
    inner = getattr(zopt, "optimizer", zopt)
    params = list(model.parameters())
    weights = _storages(p.data for p in params)
    grad_t = [p.grad for p in params if p.grad is not None]
    grad_t += [p.grad_accum for p in params if isinstance(getattr(p, "grad_accum", None), torch.Tensor)]
    grad_t += list(_tensors_in(getattr(zopt, "averaged_gradients", None)))
    grad_t += list(_tensors_in(getattr(zopt, "grads_in_partition", None)))
    bucket_t = []
    for b in (getattr(zopt, "ipg_buckets", None) or {}).values():
        bucket_t += list(_tensors_in(getattr(b, "buffer", None)))
    opt_t = [v for st in inner.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for o in {id(zopt): zopt, id(inner): inner}.values():
        for v in vars(o).values():
            opt_t += list(_tensors_in(v))
    grads, bucket, optim = _storages(grad_t), _storages(bucket_t), _storages(opt_t)
    import warnings

    with warnings.catch_warnings():  # isinstance() on every object trips deprecation shims (torch.distributed)
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    every = _storages(live + grad_t + bucket_t + opt_t)
    cats = {"weights": 0, "optimizer": 0, "gradients": 0, "reduce_bucket": 0, "other": 0}
    other_big = []
    for ptr, nb in every.items():
        c = ("weights" if ptr in weights else "reduce_bucket" if ptr in bucket else "gradients" if ptr in grads
             else "optimizer" if ptr in optim else "other")
        cats[c] += nb
        if c == "other" and nb >= 4096:
            other_big.append(nb)
    cats["other_largest"] = sorted(other_big, reverse=True)[:5]
    return cats


def _mem_stage(rank: int, world: int, stage: int, precision: str, mbs: list) -> dict:
    """One ZeRO stage on this rank: the recipe's setup, two optimizer steps, three snapshots."""
    from vlp.train.recipe import TrainRecipe, batch_inputs

    cfg = train_config("mem", 4 * world, 4, stage, precision, workers=world)
    recipe = TrainRecipe(cfg, {"run_dir": "unused", "state_path": "unused", "total_steps": 10}, rank, world)
    recipe.setup()  # seeded model, AdamW, LR schedule, deepspeed.initialize with the run's DeepSpeed config
    engine = recipe.engine
    n_trainable, n_frozen = recipe.size.trainable, recipe.size.total - recipe.size.trainable
    snaps = {}
    state = {"step": 0}

    def hook(g):  # runs late in the 2nd backward (the embeddings get their gradient last): every gradient
        if state["step"] == 1 and "during_backward" not in snaps:  # so far exists, the bucket is allocated
            snaps["during_backward"] = _snapshot(engine.module, engine)
        return g

    handle = engine.module.llm.get_input_embeddings().weight.register_hook(hook)
    for step, mb in enumerate(mbs[:2]):
        state["step"] = step
        out = engine(*batch_inputs(mb, "cpu", recipe.feat_dtype))
        engine.backward(out.loss)
        del out
        if step == 1:
            snaps["after_backward"] = _snapshot(engine.module, engine)
        engine.step()
        if step == 1:
            snaps["after_step"] = _snapshot(engine.module, engine)
    handle.remove()
    res = {"rank": rank, "stage": stage, "precision": precision, "world": world,
           "param_dtype": str(next(engine.module.parameters()).dtype), "trainable": n_trainable, "frozen": n_frozen,
           "engine_optimizer": type(engine.optimizer).__name__, **snaps}
    engine.destroy() if hasattr(engine, "destroy") else None
    engine = recipe = None  # (not del: the hook's closure holds the name) frees the engine before the next stage
    gc.collect()
    return res


def _mem_worker(rank: int, world: int, port: int, precision: str, batches_path: str, out_dir: str) -> None:
    """One rank: ZeRO-0, 1, 2 one after another (a fresh engine each), results to out_dir/<stage>-rank<r>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import pickle

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    with open(batches_path, "rb") as f:
        mbs = pickle.load(f)[rank]
    for stage in (0, 1, 2):
        t0 = time.perf_counter()
        res = _mem_stage(rank, world, stage, precision, mbs)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        Path(out_dir, f"{stage}-rank{rank}.json").write_text(json.dumps(res))
        dist.barrier()
    dist.destroy_process_group()


# per trainable parameter: (weights, gradients, optimizer state) bytes held by one of n ranks
def _expected(precision: str, stage: int, n: int, master_in_fp32: bool) -> tuple[float, float, float]:
    if precision == "bf16":  # the ZeRO paper / vlp.train.memory: 2 + 2 + 12 (fp32 master + Adam m, v)
        return {0: (2, 2, 12), 1: (2, 2, 12 / n), 2: (2, 2 / n, 12 / n)}[stage]
    opt = 12 if master_in_fp32 else 8  # fp32: Adam m, v (+ DeepSpeed's fp32 partition copy under ZeRO-1/2)
    return {0: (4, 4, 8), 1: (4, 4, opt / n), 2: (4, 4 / n, opt / n)}[stage]


def stage_record(prec: str, stage: int, ranks: list[dict], wall_s: float, P: int, F: int) -> dict:
    """One stage's measured bytes per rank against the per-parameter counts and vlp.train.memory."""
    from vlp.train.memory import model_state_bytes

    ab = [r["after_backward"] for r in ranks]
    og = [a["optimizer"] + a["gradients"] for a in ab]
    w, g, o = _expected(prec, stage, WORLD, True)
    exp = {"opt_grad": P * (g + o), "total": P * (w + g + o),
           "vlp_model_state_bytes": model_state_bytes(P, F, WORLD, stage, prec)}
    rec = {
        "engine_optimizer": ranks[0]["engine_optimizer"], "param_dtype": ranks[0]["param_dtype"],
        "per_rank": [{k: r.get(k) for k in ("during_backward", "after_backward", "after_step")} for r in ranks],
        "opt_plus_grad_bytes_per_rank": og,
        "total_model_state_bytes_per_rank": [a["optimizer"] + a["gradients"] + a["weights"] for a in ab],
        "expected_bytes_per_rank": {k: int(v) for k, v in exp.items()},
        "measured_over_expected_opt_grad": round(max(og) / exp["opt_grad"], 3),
        "measured_total_over_vlp_model_state_bytes": round(
            max(a["optimizer"] + a["gradients"] + a["weights"] for a in ab) / exp["vlp_model_state_bytes"], 3),
        "reduce_bucket_bytes_during_backward": max((r.get("during_backward") or {}).get("reduce_bucket", 0)
                                                   for r in ranks),
        "peak_during_backward_bytes_per_rank": [
            sum(v for k, v in (r.get("during_backward") or {}).items()
                if k in ("weights", "optimizer", "gradients", "reduce_bucket")) for r in ranks],
        "wall_s": wall_s,
    }
    if prec == "fp32":
        w2, g2, o2 = _expected(prec, stage, WORLD, False)
        rec["expected_bytes_per_rank"]["opt_grad_without_master_copy"] = int(P * (g2 + o2))
    return rec


def precision_result(prec: str, od: Path) -> dict:
    """The three stages of one precision (the ranks' JSON files in ``od``) and the summary."""
    from vlp.train.memory import default_bucket_elems

    stages = {}
    for stage in (0, 1, 2):
        ranks = [json.loads((od / f"{stage}-rank{r}.json").read_text()) for r in range(WORLD)]
        stages[stage] = {"ranks": ranks, "wall_s": max(r["wall_s"] for r in ranks)}
    P, F = stages[0]["ranks"][0]["trainable"], stages[0]["ranks"][0]["frozen"]
    res = {"trainable_params": P, "frozen_params": F, "stages": {}}
    for stage in (0, 1, 2):
        res["stages"][f"zero{stage}"] = stage_record(prec, stage, stages[stage]["ranks"], stages[stage]["wall_s"],
                                                     P, F)
    z0 = max(res["stages"]["zero0"]["opt_plus_grad_bytes_per_rank"])
    for s_ in ("zero1", "zero2"):
        res["stages"][s_]["opt_plus_grad_vs_zero0"] = round(max(res["stages"][s_]["opt_plus_grad_bytes_per_rank"]) / z0,
                                                            3)
    e0, e2 = sum(_expected(prec, 0, WORLD, True)[1:]), sum(_expected(prec, 2, WORLD, True)[1:])
    res["summary"] = {"reduce_bucket_elems": default_bucket_elems(P),
                      "zero2_reduce_bucket_bytes": res["stages"]["zero2"]["reduce_bucket_bytes_during_backward"],
                      "zero1_vs_zero0": res["stages"]["zero1"]["opt_plus_grad_vs_zero0"],
                      "zero2_vs_zero0": res["stages"]["zero2"]["opt_plus_grad_vs_zero0"],
                      "expected_zero2_vs_zero0": round(e2 / e0, 3),
                      "target": TARGET_ZERO2,
                      "met": res["stages"]["zero2"]["opt_plus_grad_vs_zero0"] <= TARGET_ZERO2}
    if prec == "fp32":
        res["summary"]["expected_zero2_vs_zero0_without_master_copy"] = round(
            sum(_expected(prec, 2, WORLD, False)[1:]) / sum(_expected(prec, 0, WORLD, False)[1:]), 3)
    return res


def bench_memory(root: Path, work: Path, precisions: tuple[str, ...]) -> dict:
    import pickle

    import torch.multiprocessing as mp

    from vlp.train.data import length_grouped

    rows = tokenise(read_feature_rows(str(root / "features" / "instruct")))
    mbs = length_grouped(rows, 4, np.random.default_rng(SEED), True)
    bp = work / "mem_batches.pkl"
    bp.write_bytes(pickle.dumps([mbs[0:2], mbs[2:4]]))
    out = {"method": "torch.distributed gloo, 2 local processes (torch.multiprocessing.spawn), not Ray Train; "
                     "model + AdamW + deepspeed.initialize by vlp.train.recipe.TrainRecipe.setup with "
                     "vlp.train.recipe.deepspeed_config (contiguous_gradients, reduce_bucket_size sized to the model "
                     "by vlp.train.memory.default_bucket_elems = max(5e5, trainable) elements here), 2 micro-batches "
                     "of 4 per rank; every live tensor storage classified during the 2nd backward (late: all "
                     "gradients exist, reduction bucket allocated), after it (the gradients the optimizer step will "
                     "use) and after the 2nd step",
           "world": WORLD, "precisions": {}}
    for prec in precisions:
        log(f"memory: {prec}, ZeRO-0/1/2, {WORLD} ranks (gloo, torch.multiprocessing.spawn)")
        od = work / f"mem-{prec}"
        od.mkdir(parents=True, exist_ok=True)
        mp.spawn(_mem_worker, args=(WORLD, free_port(), prec, str(bp), str(od)), nprocs=WORLD, join=True)
        out["precisions"][prec] = precision_result(prec, od)
    out["summary"] = {p: out["precisions"][p]["summary"] for p in out["precisions"]}
    out["summary"]["met"] = out["precisions"]["fp32"]["summary"]["met"]  # the brief's setting: fp32 on CPU
    if "bf16" in out["precisions"]:
        out["summary"]["met_bf16"] = out["precisions"]["bf16"]["summary"]["met"]
    return out


def main() -> None:
    bench_main("memory", __file__, __doc__, "fp32 only (full: fp32 and bf16)",
               lambda a, root, work: bench_memory(root, work, ("fp32",) if a.quick else ("fp32", "bf16")))

if __name__ == "__main__":
    main()
