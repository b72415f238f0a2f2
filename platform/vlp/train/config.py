"""Config of ``vlp train`` (stage 1 projector pretraining, stage 2 instruction tuning)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..config import Cfg
from ..data.conversation import TEMPLATES
from ..models.videollm import ModelConfig
from ..runtime import AcceleratorType, RayConfig
from ..storage import StorageConfig


class FeatureSetRef(Cfg):
    """One feature set of the mixture."""

    uri: str = Field(..., description="feature-set folder or s3:// prefix written by vlp precompute")
    weight: float = Field(1.0, gt=0, description="epoch share: 1 = every sample once, 0.5 = a seeded half, 2 = twice")
    storage: StorageConfig = StorageConfig()
    format: Literal["auto", "caption", "conversation"] = Field(
        "auto", description="caption: train on captions; conversation: on conversations; auto: conversations if present")


class TrainDataConfig(Cfg):
    sets: list[FeatureSetRef] = Field(..., min_length=1)
    template: str = Field("plain", description="plain (stage 1) | vicuna_v1 | chatml")
    max_length: int = Field(2048, ge=8, description="tokens including visual tokens")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="truncate text after the visual span, or skip the sample (counted)")
    group_by_length: bool = Field(True, description="length-grouped micro-batches")
    group_by_modality: bool = Field(False, description="sort by modality before length (LLaVA's "
                                    "group_by_modality_length); costs padding on mixed sets (see docs/benchmarks.md)")
    group_window: int = Field(8, ge=1, description="global batches pooled before sorting by length")
    local_shuffle_buffer_size: int = Field(
        256, ge=0, description="streamed sets (not materialised): rows each worker shuffles its stream in (Ray "
        "Data local shuffle, seeded from data.seed, epoch, rank) before the length-grouping windows; 0 = off")
    seed: int = 0
    materialize: Literal["auto", "always", "never"] = Field(
        "auto", description="tokenise the sets once and hold them in Ray's object store; every epoch each worker "
        "takes its rows from one seeded permutation of the epoch (mixture copies, resume filter) with no Ray Data "
        "execution (the streaming path re-reads and re-tokenises every epoch: 1-2 s of start-up per epoch on 2 "
        "CPUs); auto: when all sets together are at most materialize_max_mb")
    materialize_max_mb: float = Field(256, gt=0, description="size limit for materialize=auto (bytes on storage)")

    @field_validator("template")
    @classmethod
    def _known(cls, v):
        return TEMPLATES.validate(v)


class OptimConfig(Cfg):
    lr: float = Field(2e-3, gt=0, description="peak learning rate of every trainable part not in lr_by_part")
    lr_by_part: dict[Literal["tower", "connector", "llm"], float] = Field(
        {}, description="peak learning rate per part, e.g. {tower: 1e-5, connector: 1e-4, llm: 2e-5} (tower: "
        "model.tower; llm: its LoRA adapters too); every part follows the same warmup and schedule (AdamW parameter groups, as mPLUG-Owl trains its "
        "parts at different rates)")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="linear warmup from 0 over ceil(steps x ratio) steps "
                                "(as the Hugging Face Trainer LLaVA trains with counts them)")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="after warmup, transformers' get_scheduler: cosine or linear decay to 0, or constant "
        "(constant_with_warmup)")
    grad_clip: float = Field(1.0, ge=0)

    @field_validator("lr_by_part")
    @classmethod
    def _positive(cls, v):
        bad = [k for k, x in v.items() if not x > 0]
        if bad:
            raise ValueError(f"learning rates must be > 0 (got {', '.join(f'{k}: {v[k]}' for k in bad)})")
        return v


class BatchConfig(Cfg):
    global_size: int = Field(128, ge=1, description="samples per optimizer step over all workers")
    micro_size: int = Field(16, ge=1, description="samples per forward pass per worker")
    grad_accum: Optional[int] = Field(None, ge=1, description="derived from global / (micro x workers) when omitted")


class OffloadCfg(Cfg):
    """Where DeepSpeed keeps a state off the GPU (ZeRO-Offload / ZeRO-Infinity): its ``offload_optimizer`` /
    ``offload_param`` section."""

    device: Literal["none", "cpu", "nvme"] = Field("none", description="none: on the GPU; cpu: host memory; "
                                                   "nvme: files under nvme_path (ZeRO-3 only)")
    pin_memory: bool = Field(True, description="page-locked host buffers (faster copies; counts against the "
                             "host's memlock limit)")
    nvme_path: Optional[str] = Field(None, description="a local NVMe folder on every node (device: nvme)")

    @model_validator(mode="after")
    def _nvme_path(self):
        if self.device == "nvme" and not self.nvme_path:
            raise ValueError("device=nvme needs nvme_path (a local NVMe folder on every node)")
        if self.nvme_path and self.device != "nvme":
            raise ValueError(f"nvme_path is only used with device=nvme (device is {self.device})")
        return self


class DeepSpeedConfig(Cfg):
    zero_stage: int = Field(1, description="0 (DDP), 1, 2 or 3 (parameters partitioned too; export gathers them)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, else fp32 (CPU); the preflight counts bytes for it")
    reduce_bucket_size: Optional[int] = Field(
        None, ge=512, description="elements in DeepSpeed's gradient reduction bucket (ZeRO 1-3); default "
        "min(5e8, max(5e5, trainable params)) so tiny models do not allocate 5e7-element buckets")
    allgather_bucket_size: Optional[int] = Field(
        None, ge=512, description="elements per ZeRO-1/2 weight all-gather; default as reduce_bucket_size")
    stage3_prefetch_bucket_size: Optional[int] = Field(
        None, ge=0, description="ZeRO-3 parameter prefetch elements; default as reduce_bucket_size")
    offload_optimizer: OffloadCfg = Field(
        OffloadCfg(), description="ZeRO 1-3: Adam's states, the fp32 master weights and gradient partitions in host "
        "memory (cpu) or on NVMe (ZeRO-3), the optimizer step on the CPU (DeepSpeedCPUAdam, a C++ op built on "
        "first use)")
    offload_param: OffloadCfg = Field(
        OffloadCfg(), description="ZeRO-3: the weight partitions in host memory (cpu) or on NVMe, gathered to the "
        "GPU layer by layer")

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, v):
        if v not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage {v} does not exist (0, 1, 2 or 3)")
        return v

    @model_validator(mode="after")
    def _offload_stage(self):
        """DeepSpeed 0.19 ignores offload_param below ZeRO-3 and offload_optimizer under ZeRO-0 (no ZeRO
        optimizer), and runs NVMe optimizer offload below ZeRO-3 as cpu: refuse instead of ignoring."""
        problems = []
        if self.offload_param.device != "none" and self.zero_stage != 3:
            problems.append(f"offload_param.device={self.offload_param.device} needs zero_stage=3 (weights are "
                            f"partitioned only under ZeRO-3; zero_stage is {self.zero_stage})")
        if self.offload_optimizer.device != "none" and self.zero_stage == 0:
            problems.append(f"offload_optimizer.device={self.offload_optimizer.device} needs zero_stage 1, 2 or 3")
        elif self.offload_optimizer.device == "nvme" and self.zero_stage != 3:
            problems.append(f"offload_optimizer.device=nvme needs zero_stage=3 (ZeRO-Infinity); use device=cpu "
                            f"under ZeRO-{self.zero_stage}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def offloads(self) -> tuple[bool, bool]:
        """(optimizer offloaded, weights offloaded)."""
        return self.offload_optimizer.device != "none", self.offload_param.device != "none"

    @field_validator("allgather_bucket_size")
    @classmethod
    def _even(cls, v):
        if v is not None and v % 2:
            raise ValueError(f"{v} is odd: DeepSpeed needs a multiple of 2 (4-byte NCCL alignment of 2-byte elements)")
        return v


class ScalingCfg(Cfg):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker; leave some for "
                                   "the data pipeline (on a 2-core laptop: 0.5)")
    data_cpus_per_task: float = Field(0.25, gt=0, description="CPUs per tokenise/mixture task of the data pipeline")
    device_memory_gb: Optional[float] = Field(None, gt=0, description="override the device memory used by the preflight")
    memory_preflight: Literal["states", "strict"] = Field(
        "states", description="the memory preflight stops a run before any worker starts when its model states "
        "(weights, gradients, optimizer, ZeRO buckets) do not fit the GPU; when only the activations of a "
        "micro-batch of data.max_length-token samples would not fit, states prints the report with what would fit "
        "and starts (samples are often far shorter), strict stops too")
    accelerator_type: AcceleratorType = Field(
        None, description="GPU type every worker needs (Ray's accelerator_type: A100, A100-80G, H100, ...); "
        "needs use_gpu")

    @model_validator(mode="after")
    def _accel_needs_gpu(self):
        if self.accelerator_type and not self.use_gpu:
            raise ValueError(f"accelerator_type={self.accelerator_type} needs use_gpu=true")
        return self


class CheckpointCfg(Cfg):
    every_n_steps: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)


class MlflowCfg(Cfg):
    """Metrics to MLflow: rank 0 logs every reported step into one MLflow run per vlp run (restarts continue it)."""

    tracking_uri: str = Field(..., description="an MLflow server (http://...), a database (sqlite:///mlflow.db, "
                              "needs the full mlflow package) or a local file store (file:///path/mlruns)")
    experiment_name: str = Field("vlp", description="created when missing")


class TrackingCfg(Cfg):
    report_every: int = Field(1, ge=1, description="metrics through ray.train.report (and MLflow) every N optimizer "
                              "steps (the Ray dashboard and Result.metrics see them between checkpoints too)")
    report_interval_s: float = Field(5.0, ge=0, description="and to ray.train.report at most once per this many "
                                     "seconds of training (0: every report_every steps): Ray's controller takes one "
                                     "report per worker every 2 s and a report before that blocks the step")
    mlflow: Optional[MlflowCfg] = Field(None, description="log the reported metrics and the config to MLflow")


class LoraCfg(Cfg):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class DebugCfg(Cfg):
    fail_at_step: Optional[int] = Field(None, ge=1, description="raise once on fail_rank after this optimizer step (tests)")
    fail_rank: int = Field(0, ge=0)


class TrainConfig(Cfg):
    """``vlp train``: a VideoLLM on precomputed features, DeepSpeed under Ray Train."""

    run_name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = Field("runs/train", description="runs go to <output_dir>/<run_name> (shared storage on clusters)")
    stage: Literal["stage1", "stage2", "custom"] = "custom"
    data: TrainDataConfig
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    batch: BatchConfig = BatchConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingCfg = ScalingCfg()
    checkpoint: CheckpointCfg = CheckpointCfg()
    lora: LoraCfg = LoraCfg()
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many optimizer steps")
    max_failures: int = Field(2, ge=0, description="automatic restarts from the last checkpoint")
    log_every: int = Field(1, ge=1)
    tensorboard: bool = True
    tracking: TrackingCfg = TrackingCfg()
    debug: DebugCfg = DebugCfg()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _batch_math(self):
        b, w = self.batch, self.scaling.num_workers
        if b.grad_accum is None:
            if b.global_size % (b.micro_size * w):
                raise ValueError(f"batch.global_size={b.global_size} is not a multiple of batch.micro_size x "
                                 f"scaling.num_workers = {b.micro_size} x {w}")
            b.grad_accum = b.global_size // (b.micro_size * w)
        elif b.micro_size * b.grad_accum * w != b.global_size:
            raise ValueError(f"batch.global_size={b.global_size} != micro_size x grad_accum x num_workers = "
                             f"{b.micro_size} x {b.grad_accum} x {w}")
        if self.debug.fail_rank >= w:
            raise ValueError(f"debug.fail_rank={self.debug.fail_rank} but only {w} workers")
        frozen = {"tower": not (self.model.tower is not None and self.model.tower.trainable),
                  "connector": not self.model.connector.trainable,
                  "llm": not (self.model.llm.trainable or self.lora.enabled)}
        named = [p for p in self.optim.lr_by_part if frozen[p]]
        if named:
            raise ValueError(f"optim.lr_by_part names {', '.join(named)}, which this run does not train "
                             "(model.tower.trainable; model.connector.trainable; model.llm.trainable or lora.enabled)")
        return self

    @model_validator(mode="after")
    def _nvme_needs_gpu(self):
        """NVMe offload moves states out of GPU memory through DeepSpeed's async_io op (libaio); a CPU run
        already holds every state in host memory, and the op does not build without libaio."""
        ds = self.deepspeed
        nvme = [k for k in ("offload_optimizer", "offload_param") if getattr(ds, k).device == "nvme"]
        if nvme and not self.scaling.use_gpu:
            raise ValueError(f"deepspeed.{nvme[0]}.device=nvme needs scaling.use_gpu=true (on a CPU run the states "
                             "already are in host memory; device=cpu runs DeepSpeed's CPU offload path)")
        return self
