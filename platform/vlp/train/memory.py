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

Offload (read from deepspeed/runtime/zero/stage_1_and_2.py and stage3.py; not measured on a GPU here) moves a
column of that table to host memory: ``offload_optimizer`` the optimizer column (fp32 master, Adam m, v; under
ZeRO-3 its fp32 gradient buffer) plus, under ZeRO-1/2, the fp32 gradient partition DeepSpeed then keeps pinned on
the host (4/N); ``offload_param`` (ZeRO-3) the weight partitions (frozen ones too). The GPU keeps the rest.

:func:`estimate` adds DeepSpeed's gradient reduction bucket (``reduce_bucket_size`` elements in the weight
dtype, held during the backward pass under ZeRO 1-3), under ZeRO-3 the weights it gathers at a time (the
prefetch bucket + one decoder layer), and the activations of one micro-batch (:func:`activation_bytes`).
:func:`preflight` compares the sum with the device memory less a margin for the allocator and the CUDA context,
and recommends what would fit (:func:`recommend`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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


def state_parts(trainable: int, frozen: int, world: int, stage: int, precision: str = "bf16",
                offload_optimizer: bool = False, offload_param: bool = False) -> tuple[dict, float]:
    """Model-state bytes of one rank as ({"weights", "gradients", "optimizer"} on the GPU, bytes on the host):
    :func:`model_state_bytes`'s count split by column, with the offloaded columns moved to the host. Without
    offload the GPU parts sum to :func:`model_state_bytes`."""
    n, w = max(1, world), weight_bytes(precision)
    total = state_bytes_per_param(stage, n, precision)
    weights = w / n if stage == 3 else w
    grads = {0: w, 1: w, 2: w / n, 3: w / n}[stage]
    optim = total - weights - grads  # fp32 master copies, Adam m, v (ZeRO-3: + its fp32 gradient buffer)
    frozen_b = frozen * w / (n if stage == 3 else 1)
    gpu = {"weights": trainable * weights + frozen_b, "gradients": trainable * grads, "optimizer": trainable * optim}
    host = 0.0
    if offload_optimizer and stage >= 1:
        host += gpu["optimizer"] + (trainable * 4 / n if stage < 3 else 0.0)  # ZeRO-1/2: pinned fp32 grad partition
        gpu["optimizer"] = 0.0
    if offload_param and stage == 3:
        host += gpu["weights"]
        gpu["weights"] = 0.0
    return gpu, host


# ----------------------------------------------------------------------------------------------- activations

ATTENTION = ("sdpa", "flash_attention_2", "eager")


@dataclass(frozen=True)
class LMShape:
    """The sizes of a LLaMA-family decoder that its activations scale with (from its Hugging Face config)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, hf_config) -> Optional["LMShape"]:
        """The shape of a LLaMA-style config (hidden_size, num_hidden_layers, intermediate_size,
        num_attention_heads, vocab_size); None for a config that names them otherwise (GPT-2's n_embd, ...),
        whose activations the preflight then does not count."""
        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
        if not all(isinstance(getattr(c, k, None), int) for k in keys):
            return None
        return cls(*(int(getattr(c, k)) for k in keys))

    def layer_params(self) -> int:
        """Weights of one decoder layer (q, k, v, o: 4 h^2, gate, up, down: 3 h f; fewer with grouped k, v)."""
        return 4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate


def layer_bytes_per_token(lm: LMShape, seq_len: int, precision: str, trained: bool, attn: str = "sdpa") -> float:
    """Bytes one decoder layer keeps per token for the backward pass (transformers' LlamaDecoderLayer, counted with
    saved-tensor hooks and checked by bench/train_activation_memory.py), e = 2 or 4 bytes:

    - trained LM: (10 h + 4 f) e: the two RMSNorms' inputs and normalised outputs (4 h), the attention and MLP
      inputs the Linears keep (2 h), q, k, v and the attention output (4 h; k, v at full width, as repeat_kv
      makes them for grouped heads), gate, SiLU(gate), up and their product (4 f);
    - frozen LM (its Linears and norm weights take no gradient): (6 h + 3 f) e;
    - bf16 / fp16: + 2 h e, RMSNorm keeps its input upcast to fp32;
    - attention: sdpa / flash_attention_2 keep a fp32 log-sum-exp per head (4 heads bytes); eager keeps the
      softmax, heads x seq_len per token: fp32 (4 bytes) and, in bf16/fp16, its cast copy too (+ e)."""
    if attn not in ATTENTION:
        raise ValueError(f"attention {attn!r} is not one of {', '.join(ATTENTION)}")
    e, h, f = weight_bytes(precision), lm.hidden, lm.intermediate
    elems = (10 * h + 4 * f) if trained else (6 * h + 3 * f)
    if e < 4:
        elems += 2 * h
    if attn == "eager":
        return elems * e + lm.heads * seq_len * (4 + (e if e < 4 else 0))
    return elems * e + lm.heads * 4


def head_bytes_per_token(lm: LMShape, precision: str, trained: bool) -> float:
    """The final norm (trained: input, normalised output, lm_head input; frozen: input), the logits (e) and the
    loss's fp32 log-softmax (4) per token, plus what the backward pass starts with: the fp32 gradients of the
    log-softmax's output and input (8 bytes per vocabulary entry) and the gradient of the final norm (h e)."""
    e = weight_bytes(precision)
    norm = (4 if trained else 2) * lm.hidden * e + (lm.hidden * e if e < 4 else 0)
    return norm + lm.vocab * (e + 4 + 8)


def activation_bytes(lm: LMShape, micro: int, seq_len: int, precision: str = "bf16", trained: bool = True,
                     checkpointing: bool = False, attn: str = "sdpa") -> float:
    """Peak activation bytes of one micro-batch of ``micro`` samples x ``seq_len`` tokens (visual tokens included)
    in the forward + backward pass (bench/train_activation_memory.py measures it on CPU):

    - without checkpointing: every layer's saved tensors + the head at the start of the backward pass or, with
      eager attention and long sequences, a layer's backward (:func:`backward_bytes_per_token`), whichever is larger;
    - gradient checkpointing keeps each layer's input (h e per token); the peak is then the head at the start of
      the backward pass or, later, one layer recomputed + its backward, whichever is larger."""
    e = weight_bytes(precision)
    layer = layer_bytes_per_token(lm, seq_len, precision, trained, attn)
    head = head_bytes_per_token(lm, precision, trained)
    transient = backward_bytes_per_token(lm, seq_len, precision, attn)
    if checkpointing:
        per_token = lm.layers * lm.hidden * e + max(head, layer + transient)
    else:
        per_token = lm.layers * layer + max(head, transient)
    return float(micro * seq_len * per_token)


def backward_bytes_per_token(lm: LMShape, seq_len: int, precision: str, attn: str = "sdpa") -> float:
    """What a layer's backward pass allocates on top of its saved tensors: the gradients of its MLP activations
    (3 f e) or, with eager attention, those of its softmax (heads x seq_len: the fp32 gradients of the softmax's
    output and input, and in bf16 / fp16 of its cast copy), whichever is larger."""
    e = weight_bytes(precision)
    mlp = 3 * lm.intermediate * e
    if attn == "eager":
        return max(mlp, lm.heads * seq_len * (8 + (e if e < 4 else 0)))
    return mlp


# ------------------------------------------------------------------------------------------ estimate, preflight

GIB = 2 ** 30
MARGIN = 0.10  # allocator fragmentation, the CUDA context, kernel workspaces: what the estimate does not count
MARGIN_NO_ACTIVATIONS = 0.35  # when the LM's shape is unknown and activations are not counted


@dataclass(frozen=True)
class Plan:
    """The settings of a run that change its memory per GPU: what :func:`recommend` varies."""

    stage: int
    world: int
    micro: int = 1
    checkpointing: bool = False
    offload_optimizer: bool = False
    offload_param: bool = False

    def describe(self, work: "Workload") -> str:
        off = [k for k, on in (("optimizer", self.offload_optimizer), ("weights", self.offload_param)) if on]
        tokens = f" x {work.seq_len} tokens" if work.lm else ""
        return (f"ZeRO-{self.stage} x{self.world} {work.precision}, micro-batch {self.micro}{tokens}, gradient "
                f"checkpointing {'on' if self.checkpointing else 'off'}, offload: {' + '.join(off) or 'none'}")

    def overrides(self, base: "Plan") -> list[str]:
        """The config settings (``key=value``, as ``vlp train`` overrides) that turn ``base`` into this plan."""
        keys = {"stage": "deepspeed.zero_stage", "world": "scaling.num_workers", "micro": "batch.micro_size",
                "checkpointing": "model.llm.gradient_checkpointing",
                "offload_optimizer": "deepspeed.offload_optimizer.device", "offload_param": "deepspeed.offload_param.device"}
        out = []
        for f, key in keys.items():
            a, b = getattr(base, f), getattr(self, f)
            if a != b:
                value = ("cpu" if b else "none") if f.startswith("offload") else str(b).lower()
                out.append(f"{key}={value}")
        return out


@dataclass(frozen=True)
class Workload:
    """What a run trains: parameter counts and precision; with ``lm`` (the LM's shape), one sample's length
    (``seq_len``, visual tokens included) for the activations. ``trained_lm``: the LM's weights (or LoRA
    adapters) take gradients; ``can_checkpoint``: gradient checkpointing applies (vlp checkpoints a trained LM).
    ``global_size``: micro-batch sizes :func:`recommend` proposes divide it by the world size."""

    trainable: int
    frozen: int
    precision: str = "bf16"
    lm: Optional[LMShape] = None
    seq_len: int = 2048
    trained_lm: bool = True
    can_checkpoint: bool = True
    attn: str = "sdpa"
    bucket_elems: Optional[int] = None
    prefetch_elems: Optional[int] = None
    global_size: Optional[int] = None


@dataclass(frozen=True)
class Estimate:
    """GiB per GPU by part and GiB of host memory per rank (offloaded states)."""

    weights: float
    gradients: float
    optimizer: float
    bucket: float
    gathered: float
    activations: float
    host: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.bucket + self.gathered + self.activations

    def line(self) -> str:
        parts = [f"{k.replace('_', ' ')} {getattr(self, k):.1f}" for k in
                 ("weights", "gradients", "optimizer", "bucket", "gathered", "activations")
                 if getattr(self, k) >= 0.05 or k in ("weights", "activations")]
        return f"per GPU: {' + '.join(parts)} GiB; host memory per rank: {self.host:.1f} GiB"


def estimate(work: Workload, plan: Plan) -> Estimate:
    """Bytes per GPU of ``plan``: model states (:func:`state_parts`), the reduction bucket, the weights ZeRO-3
    gathers at a time (prefetch bucket + one decoder layer, at most the whole model) and one micro-batch's
    activations (when ``work.lm`` is known)."""
    gpu, host = state_parts(work.trainable, work.frozen, plan.world, plan.stage, work.precision,
                            plan.offload_optimizer, plan.offload_param)
    bucket_elems = work.bucket_elems or default_bucket_elems(work.trainable)
    gathered = 0.0
    if plan.stage == 3:
        prefetch = bucket_elems if work.prefetch_elems is None else work.prefetch_elems
        layer = work.lm.layer_params() if work.lm else 0
        gathered = min(prefetch + layer, work.trainable + work.frozen) * weight_bytes(work.precision)
    act = 0.0
    if work.lm is not None:
        act = activation_bytes(work.lm, plan.micro, work.seq_len, work.precision, work.trained_lm,
                               plan.checkpointing, work.attn)
    return Estimate(gpu["weights"] / GIB, gpu["gradients"] / GIB, gpu["optimizer"] / GIB,
                    bucket_bytes(plan.stage, work.precision, bucket_elems) / GIB, gathered / GIB, act / GIB,
                    host / GIB)


def _micro_sizes(work: Workload, plan: Plan, world: int) -> list[int]:
    """The run's micro-batch size and its halvings down to 1 that keep the global batch (a multiple of micro x
    world; global_size unknown: every halving)."""
    out, m = [], plan.micro
    while m >= 1:
        if work.global_size is None or work.global_size % (m * world) == 0:
            out.append(m)
        m //= 2
    return out


def candidates(work: Workload, plan: Plan, world: int) -> list[Plan]:
    """Plans at ``world`` workers that keep the run's ZeRO stage or raise it, keep its micro-batch or halve it,
    add gradient checkpointing (where it applies) and offload (optimizer from ZeRO-1, weights under ZeRO-3)."""
    stages = range(plan.stage, 4) if plan.stage else range(0, 4)
    ckpts = {plan.checkpointing, plan.checkpointing or (work.can_checkpoint and work.lm is not None)}
    out = []
    for s in stages:
        offloads = [(False, False)] + ([(True, False)] if s >= 1 else []) + ([(True, True)] if s == 3 else [])
        for oo, op in offloads:
            for c in ckpts:
                for m in _micro_sizes(work, plan, world):
                    out.append(Plan(s, world, m, c, oo, op))
    return out


def plan_cost(p: Plan) -> tuple:
    """What a plan costs, least first: offloading weights, then the optimizer (host copies every step), ZeRO-3
    (gathers every layer), gradient checkpointing (a third more compute), a smaller micro-batch, a higher stage."""
    return (p.offload_param, p.offload_optimizer, p.stage == 3, p.checkpointing, -p.micro, p.stage, p.world)


def recommend(work: Workload, plan: Plan, usable_gb: float) -> Optional[tuple[Plan, Estimate]]:
    """The cheapest plan (:func:`plan_cost`) that fits ``usable_gb`` at the run's world size, else at the smallest
    larger one (x2 steps up to 256); None when nothing fits."""
    worlds = [plan.world] + [w for w in (2, 4, 8, 16, 32, 64, 128, 256) if w > plan.world]
    for w in worlds:
        fits = [(p, e) for p in candidates(work, plan, w) for e in [estimate(work, p)] if e.total <= usable_gb]
        if fits:
            return min(fits, key=lambda pe: plan_cost(pe[0]))
    return None


def max_micro(work: Workload, plan: Plan, usable_gb: float) -> Optional[int]:
    """The largest micro-batch that fits with the plan's other settings (activations grow linearly with it);
    None when activations are not counted, 0 when not even one sample fits."""
    if work.lm is None:
        return None
    one = estimate(work, replace(plan, micro=1))
    per_sample = one.activations
    return max(0, int((usable_gb - (one.total - per_sample)) // per_sample)) if per_sample else None


@dataclass
class Preflight:
    fits: bool
    need_gb: float
    have_gb: float
    message: str
    usable_gb: float = 0.0
    plan: Optional[Plan] = None
    parts: Optional[Estimate] = None
    fix: Optional[Plan] = None
    max_micro: Optional[int] = None

    @property
    def states_fit(self) -> bool:
        """Whether all but the activations fit (the model states, buckets, ZeRO-3's gathered weights)."""
        return self.parts is None or self.parts.total - self.parts.activations <= self.usable_gb

    def to_json(self) -> dict:
        """The same numbers, machine-readable (the run folder's preflight.json)."""
        return {"fits": self.fits, "states_fit": self.states_fit, "need_gib": round(self.need_gb, 3), "device_gib": self.have_gb,
                "usable_gib": round(self.usable_gb, 3), "plan": asdict(self.plan) if self.plan else None,
                "per_gpu_gib": {k: round(v, 3) for k, v in asdict(self.parts).items() if k != "host"}
                if self.parts else None, "host_gib_per_rank": round(self.parts.host, 3) if self.parts else None,
                "largest_micro_batch": self.max_micro, "recommended": asdict(self.fix) if self.fix else None}


def preflight(work: Workload, plan: Plan, device_gb: float, margin: Optional[float] = None) -> Preflight:
    """Compare :func:`estimate` of ``plan`` with ``device_gb`` less ``margin`` (default :data:`MARGIN`, or
    :data:`MARGIN_NO_ACTIVATIONS` when ``work.lm`` is unknown); when it does not fit, :func:`recommend` what
    would. The message is the report ``vlp train`` prints: a verdict line and a breakdown line."""
    margin = (MARGIN if work.lm is not None else MARGIN_NO_ACTIVATIONS) if margin is None else margin
    usable = device_gb * (1 - margin)
    est = estimate(work, plan)
    biggest = max_micro(work, plan, usable)
    head = (f"{plan.describe(work)}: {est.total:.1f} GiB per GPU of {device_gb:.3g} GiB ({usable:.1f} GiB usable "
            f"after a {margin:.0%} margin)")
    if est.total <= usable:
        notes = [f"the largest micro-batch that fits: {biggest}"] if biggest is not None else []
        if plan.checkpointing and estimate(work, replace(plan, checkpointing=False)).total <= usable:
            notes.append("it fits without gradient checkpointing too (saves its recompute)")
        text = f"fits: {head}\n  {est.line()}" + (f"\n  {'; '.join(notes)}" if notes else "")
        return Preflight(True, est.total, device_gb, text, usable, plan, est, None, biggest)
    fix = recommend(work, plan, usable)
    hint = (f"would fit: {' '.join(fix[0].overrides(plan))} ({fix[1].total:.1f} GiB per GPU"
            f"{f', {fix[1].host:.1f} GiB host memory per rank' if fix[1].host else ''})" if fix else
            "nothing up to 256 workers fits: use LoRA or a smaller model")
    return Preflight(False, est.total, device_gb, f"does not fit: {head}\n  {est.line()}\n  {hint}", usable, plan,
                     est, fix[0] if fix else None, biggest)
