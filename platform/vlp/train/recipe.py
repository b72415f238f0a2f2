"""The per-worker training recipe: one object whose named steps are what a Ray Train worker runs.

:class:`TrainRecipe` (torchtune style): ``setup`` (device, precision, model, optimizer, scheduler, DeepSpeed
engine) -> ``restore`` (step, epoch and how far the epoch got, :mod:`vlp.train.progress`, from the Ray Train
checkpoint) -> per epoch ``epoch_stream`` (this worker's split as length-grouped micro-batches of /2 rows: per-item
features, less what the checkpoint's epoch consumed) -> per optimizer step ``next_group`` + ``train_step``
(grad_accum micro-batches: forward, backward, step; a :class:`StepStats`) -> ``log`` (metrics by name from the
values summed over ranks, :class:`Reduced`) -> ``save`` (checkpoint + vlp_state.json through
``ray.train.report``) -> ``export`` (ZeRO-3 gather, probe logits, export_model, train_summary.json).

The pieces that need neither Ray nor a process group are module functions (:func:`micro_batches`,
:func:`take_group`, :func:`batch_inputs`, :func:`run_step`, :func:`step_metrics`) so that tests and the
benchmarks (bench/train_*.py) call the same code. Imports: torch, numpy, DeepSpeed and Ray Train (inside the
methods that need them), vlp.train.{config,data,held,memory,progress}, vlp.formats.export, vlp.storage.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from ..storage import Appender, StorageConfig, get_fs, put_file_atomic, read_bytes, write_atomic
from .config import OptimConfig, TrainConfig
from .data import EpochUnits, iter_rows, length_grouped, padding_fraction, write_state
from .held import HeldRows
from .memory import default_bucket_elems, resolve_precision
from .progress import EpochState, PartProgress, done_units, open_uids

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
    for key in ("offload_optimizer", "offload_param"):  # only when set: the config of runs without stays as it was
        off = getattr(ds, key)
        if off.device != "none":
            zero[key] = {"device": off.device, "pin_memory": off.pin_memory,
                         **({"nvme_path": off.nvme_path} if off.nvme_path else {})}
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


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # optim.schedule -> HF's


def warmup_steps(total: int, warmup_ratio: float) -> int:
    """Warmup steps as the Hugging Face Trainer counts them (LLaVA's ``--warmup_ratio``): ceil(total x ratio)."""
    return math.ceil(total * warmup_ratio)


def lr_scheduler(opt, total: int, warmup_ratio: float, schedule: str):
    """transformers' ``get_scheduler`` for ``optim.schedule``: a LambdaLR over ``total`` optimizer steps, linear warmup
    from 0 over :func:`warmup_steps`, then cosine or linear decay to 0, or constant."""
    from transformers import get_scheduler

    return get_scheduler(SCHEDULES[schedule], opt, num_warmup_steps=warmup_steps(total, warmup_ratio),
                         num_training_steps=total)


def build_model(cfg: TrainConfig, load_init: bool = True):
    """VideoLLM of the run (connector from ``init_from``, LoRA adapters when enabled), before DeepSpeed, in
    training mode: ``from_pretrained`` hands the LLM and the tower over in eval mode, where transformers skips
    activation checkpointing (and dropout)."""
    from ..formats.export import load_connector
    from ..models.videollm import VideoLLM

    model = VideoLLM(cfg.model)
    if load_init and cfg.model.connector.init_from:
        load_connector(model.connector, cfg.model.connector.init_from)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model.llm = get_peft_model(model.llm, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                         lora_dropout=cfg.lora.dropout,
                                                         target_modules=cfg.lora.target_modules))
    return model.train()


def param_groups(model, optim: OptimConfig) -> list[dict]:
    """AdamW parameter groups, one per part (the model's top-level modules: llm, connector) holding its
    trainable parameters, at the part's ``optim.lr_by_part`` rate or ``optim.lr``."""
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.split(".", 1)[0], []).append(p)
    return [{"params": ps, "lr": optim.lr_by_part.get(part, optim.lr)} for part, ps in groups.items()]


