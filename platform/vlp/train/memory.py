"""Memory preflight: model-state bytes per GPU under DDP / ZeRO 1-3, per precision, as DeepSpeed 0.19 allocates them.

Bytes per *trainable* parameter held by one of N ranks at the peak of a step (read from
deepspeed/runtime/zero/stage_1_and_2.py, stage3.py and engine.py, and measured for stages 0-2 by
bench/train_zero_memory.py, see docs/benchmarks_train.md):

=========  ===============================  ==================================
stage      bf16 / fp16 (mixed precision)    fp32
=========  ===============================  ==================================
0 (DDP)    2 w + 2 g + 12 (fp32 master, m,  4 w + 4 g + 8 (m, v) = 16
           v) = 16
1          2 + 2 + 12/N                     4 + 4 + 12/N (fp32 partition copy + m, v)
2          2 + (2 + 12)/N                   4 + (4 + 12)/N
3          (2 + 2 + 12 + 4)/N = 20/N        (4 + 4 + 8 + 4)/N = 20/N
=========  ===============================  ==================================

- bf16/fp16 stages 0-2 are the ZeRO paper's counts (16, 4 + 12/N, 2 + 14/N).
- fp32 ZeRO-1/2: DeepSpeed clones this rank's partition of the weights into
  ``single_partition_of_fp32_groups`` even when the weights already are fp32, so the optimizer partition is
  12/N (copy + Adam m, v), not 8/N.
- ZeRO-1 keeps full gradients until the backward pass at the accumulation boundary ends (only then it
  reduces them into this rank's partition), so its peak holds the whole 2 (4) bytes of gradients.
- ZeRO-3: partitioned weights and gradient partitions (in the weight dtype), fp32 master partition (shared with
  the weights in fp32), Adam m, v and one fp32 gradient buffer the size of the partition (``initialize_optimizer_states``).
- Frozen parameters cost only their weights (2 or 4 bytes) on every rank, divided by N under ZeRO-3.

:func:`preflight` also adds DeepSpeed's gradient reduction bucket (``reduce_bucket_size`` elements in the weight
dtype, held during the backward pass under ZeRO 1-3). Activations and the parameters ZeRO-3 gathers for a layer
are left to ``activation_margin``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GPU_MEMORY_GB = {"A100-40GB": 40, "A100-80GB": 80, "H100-80GB": 80, "H200": 141, "A10G": 24, "L4": 24,
                 "V100-16GB": 16, "V100-32GB": 32, "T4": 16}
# GPUs (Ray accelerator types / CUDA names) with bf16 support: Ampere and newer
BF16_GPUS = ("A100", "A10G", "A10", "A30", "A40", "L4", "L40", "H100", "H200", "H800", "A800", "B200", "GH200")
PRECISIONS = ("bf16", "fp16", "fp32")


def resolve_precision(requested: str, on_gpu: bool, bf16_supported: Optional[bool] = None) -> str:
    """``deepspeed.precision`` -> the precision a worker trains in: ``auto`` is bf16 on a GPU that supports it
    and fp32 otherwise (CPU, older GPUs, or unknown support). The training loop and the preflight both use this."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"precision {requested!r} is not one of auto, {', '.join(PRECISIONS)}")
        return requested
    return "bf16" if (on_gpu and bf16_supported) else "fp32"


def state_bytes_per_param(stage: int, world: int, precision: str = "bf16") -> float:
    """Bytes per trainable parameter held by one rank at the peak of a step (weights + gradients + optimizer)."""
    n = max(1, world)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} does not exist (0, 1, 2 or 3)")
    if precision == "fp32":
        return {0: 4 + 4 + 8, 1: 4 + 4 + 12 / n, 2: 4 + 16 / n, 3: 20 / n}[stage]
    return {0: 2 + 2 + 12, 1: 2 + 2 + 12 / n, 2: 2 + 14 / n, 3: 20 / n}[stage]


def weight_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(trainable: int, frozen: int, world: int, stage: int, precision: str = "bf16") -> float:
    """Bytes of weights + gradients + optimizer state held by one rank (see the module docstring)."""
    n = max(1, world)
    per = state_bytes_per_param(stage, n, precision)
    frozen_b = frozen * weight_bytes(precision) / (n if stage == 3 else 1)
    return trainable * per + frozen_b


def bucket_bytes(stage: int, precision: str, reduce_bucket_elems: int) -> float:
    """The gradient reduction bucket DeepSpeed allocates during the backward pass (ZeRO 1-3; none under DDP)."""
    return 0.0 if stage == 0 else float(reduce_bucket_elems) * weight_bytes(precision)


def default_bucket_elems(n_trainable: int) -> int:
    """Bucket size (elements) sized to the model: DeepSpeed's 5e8 for big models, never below 5e5, and for the
    rest the trainable parameter count (so a tiny model does not allocate a 5e7-element bucket). A multiple of
    512 (DeepSpeed asserts NCCL start alignment on the allgather bucket)."""
    n = min(500_000_000, max(500_000, int(n_trainable)))
    return -(-n // 512) * 512


@dataclass
class Preflight:
    fits: bool
    need_gb: float
    have_gb: float
    message: str


def preflight(trainable: int, frozen: int, world: int, stage: int, device_gb: float,
              activation_margin: float = 0.35, precision: str = "bf16",
              reduce_bucket_elems: Optional[int] = None) -> Preflight:
    """Compare model-state bytes (+ the reduction bucket, + a margin for activations and buffers) with device
    memory. ``reduce_bucket_elems`` None: :func:`default_bucket_elems` of the trainable count."""
    bucket = default_bucket_elems(trainable) if reduce_bucket_elems is None else reduce_bucket_elems

    def need_of(s: int, w: int) -> float:
        return (model_state_bytes(trainable, frozen, w, s, precision) + bucket_bytes(s, precision, bucket)) / 2**30

    need = need_of(stage, world)
    budget = device_gb * (1 - activation_margin)
    what = f"ZeRO-{stage} x{world} {precision}"
    if need <= budget:
        return Preflight(True, need, device_gb, f"{what}: {need:.1f} GiB model states per GPU "
                         f"of {device_gb:.0f} GiB ({budget:.1f} GiB usable after a {activation_margin:.0%} margin)")
    options = []
    for s in (1, 2, 3):  # the smallest world size at which each ZeRO stage fits
        for w in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            if (s, w) == (stage, world) or (s < stage and w <= world):
                continue
            n_sw = need_of(s, w)
            if n_sw <= budget:
                options.append(f"zero_stage={s} with {w} worker(s) ({n_sw:.1f} GiB)")
                break
    hint = "; would fit: " + ", ".join(options) if options else "; nothing up to 256 workers fits: use LoRA or a smaller model"
    return Preflight(False, need, device_gb,
                     f"does not fit: {what} needs {need:.1f} GiB of model states per GPU but the "
                     f"device has {device_gb:.0f} GiB ({budget:.1f} GiB usable){hint}")
