"""Training benchmark 5, the trainable vision tower: precomputed features vs ``model.tower`` trained on pixel rows.

    .venv/bin/python bench/train_tower.py [--quick]

One process, 1 torch thread, the same length-grouped micro-batches of 8 in every mode, each step forward,
backward and AdamW step (vlp.train.recipe's, through bench/_train_common.PlainEngine):

- ``precomputed``: Valley-pooled features read from the feature set (vlp.train.recipe.batch_inputs), the
  connector and the LLM trained (the other training benchmarks' model);
- ``tower``: the same model with ``model.tower`` (preset:tiny-clip, trainable): uint8 frames (decoded and resized
  once, as precompute's ``output.mode: pixels`` stores them) go through the model's own tower, which is trained
  too (mPLUG-Owl's stage 1);
- ``tower_checkpointed``: the same with ``model.tower.gradient_checkpointing``.

Besides step times: the bytes the forward of the largest micro-batch keeps for the backward in each mode
(autograd's saved tensors), what activation checkpointing is for.

Alternating blocks of steps (8 rounds of 3; --quick: 3 rounds of 2). Writes the ``tower`` part of
bench/results/train.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import spread  # noqa: E402
from _train_common import GLOBAL, LR, SEED, PlainEngine, bench_main, model_config  # noqa: E402
from train_online import fingerprint, frames_and_batches  # noqa: E402


MODES = ("precomputed", "tower", "tower_checkpointed")


def engine(root: Path, mode: str) -> PlainEngine:
    """A fresh model (same seed) for ``mode``: without a tower, or with a trainable one (checkpointed or not)."""
    import torch

    from vlp.models.videollm import ModelConfig, VideoLLM

    cfg = model_config().model_dump()
    if mode != "precomputed":
        pp = fingerprint(root).preprocess
        cfg["tower"] = {"path": "preset:tiny-clip", "trainable": True, "mean": pp.mean, "std": pp.std,
                        "gradient_checkpointing": mode == "tower_checkpointed"}
    torch.manual_seed(SEED)
    model = VideoLLM(ModelConfig.model_validate(cfg)).train()  # as vlp.train.recipe.build_model hands it over
    return PlainEngine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR))


def step(eng: PlainEngine, mb: list[dict], frames: dict, mode: str) -> float:
    """One training step on ``mb``; seconds."""
    import torch

    from vlp.train.recipe import batch_inputs

    t0 = time.perf_counter()
    if mode == "precomputed":
        args = batch_inputs(mb, "cpu", torch.float32)
    else:
        px = [[frames[r["uid"]].float()] for r in mb]  # (T, 3, S, S) 0..255, as row_features hands pixel rows over
        args = ([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb], px,
                ["pixels"] * len(mb), [[int(frames[r["uid"]].shape[0])] for r in mb])
    out = eng(*args)
    eng.backward(out.loss)
    eng.step()
    return time.perf_counter() - t0


def saved_bytes(eng: PlainEngine, mb: list[dict], frames: dict, mode: str) -> int:
    """Bytes of the tensors the forward of one micro-batch keeps for the backward (autograd's saved tensors, each
    storage once): the activation memory activation checkpointing trades for recompute. Inside a checkpointed
    region the checkpoint's own hooks take the tensors, so only what it keeps is counted."""
    import torch

    seen: dict = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(eng, mb, frames, mode)
    return sum(seen.values())


def bench_tower(root: Path, rounds: int, steps_per_block: int) -> dict:
    import torch

    torch.set_num_threads(1)
    frames, mbs = frames_and_batches(root)
    engines = {m: engine(root, m) for m in MODES}
    for m in MODES:  # warm-up
        step(engines[m], mbs[0], frames, m)
    times: dict = {m: [] for m in MODES}
    ratios: dict = {m: [] for m in MODES[1:]}
    k = 0
    for rnd in range(rounds):
        blk = {}
        for m in (MODES if rnd % 2 == 0 else MODES[::-1]):
            ts = [step(engines[m], mbs[(k + j) % len(mbs)], frames, m) for j in range(steps_per_block)]
            times[m] += ts
            blk[m] = sum(ts)
        k += steps_per_block
        for m in MODES[1:]:
            ratios[m].append(blk[m] / blk["precomputed"])
    med = {m: statistics.median(times[m]) for m in MODES}
    longest = max(mbs, key=lambda mb: sum(frames[r["uid"]].shape[0] for r in mb))
    saved = {m: saved_bytes(engines[m], longest, frames, m) for m in MODES}
    n_tower = sum(p.numel() for p in engines["tower"].module.tower.parameters())
    n_frames = statistics.mean(sum(frames[r["uid"]].shape[0] for r in mb) for mb in mbs)
    return {"micro_batch": GLOBAL, "micro_batches": len(mbs), "frames_per_micro_batch_mean": round(n_frames, 1),
            "rounds": rounds, "steps_per_block": steps_per_block, "torch_threads": 1, "tower_params": n_tower,
            "step_s_median": {m: round(v, 4) for m, v in med.items()},
            "ratio_over_precomputed": {m: spread(ratios[m]) for m in MODES[1:]},
            "saved_for_backward_mb_largest_micro_batch": {m: round(v / 2**20, 2) for m, v in saved.items()},
            "summary": f"trainable tower / precomputed step time {med['tower'] / med['precomputed']:.2f}x, "
                       f"checkpointed {med['tower_checkpointed'] / med['precomputed']:.2f}x (median steps); "
                       f"saved for backward {saved['tower'] / 2**20:.0f} MB, checkpointed "
                       f"{saved['tower_checkpointed'] / 2**20:.0f} MB"}


def main() -> None:
    bench_main("tower", __file__, __doc__, "3 rounds of 2 steps instead of 8 of 3", lambda a, root, work: bench_tower(
        root, rounds=3 if a.quick else 8, steps_per_block=2 if a.quick else 3))


if __name__ == "__main__":
    main()
