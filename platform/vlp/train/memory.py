"""Memory preflight: model-state bytes per GPU under DDP / ZeRO 1-3 (ZeRO paper, mixed-precision Adam).

Per trainable parameter: 2 bytes fp16/bf16 weights + 2 bytes gradients + 12 bytes optimizer state
(fp32 master weights, momentum, variance) = 16 bytes under DDP. ZeRO-1 shards the 12 over N ranks
(4 + 12/N), ZeRO-2 also the gradients (2 + 14/N), ZeRO-3 everything (16/N). Frozen parameters cost
their 2-byte weights on every rank (sharded under ZeRO-3).
"""

from __future__ import annotations

from dataclasses import dataclass

GPU_MEMORY_GB = {"A100-40GB": 40, "A100-80GB": 80, "H100-80GB": 80, "H200": 141, "A10G": 24, "L4": 24,
                 "V100-16GB": 16, "V100-32GB": 32, "T4": 16}


def model_state_bytes(trainable: int, frozen: int, world: int, stage: int, weight_bytes: int = 2) -> float:
    """Bytes of weights + gradients + optimizer state held by one rank."""
    n = max(1, world)
    if stage == 0:
        per = 16.0
    elif stage == 1:
        per = 4 + 12 / n
    elif stage == 2:
        per = 2 + 14 / n
    elif stage == 3:
        per = 16 / n
    else:
        raise ValueError(f"ZeRO stage {stage} does not exist (0, 1, 2 or 3)")
    frozen_b = frozen * weight_bytes / (n if stage == 3 else 1)
    return trainable * per + frozen_b


@dataclass
class Preflight:
    fits: bool
    need_gb: float
    have_gb: float
    message: str


def preflight(trainable: int, frozen: int, world: int, stage: int, device_gb: float,
              activation_margin: float = 0.35) -> Preflight:
    """Compare model-state bytes (+ a margin for activations and buffers) with device memory."""
    need = model_state_bytes(trainable, frozen, world, stage) / 2**30
    budget = device_gb * (1 - activation_margin)
    if need <= budget:
        return Preflight(True, need, device_gb, f"ZeRO-{stage} x{world}: {need:.1f} GiB model states per GPU "
                         f"of {device_gb:.0f} GiB ({budget:.1f} GiB usable after a {activation_margin:.0%} margin)")
    options = []
    for s in (1, 2, 3):  # the smallest world size at which each ZeRO stage fits
        for w in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            if (s, w) == (stage, world) or (s < stage and w <= world):
                continue
            n_sw = model_state_bytes(trainable, frozen, w, s) / 2**30
            if n_sw <= budget:
                options.append(f"zero_stage={s} with {w} worker(s) ({n_sw:.1f} GiB)")
                break
    hint = "; would fit: " + ", ".join(options) if options else "; nothing up to 256 workers fits: use LoRA or a smaller model"
    return Preflight(False, need, device_gb,
                     f"does not fit: ZeRO-{stage} x{world} needs {need:.1f} GiB of model states per GPU but the "
                     f"device has {device_gb:.0f} GiB ({budget:.1f} GiB usable){hint}")