def make_optimizer(groups: list[dict], cfg: TrainConfig):
    """AdamW over ``groups``; with ``deepspeed.offload_optimizer`` DeepSpeed's CPU AdamW (DeepSpeed refuses a torch
    optimizer under offload: its step would run on host tensors one Python loop at a time). DeepSpeedCPUAdam is a
    C++ op that DeepSpeed builds on first use (about 2 min on 2 cores) and caches under TORCH_EXTENSIONS_DIR."""
    import torch

    o = cfg.optim
    if cfg.deepspeed.offload_optimizer.device != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def peak_flops(device) -> Optional[float]:
    """Dense bf16 peak of a known GPU (``PEAK_FLOPS``); None on CPU or an unknown device (MFU is then null)."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# --------------------------------------------------------------------------- pieces without Ray or a process group

@dataclass
class Counters:
    """What a worker left out: samples skipped at tokenisation (by reason) and rows dropped at epoch tails."""

    skipped: dict = field(default_factory=dict)
    tail_dropped: int = 0


def micro_batches(rows: Iterator[dict], micro: int, window: int, rng: np.random.Generator, group_by_length: bool,
                  group_by_modality: bool, counters: Counters) -> Iterator[list[dict]]:
    """The worker's stream of micro-batches: rows marked ``skip`` are counted and left out, the rest fill windows
    of ``window`` rows that :func:`vlp.train.data.length_grouped` cuts into micro-batches of ``micro``; the last,
    partial window is grouped too and its remainder (fewer than ``micro`` rows) counted as tail-dropped."""
    buf: list[dict] = []
    for r in rows:
        if r["skip"]:
            counters.skipped[r["skip"]] = counters.skipped.get(r["skip"], 0) + 1
            continue
        buf.append(r)
        if len(buf) >= window:
            yield from length_grouped(buf, micro, rng, group_by_length, group_by_modality)
            buf = []
    if buf:
        mbs = length_grouped(buf, micro, rng, group_by_length, group_by_modality)
        counters.tail_dropped += len(buf) - micro * len(mbs)
        yield from mbs


def watch_skips(rows: Iterator[dict], out: list) -> Iterator[dict]:
    """The rows unchanged; (unit, uid) of each row marked ``skip`` appended to ``out`` as it passes. A skipped
    row is consumed when it is read (it is skipped again wherever it streams), so the resume state counts it with
    the rows trained on: a part is done when every row of it was one or the other."""
    for r in rows:
        if r["skip"]:
            out.append((str(r.get("unit", "")), str(r["uid"])))
        yield r


def take_group(stream: Iterator[list[dict]], accum: int) -> list[list[dict]]:
    """Up to ``accum`` micro-batches from the stream (fewer at its end: the caller drops a partial group)."""
    group = []
    for _ in range(accum):
        mb = next(stream, None)
        if mb is None:
            break
        group.append(mb)
    return group


def row_features(row: dict, device, dtype) -> Optional[list]:
    """A tokenised /2 row's features: one tensor per media item (stored fp16 bytes -> its ``shape``, e.g. (264, D)
    Valley-pooled or (T, 1 + P, D) frames, on ``device`` in ``dtype``), None for a text-only row."""
    import torch

    from ..formats.featureset import decode_features

    feats = [torch.from_numpy(decode_features(b, s).copy()).to(device, dtype)  # (P + T, D) or (T, 1 + P, D)
             for b, s in zip(row["features"], row["shape"])]
    return feats or None


def batch_inputs(mb: list[dict], device, dtype) -> tuple:
    """The VideoLLM forward's arguments for one micro-batch of tokenised /2 rows: input_ids, labels (1-D int64
    each), features (per row a list of tensors, one per media item, or None for a text-only row,
    :func:`row_features`), modes (one per row), num_frames and modalities (per row a list, one per item)."""
    import torch

    return ([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
            [row_features(r, device, dtype) for r in mb], [str(r["mode"]) for r in mb],
            [[int(t) for t in r["num_frames"]] for r in mb], [[str(m) for m in r["modalities"]] for r in mb])


@dataclass(frozen=True)
class StepStats:
    """One optimizer step on one rank."""

    loss: float            # mean of the micro-batch losses
    tokens: int            # sequence tokens (text + visual) trained on
    samples: int
    data_wait_s: float     # waiting for the group's micro-batches
    compute_s: float       # forward + backward + optimizer step of every micro-batch
    padding_frac: float    # padded share of the group's micro-batches
    uids: list[str]


def run_step(engine, group: list[list[dict]], device, dtype, data_wait_s: float = 0.0) -> StepStats:
    """One optimizer step over ``group`` (grad_accum micro-batches): per micro-batch forward, ``engine.backward``
    and ``engine.step`` (DeepSpeed steps the optimizer at the accumulation boundary). ``engine`` is a DeepSpeed
    engine or anything with the same three calls (the benchmarks' plain PyTorch baseline)."""
    t1 = time.perf_counter()
    loss_sum, tokens = 0.0, 0
    for mb in group:
        out = engine(*batch_inputs(mb, device, dtype))
        engine.backward(out.loss)
        engine.step()
        loss_sum += float(out.loss.detach())
        tokens += sum(int(r["length"]) for r in mb)
    compute_s = time.perf_counter() - t1
    return StepStats(loss=loss_sum / len(group), tokens=tokens, samples=sum(len(mb) for mb in group),
                     data_wait_s=data_wait_s, compute_s=compute_s, padding_frac=padding_fraction(group),
                     uids=[str(r["uid"]) for mb in group for r in mb])


@dataclass(frozen=True)
class Reduced:
    """StepStats summed over the ranks: one float64 all_reduce of :meth:`vector`, read back by field name."""

    loss: float
    tokens: float
    samples: float
    data_wait_s: float
    compute_s: float
    padding_frac: float

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def of(cls, s: StepStats) -> "Reduced":
        return cls(**{k: float(getattr(s, k)) for k in cls.fields()})

    def vector(self) -> list[float]:
        return [getattr(self, k) for k in self.fields()]

    @classmethod
    def from_vector(cls, v) -> "Reduced":
        return cls(**{k: float(x) for k, x in zip(cls.fields(), v)})


@dataclass(frozen=True)
class ModelSize:
    """What MFU needs: parameter counts (before ZeRO-3 partitions them) and the device's peak FLOP/s."""

    total: int
    trainable: int
    peak_flops: Optional[float] = None


def report_due(since_s: float, interval_s: float) -> bool:
    """Whether a step's metrics go to ``ray.train.report`` now: ``interval_s`` seconds of training (0: every time)
    since the last report. Ray Train V2 keeps one unconsumed report per worker (a queue of size 1) and its
    controller takes it when it polls the workers, every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``); a report
    made before that blocks the step, so reporting every step capped training at one step per poll (measured:
    2.05 s per step of 0.36 s compute, docs/training.md)."""
    return since_s >= interval_s


def step_metrics(step: int, epoch: int, red: Reduced, world: int, wall_s: float, lr: float, size: ModelSize,
                 peak_mem_bytes: int, now: float) -> dict:
    """The metrics.jsonl record of a step. ``red`` sums every rank's stats; ``wall_s`` is the slowest rank's end
    to end step time (data wait, compute, the previous step's logging and checkpoint)."""
    dt, dt_c = wall_s, red.compute_s / world
    busy = red.data_wait_s + red.compute_s
    flops = (4 * size.total + 2 * size.trainable) * red.tokens  # fwd 2N + act-grad 2N + weight-grad 2N_train
    return {
        "step": step, "epoch": epoch, "loss": red.loss / world, "lr": lr,
        "tokens_per_s": red.tokens / dt if dt else 0.0, "samples_per_s": red.samples / dt if dt else 0.0,
        "compute_tokens_per_s": red.tokens / dt_c if dt_c else 0.0,
        "compute_samples_per_s": red.samples / dt_c if dt_c else 0.0,
        "step_wall_s": dt, "data_wait_s": red.data_wait_s / world, "compute_s": dt_c,
        "data_wait_frac": red.data_wait_s / busy if busy else 0.0,
        "padding_frac": red.padding_frac / world,
        "mfu": (flops / dt / world / size.peak_flops) if (size.peak_flops and dt) else None,
        "peak_mem_bytes": int(peak_mem_bytes), "time": now,
    }


def merge_counters(counts: list[dict]) -> tuple[dict, int]:
    """(skipped by reason, tail-dropped rows) over every rank's :class:`Counters` (as dicts)."""
    skipped: dict = {}
    for c in counts:
        for k, v in c["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return skipped, sum(c["tail_dropped"] for c in counts)


def probe_of(row: dict) -> dict:
    """A fixed export-check input from a tokenised /2 row (train_summary.json ``probe``: seeded features of each
    item's ``shape``, so ``shape`` is a list of shapes and ``num_frames`` and ``modalities`` lists, [] for a
    text-only row)."""
    return {"input_ids": [int(x) for x in row["input_ids"]], "shape": [[int(x) for x in s] for s in row["shape"]],
            "mode": str(row["mode"]), "num_frames": [int(t) for t in row["num_frames"]],
            "modalities": [str(m) for m in row["modalities"]], "seed": 0}


class RunLogs:
    """Rank 0's per-step logs: metrics.jsonl and samples.jsonl through :class:`vlp.storage.Appender` (object
    stores get buffered parts, see :func:`vlp.storage.read_appended`), plus TensorBoard: written in the run folder,
    or for a run folder on an object store, in a local folder whose event files are uploaded to the run folder's
    tensorboard/ at each flush (checkpoint) and at the end. Every byte goes up once there too: each upload closes
    the event file and the next steps go to a new one (TensorBoard reads a folder's event files as one run)."""

    def __init__(self, run_dir: str, tensorboard: bool, storage: Optional[StorageConfig] = None):
        self.metrics = Appender(f"{run_dir}/metrics.jsonl", storage)
        self.samples = Appender(f"{run_dir}/samples.jsonl", storage)
        self.tb, self.tb_local, self.tb_remote, self.uploads = None, None, None, 0
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if "://" in run_dir:
                self.tb_local, self.tb_remote = tempfile.mkdtemp(prefix="vlp-tb-"), (f"{run_dir}/tensorboard", storage)
            self.tb = SummaryWriter(self.tb_local or f"{run_dir}/tensorboard")

    def sync_tensorboard(self, reopen: bool = True) -> None:
        """Upload the event file of a run folder on an object store: closed, uploaded whole, deleted here; with
        ``reopen`` the next steps go to a new event file (so no upload repeats an earlier one's bytes)."""
        if self.tb is None or self.tb_remote is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.tb.close()
        for name in sorted(os.listdir(self.tb_local)):
            path = os.path.join(self.tb_local, name)
            put_file_atomic(path, f"{self.tb_remote[0]}/{self.upload_name(name)}", self.tb_remote[1])
            os.remove(path)
        self.tb = SummaryWriter(self.tb_local) if reopen else None

    def upload_name(self, name: str) -> str:
        """``events.out.tfevents.<time>.<n>.<rest>``: the n-th upload of this attempt after the writer's start time,
        so that the files sort in the order they were written (TensorBoard reads a folder's files in name order;
        the writer's own names put a counter after the host name, where 10 sorts before 9)."""
        head = "events.out.tfevents."
        stamp, rest = name[len(head):].split(".", 1) if name.startswith(head) else ("0", name)
        self.uploads += 1
        return f"{head}{stamp}.{self.uploads:06d}.{rest}"

    def write(self, metrics: dict, uids: list[str]) -> None:
        self.metrics.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"train/{k}", v, metrics["step"])
        self.samples.write(json.dumps({"step": metrics["step"], "uids": uids}) + "\n")

    def flush(self) -> None:
        self.metrics.flush()
        self.samples.flush()
        self.sync_tensorboard()

    def close(self) -> None:
        if self.tb is not None:
            self.sync_tensorboard(reopen=False)
        if self.tb is not None:  # a local run folder's writer
            self.tb.close()
            self.tb = None
        if self.tb_local is not None:
            shutil.rmtree(self.tb_local, ignore_errors=True)
        self.metrics.close()
        self.samples.close()


def say(line: str) -> None:
    """A progress line of rank 0 on stdout. Not ``print``: Ray Train patches it in its workers to also log through
    the root logger, whose console handler prints the line a second time."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def flat_config(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 2e-5}} -> {"optim.lr": 2e-5} (lists as their JSON text): MLflow params."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


# --------------------------------------------------------------------------------------------------- the recipe

class TrainRecipe:
    """One worker's training run. ``run()`` calls the steps in order; each is a method to read, test or
    override (a subclass that changes one step keeps the others): see docs/training.md "The recipe"."""

    def __init__(self, cfg: TrainConfig, meta: dict, rank: int = 0, world: int = 1):
        self.cfg, self.meta, self.rank, self.world = cfg, meta, rank, world
        self.run_dir, self.state_path = meta["run_dir"], meta["state_path"]
        self.step, self.start_epoch, self.done = 0, 0, False
        self.metrics: dict = {}
        self.probe_row: Optional[dict] = None
        self.counters = Counters()
        self.epoch_base = Counters()  # the counters at the current epoch's start
        self.resume: Optional[EpochState] = None  # the checkpoint's epoch (start_epoch), until it was trained
        self.epoch_state = self.fresh_state()  # how far the current epoch got (see vlp.train.progress)
        self.pending: list[tuple[str, str]] = []  # (unit, uid) consumed on this rank since the last checkpoint
        self.progress: Optional[PartProgress] = None  # rank 0, streaming epoch: the parts' account
        self.seen_set: set[str] = set()  # rank 0, epoch in "seen" mode: the uids consumed
        self.logs: Optional[RunLogs] = None
        self.in_ray_train = False  # set by from_ray: a Ray Train worker, where ray.train.report works
        self.mlflow = None  # rank 0's MLflow module when tracking.mlflow is set (start_tracking)
        self.since_report = 0.0  # seconds of training since the last ray.train.report (the same on every rank)
        self.held: Optional[HeldRows] = None  # the held sets' blocks, fetched at the first epoch

    @classmethod
    def from_ray(cls, config: dict) -> "TrainRecipe":
        """The recipe of this Ray Train worker (``config`` = the TorchTrainer's train_loop_config)."""
        import ray.train

        ctx = ray.train.get_context()
        recipe = cls(TrainConfig.model_validate(config["cfg"]), config["meta"], ctx.get_world_rank(),
                     ctx.get_world_size())
        recipe.in_ray_train = True  # ray.train.report works (a recipe run in a test's process has no session)
        return recipe

    def run(self) -> None:
        self.setup()
        self.restore()
        if self.rank == 0:
            self.logs = RunLogs(self.run_dir, self.cfg.tensorboard)
        self.start_tracking()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.done:
                break
            self.train_epoch(epoch)
        if self.logs is not None:
            self.logs.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
        counts = self.gather_counters()
        self.save(self.cfg.epochs, final=True)
        self.export(counts)

    # ------------------------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Device, precision, model, AdamW, the LR schedule and the DeepSpeed engine."""
        import deepspeed
        import torch

        cfg = self.cfg
        torch.manual_seed(cfg.data.seed)
        if torch.cuda.is_available() and cfg.scaling.use_gpu:
            import ray.train.torch

            self.device = torch.device("cuda", ray.train.torch.get_device().index or 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        cuda = self.device.type == "cuda"
        self.precision = resolve_precision(cfg.deepspeed.precision, cuda, cuda and torch.cuda.is_bf16_supported())
        self.feat_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]
        model = build_model(cfg)
        groups = param_groups(model, cfg.optim)
        n_trainable = sum(p.numel() for g in groups for p in g["params"])
        n_total = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them (numel 0 after)
        self.size = ModelSize(n_total, n_trainable, peak_flops(self.device))
        opt = make_optimizer(groups, cfg)
        sched = lr_scheduler(opt, self.meta["total_steps"], cfg.optim.warmup_ratio, cfg.optim.schedule)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, self.precision, n_trainable))

    def restore(self) -> None:
        """Step, epoch, how far that epoch got (:class:`vlp.train.progress.EpochState`, a checkpoint of an older
        format included), the counters and the DeepSpeed state, from the Ray Train checkpoint when there is one
        (a restart after a failure, or the same run started again)."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                self.engine.load_checkpoint(d, tag="state", load_module_strict=False)
                self.restore_state(json.loads(open(os.path.join(d, "vlp_state.json")).read()))
            if self.rank == 0:
                say(f"[vlp] resumed from step {self.step} (epoch {self.start_epoch}, {self.resume.describe()})")
        self.done = self.done or self.reached_max_steps()

    def restore_state(self, st: dict) -> None:
        """Step, epoch, final, the epoch's state and the counters of a vlp_state.json."""
        self.step, self.start_epoch = st["step"], st["epoch"]
        self.resume = EpochState.from_json(st)
        self.done = bool(st.get("final"))
        c = self.resume.counters
        if c and self.rank == 0:  # summed over the ranks: rank 0 carries them on, the others start at 0
            self.counters = Counters(dict(c["skipped"]), int(c["tail_dropped"]))

    # ------------------------------------------------------------------------------------------------ data

    def fresh_state(self) -> EpochState:
        return EpochState(mode="held" if self.meta.get("held") else "stream", world=self.world)

    def begin_epoch(self, epoch: int) -> EpochState:
        """The state the epoch continues from: the checkpoint's, for the epoch it was taken in, else a fresh one.
        What this run cannot continue as it is becomes the uids consumed ("seen" mode, for this epoch): a held
        checkpoint of another world size (replayed) or a streaming one on the held path. Sets rank 0's account."""
        held = bool(self.meta.get("held"))
        st, r = self.fresh_state(), (self.resume if epoch == self.start_epoch else None)
        if r is not None and r.started():
            if r.mode == "seen" or (r.mode == "stream" and not held) or (r.mode == "held" and held
                                                                          and r.world == self.world):
                st = r
            elif r.mode == "held" and held:
                st = EpochState(mode="seen", steps=r.steps, seen=self.replay_held(epoch, r))
            elif r.mode == "stream":
                st = EpochState(mode="seen", steps=r.steps, seen=self.stream_uids(epoch, r.parts))
            else:  # the driver refuses this before any worker starts (vlp.train.trainer.resume_problem)
                raise RuntimeError("a held epoch's checkpoint cannot be resumed on the streaming data path")
        st.world = self.world
        self.epoch_state = st
        self.pending.clear()
        self.epoch_base = Counters(dict(self.counters.skipped), self.counters.tail_dropped)
        if self.rank == 0:
            units = EpochUnits(self.cfg.data.sets, self.meta.get("parts") or [], self.cfg.data.seed, epoch)
            self.progress = PartProgress(units, st.parts) if st.mode == "stream" else None
            self.seen_set = set(st.seen)
        return st

    def epoch_stream(self, epoch: int) -> Iterator[list[dict]]:
        """This worker's split of the epoch as length-grouped micro-batches, less what the checkpoint's epoch
        consumed: from the held sets' seeded plan (:mod:`vlp.train.held`; a "held" state's steps are replayed,
        not trained on), or from Ray Train's streaming split of the data graph, for which rank 0 first writes
        the data state (epoch + what was consumed) that the graph's Mixture and DropSeen read."""
        import torch.distributed as dist

        cfg = self.cfg
        st = self.begin_epoch(epoch)
        if self.rank == 0:
            write_state(self.state_path, epoch, st.seen if st.mode == "seen" else None,
                        st.parts if st.mode == "stream" else None)
        dist.barrier()
        salt = {"seen": len(st.seen), "stream": st.steps, "held": 0}[st.mode]  # held: the epoch's stream again
        rng = np.random.default_rng([cfg.data.seed, epoch, self.rank, salt])
        if self.meta.get("held"):
            rows = self.held_rows(epoch, self.rank, self.world, set(st.seen))
        else:
            rows = self.stream_rows(rng)
        stream = self.micro_stream(watch_skips(rows, self.pending), rng, self.counters)
        if st.mode == "held":
            for _ in itertools.islice(stream, st.steps * cfg.batch.grad_accum):
                pass  # trained on before the checkpoint
        return stream

    def micro_stream(self, rows: Iterator[dict], rng: np.random.Generator, counters: Counters):
        cfg = self.cfg
        micro, accum = cfg.batch.micro_size, cfg.batch.grad_accum
        return micro_batches(rows, micro, micro * accum * cfg.data.group_window, rng, cfg.data.group_by_length,
                             cfg.data.group_by_modality, counters)

    def held_rows(self, epoch: int, rank: int, world: int, seen: set[str]) -> Iterator[dict]:
        """Rank ``rank``'s rows of the held epoch plan (of ``world`` ranks), less ``seen``."""
        if self.held is None:
            self.held = HeldRows(self.meta["held"])
        return self.held.rows(self.held.plan(self.cfg.data.seed, epoch, seen, rank, world))

    def replay_held(self, epoch: int, r: EpochState) -> list[str]:
        """The uids that a held epoch's first ``r.steps`` steps consumed on ``r.world`` ranks: each of those
        ranks' streams rebuilt and its first steps x grad_accum micro-batches taken, with the rows skipped at
        tokenisation on the way (their count goes to rank 0's counters: they will not stream again)."""
        out: list[str] = []
        counters = Counters()
        for rank in range(r.world):
            skipped: list = []
            rng = np.random.default_rng([self.cfg.data.seed, epoch, rank, 0])
            stream = self.micro_stream(watch_skips(self.held_rows(epoch, rank, r.world, set()), skipped), rng,
                                       counters)
            for mb in itertools.islice(stream, r.steps * self.cfg.batch.grad_accum):
                out += [str(x["uid"]) for x in mb]
            out += [uid for _, uid in skipped]
        if self.rank == 0:
            for k, v in counters.skipped.items():
                self.counters.skipped[k] = self.counters.skipped.get(k, 0) + v
        return out

    def stream_uids(self, epoch: int, parts: dict) -> list[str]:
        """The uids a streaming epoch's state (:meth:`PartProgress.state`) says were consumed: every row of the
        done units and the rows at the open units' positions (their parts' uid columns read)."""
        units = EpochUnits(self.cfg.data.sets, self.meta["parts"], self.cfg.data.seed, epoch)
        out = [u for unit, ranges in parts.get("open", {}).items() for u in open_uids(units.uids(unit), ranges)]
        for unit in sorted(done_units(parts.get("done", {}))):
            out += units.uids(unit)
        return out

    def stream_rows(self, rng: np.random.Generator) -> Iterator[dict]:
        """Rows of this worker's streaming split (``get_dataset_shard``), through Ray Data's local shuffle."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        buf_n = self.cfg.data.local_shuffle_buffer_size
        return iter_rows(shard.iter_batches(  # the shuffle reorders; which samples an epoch holds is DropSeen's
            batch_size=64, batch_format="numpy", prefetch_batches=2, local_shuffle_buffer_size=buf_n or None,
            local_shuffle_seed=int(rng.integers(2**31)) if buf_n else None))

    def next_group(self, stream: Iterator[list[dict]]) -> tuple[Optional[list[list[dict]]], float]:
        """(the next grad_accum micro-batches, seconds waited for them), or (None, ...) when any rank has run out
        (all ranks stop together; the rows of a partial group are counted as tail-dropped)."""
        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        group = take_group(stream, self.cfg.batch.grad_accum)
        data_wait_s = time.perf_counter() - t0
        flag = torch.tensor([1 if len(group) == self.cfg.batch.grad_accum else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            self.counters.tail_dropped += sum(len(mb) for mb in group)
            return None, data_wait_s
        return group, data_wait_s

    # ------------------------------------------------------------------------------------------------ steps

    def train_epoch(self, epoch: int) -> None:
        """Steps over the epoch's stream until it ends or max_steps; logs, checkpoints and fault injection."""
        stream = self.epoch_stream(epoch)
        t_mark = time.perf_counter()  # end-to-end step time runs from here to the same point after each step
        while True:
            group, data_wait_s = self.next_group(stream)
            if group is None:
                break
            stats = self.train_step(group, data_wait_s)
            self.consumed(group)
            t_mark = self.log(stats, epoch, t_mark)
            self.inject_failure()
            self.done = self.reached_max_steps()
            if self.step % self.cfg.checkpoint.every_n_steps == 0 and not self.done:
                self.save(epoch)
            if self.done:
                break
        self.end_epoch()

    def consumed(self, group: list[list[dict]]) -> None:
        """A group trained on: one more step of the epoch, and (but for held epochs, where the steps say which
        rows) its rows pending for the next checkpoint."""
        self.epoch_state.steps += 1
        if self.epoch_state.mode != "held":
            self.pending.extend((str(r.get("unit", "")), str(r["uid"])) for mb in group for r in mb)

    def end_epoch(self) -> None:
        """The epoch's resume state dropped: what follows (the next epoch, the final checkpoint) starts fresh."""
        self.resume, self.epoch_state, self.progress, self.seen_set = None, self.fresh_state(), None, set()
        self.pending.clear()
        self.epoch_base = Counters(dict(self.counters.skipped), self.counters.tail_dropped)

    def train_step(self, group: list[list[dict]], data_wait_s: float = 0.0) -> StepStats:
        """One optimizer step over ``group`` (see :func:`run_step`); the first group's first row becomes the
        export probe."""
        stats = run_step(self.engine, group, self.device, self.feat_dtype, data_wait_s)
        if self.probe_row is None:
            self.probe_row = probe_of(group[0][0])
        self.step += 1
        return stats

    def log(self, stats: StepStats, epoch: int, t_mark: float) -> float:
        """Sum the step's stats over ranks, build the metrics record by name, and on rank 0 append it (and the
        step's uids from every rank) to the run's logs. Returns the new end-to-end time mark."""
        import torch
        import torch.distributed as dist

        vec = torch.tensor(Reduced.of(stats).vector(), dtype=torch.float64)
        dist.all_reduce(vec)
        wall = torch.tensor([time.perf_counter() - t_mark], dtype=torch.float64)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)  # the slowest rank sets the step time
        self.since_report += wall.item()  # summed from reduced values: every rank decides the same (report)
        t_mark = time.perf_counter()
        lr = self.cfg.optim.lr * self.sched.get_last_lr()[0] / self.sched.base_lrs[0]  # optim.lr, scheduled
        self.metrics = step_metrics(self.step, epoch, Reduced.from_vector(vec.tolist()), self.world, wall.item(),
                                    lr, self.size, self.peak_mem(), time.time())
        all_uids: list = [None] * self.world
        dist.all_gather_object(all_uids, stats.uids)
        self.report()
        if self.rank == 0:
            self.logs.write(self.metrics, sum(all_uids, []))
            if self.step % self.cfg.log_every == 0:
                m = self.metrics
                say(f"[vlp] step {self.step}/{self.meta['total_steps']} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                    f"{m['samples_per_s']:.1f} samples/s pad {m['padding_frac']:.1%} "
                    f"data-wait {m['data_wait_frac']:.0%}")
        return t_mark

    def report(self) -> None:
        """Every ``tracking.report_every`` steps, every rank: the step's metrics through ``ray.train.report`` (no
        checkpoint) when ``tracking.report_interval_s`` of training passed since the last one (see
        :func:`report_due`) and no checkpoint follows at this step (its report carries the metrics: a second report
        would wait for Ray's controller to take the first), and on rank 0 to MLflow when configured."""
        if self.step % self.cfg.tracking.report_every:
            return
        if self.in_ray_train and report_due(self.since_report, self.cfg.tracking.report_interval_s) \
                and not self.saves_now():
            self.send_report(dict(self.metrics))
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in self.metrics.items()
                                     if isinstance(v, (int, float)) and k not in ("step", "time")}, step=self.step)

    def saves_now(self) -> bool:
        """Whether this step ends with a checkpoint (:meth:`save`): every ``checkpoint.every_n_steps``, and the
        final one after ``max_steps``."""
        return self.step % self.cfg.checkpoint.every_n_steps == 0 or self.reached_max_steps()

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def send_report(self, metrics: dict, **kw) -> None:
        """``ray.train.report`` (``kw``: its checkpoint); the report interval starts over."""
        import ray.train

        ray.train.report(metrics, **kw)
        self.since_report = 0.0

    def start_tracking(self) -> None:
        """Rank 0's MLflow run (``tracking.mlflow``): created with the config as params and its id kept in the run
        folder (``mlflow_run.json``), so a restarted or re-run attempt logs on into the same run."""
        m = self.cfg.tracking.mlflow
        if m is None or self.rank != 0:
            return
        import mlflow

        if m.tracking_uri.startswith("file:"):  # asked for by name; MLflow 3 keeps file stores behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(m.tracking_uri)
        mlflow.set_experiment(m.experiment_name)
        record = f"{self.run_dir}/mlflow_run.json"
        earlier = read_bytes(record)
        if earlier is not None:
            mlflow.start_run(run_id=json.loads(earlier)["run_id"])
        else:
            run = mlflow.start_run(run_name=self.cfg.run_name)
            mlflow.log_params({k: v for k, v in flat_config(self.cfg.model_dump(mode="json")).items()
                               if v is not None})
            write_atomic(record, json.dumps({"run_id": run.info.run_id, "tracking_uri": m.tracking_uri}))
        self.mlflow = mlflow

    def peak_mem(self) -> int:
        """Peak bytes: the CUDA allocator's peak on a GPU, the process's max RSS on CPU."""
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def inject_failure(self) -> None:
        """``debug.fail_at_step``: raise once (a marker file in the run folder) on ``debug.fail_rank``."""
        dbg = self.cfg.debug
        if dbg.fail_at_step == self.step and self.rank == dbg.fail_rank:
            fs, marker = get_fs(f"{self.run_dir}/.injected_failure")  # the run folder may be on S3
            if not fs.exists(marker):
                fs.pipe_file(marker, str(self.step).encode())
                raise RuntimeError(f"injected failure at step {self.step} on rank {self.rank}")

    # ------------------------------------------------------------------------------------------ save, export

    def save(self, epoch: int, final: bool = False) -> None:
        """A checkpoint through ``ray.train.report``: every rank's DeepSpeed state, and from rank 0
        vlp_state.json (:meth:`checkpoint_state`). Rank 0's logs are flushed first, so an object store holds
        every line up to the checkpoint."""
        from ray.train import Checkpoint

        state = self.checkpoint_state(epoch, final)
        if self.logs is not None:
            self.logs.flush()
        with tempfile.TemporaryDirectory() as d:
            self.engine.save_checkpoint(d, tag="state")
            if self.rank == 0:
                with open(os.path.join(d, "vlp_state.json"), "w") as f:
                    json.dump(state, f)
            self.send_report({**self.metrics, "step": self.step, "epoch": epoch},
                             checkpoint=Checkpoint.from_directory(d))

    def checkpoint_state(self, epoch: int, final: bool) -> dict:
        """vlp_state.json on rank 0 ({} on the others): step, epoch, final, and the epoch's
        :class:`EpochState`, once rank 0 has folded in every rank's rows consumed since the last checkpoint
        (streaming: into the parts' account; "seen": into the uids) and summed the counters. Every rank calls it
        (two all_gathers); what travels is the rows of the last ``checkpoint.every_n_steps`` steps at most."""
        import torch.distributed as dist

        st = self.epoch_state
        mine = list(self.pending)
        self.pending.clear()
        counted = self.epoch_base if st.mode == "held" else self.counters  # held: the replay counts the epoch again
        own = {"skipped": counted.skipped, "tail_dropped": self.epoch_base.tail_dropped}  # tails: finished epochs
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (mine, own))
        if self.rank != 0:
            return {}
        for pairs, _ in gathered:
            for unit, uid in pairs:
                if st.mode == "stream":
                    self.progress.add(unit, uid)
                elif st.mode == "seen":
                    self.seen_set.add(uid)
        skipped, tail = merge_counters([c for _, c in gathered])
        st.counters = {"skipped": skipped, "tail_dropped": tail}
        if st.mode == "stream":
            st.parts = self.progress.state() if self.progress is not None else {}  # None: between epochs
        st.seen = sorted(self.seen_set) if st.mode == "seen" else []
        return {"step": self.step, "epoch": epoch, "final": final, **st.to_json()}

    def gather_counters(self) -> list[dict]:
        import torch.distributed as dist

        counts: list = [None] * self.world
        dist.all_gather_object(counts, dataclasses.asdict(self.counters))
        return counts

    def export(self, counts: list[dict]) -> None:
        """Every rank: the probe's logits (a ZeRO-3 forward gathers weights collectively) and, under ZeRO-3, the
        gather of the full weights (layer by layer, to CPU on rank 0). Rank 0: train_summary.json and export/."""
        import torch.distributed as dist

        from ..formats.export import probe_logits

        probe = [self.probe_row]
        dist.broadcast_object_list(probe, src=0)
        if probe[0] is not None:
            probe[0]["logits"] = probe_logits(self.engine.module, probe[0]).tolist()
        full_state = self.engine._zero3_consolidated_16bit_state_dict() if self.cfg.deepspeed.zero_stage == 3 else None
        if self.rank == 0:
            to_export = self.engine.module
            if full_state is not None:  # a fresh copy of the model holding the gathered weights
                to_export = build_model(self.cfg, load_init=False)
                to_export.load_state_dict(full_state, strict=True)
            skipped, tail = merge_counters(counts)
            summary = {"steps": self.step, "skipped": skipped, "tail_dropped": tail,
                       "final_metrics": self.metrics, "probe": probe[0]}
            write_atomic(f"{self.run_dir}/train_summary.json", json.dumps(summary, indent=2))
            self.export_model(to_export)
        dist.barrier()

    def export_model(self, model) -> None:
        """export/ in the run folder (save_pretrained writes locally: on an object store, uploaded after)."""
        from transformers import AutoTokenizer

        from ..formats.export import export_model

        cfg = self.cfg
        tok = AutoTokenizer.from_pretrained(cfg.model.llm.tokenizer_source())
        if "://" in self.run_dir:
            fs, p = get_fs(f"{self.run_dir}/train_summary.json")
            with tempfile.TemporaryDirectory() as tmp:
                export_model(model, tok, tmp, extra=self.meta["export_extra"])
                fs.put(tmp, f"{p.rsplit('/', 1)[0]}/export", recursive=True)
        else:
            export_model(model, tok, f"{self.run_dir}/export", extra=self.meta["export_extra"])
