"""Config of the feature precompute job (``vlp precompute`` / ``jobs/precompute.py``)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..config import Cfg
from ..data.audio import AudioConfig
from ..data.media import DecodeConfig, SamplingConfig
from ..data.preprocess import PreprocessConfig
from ..data.sample import SampleConfig
from ..models.audio_towers import AudioTowerConfig
from ..models.parts import PluginModule
from ..models.towers import TOWERS, TowerConfig
from ..runtime import AcceleratorType, RayConfig
from ..storage import StorageConfig


class DataConfig(Cfg):
    """Input shards and how their media become frames."""

    shards: list[str] = Field(..., min_length=1, description="folders, globs, brace ranges or s3:// URLs of .tar shards")
    storage: StorageConfig = StorageConfig()
    sample: SampleConfig = Field(SampleConfig(), description="how raw samples become samples of 0..N media items "
                                 "(limits, text-only samples); recorded in the fingerprint")
    sampling: SamplingConfig = SamplingConfig()
    decode: DecodeConfig = DecodeConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    audio: AudioConfig = Field(AudioConfig(), description="how audio items are decoded and cut into segments "
                               "(used when encoder.audio_tower is set)")
    read_cpus: float = Field(0.25, gt=0, description="CPUs reserved per shard-read task (I/O bound)")
    decode_cpus: float = Field(1.0, gt=0, description="CPUs reserved per decode task")
    decode_batch_size: int = Field(4, ge=1, description="samples per decode task call")
    decode_memory_mb: int = Field(512, ge=1, description="memory reserved per decode task (MiB)")
    decode_placement: Literal["auto", "tasks", "actors", "encoder"] = Field(
        "auto", description="where decoding runs. tasks: stateless Ray tasks; actors: a pool of decode_concurrency "
        "actors (a GPU decoder keeps its context); encoder: inside each encoder actor, on its GPU, so decoded frames "
        "reach the tower without a host copy (needs decode.device=cuda and a GPU encoder). auto: tasks on cpu; on "
        "cuda encoder when the encoder runs on GPU, else actors")
    decode_gpus: float = Field(0.25, gt=0, le=1, description="GPU fraction each decode task or actor asks Ray for "
                               "when decode.device=cuda (tasks/actors placement; NVDEC engines are shared)")
    decode_concurrency: int = Field(2, ge=1, description="decode actors (decode_placement: actors)")
    decode_workers: int = Field(0, ge=0, le=512, description="executor local: decode processes (0 = the CPUs this "
                                "machine lets the job use)")

    @model_validator(mode="after")
    def _encoder_placement_decodes_on_gpu(self):
        if self.decode_placement == "encoder" and self.decode.device != "cuda":
            raise ValueError("decode_placement=encoder shares the encoder's GPU and needs decode.device=cuda; "
                             "CPU decoding runs as tasks or actors")
        return self


class EncoderConfig(Cfg):
    """The frozen vision tower and its actor pool."""

    # Declared first: the plugins' tower types are registered before ``tower`` names one (fields validate in order).
    plugins: list[PluginModule] = Field([], description="modules imported before the tower is validated; they "
                                        "register more tower types (docs/extending.md)")
    tower: TowerConfig = TOWERS.config()
    audio_tower: Optional[AudioTowerConfig] = Field(
        None, description="frozen audio encoder for audio items (e.g. {type: ast, path: preset:tiny-ast}); without "
        "one, a sample with an audio item is an error record")
    batch_size: int = Field(8, ge=1, description="samples per encoder call")
    max_frames_per_forward: int = Field(256, ge=1, description="frames per forward pass (memory bound)")
    max_segments_per_forward: int = Field(32, ge=1, description="audio segments per forward pass of the audio "
                                          "tower (an AST segment holds ~5x a CLIP frame's tokens)")
    concurrency: int = Field(1, ge=1, description="encoder actors (one GPU each where GPUs exist)")
    num_gpus_per_actor: float = Field(1.0, ge=0, description="used only when the tower runs on cuda")
    cpus_per_actor: float = Field(1.0, gt=0)
    accelerator_type: AcceleratorType = Field(
        None, description="GPU type the encoder actors need (Ray's accelerator_type: A100, A100-80G, H100, ...); "
        "implies a GPU tower")

    @model_validator(mode="after")
    def _accel_needs_gpu(self):
        if self.accelerator_type and (self.tower.device == "cpu" or self.num_gpus_per_actor == 0):
            raise ValueError(f"accelerator_type={self.accelerator_type} needs GPU actors, but tower.device="
                             f"{self.tower.device} and num_gpus_per_actor={self.num_gpus_per_actor}")
        return self


class OutputConfig(Cfg):
    """Where features go and in which layout."""

    uri: str = Field(..., description="output folder or s3:// prefix")
    storage: StorageConfig = StorageConfig()
    mode: Literal["frames", "valley_pooled", "pixels"] = Field(
        "valley_pooled", description="frames: (T, 1+P, D) per sample; valley_pooled: (P + T, D) = patch tokens "
        "averaged over time, then the T per-frame CLS tokens; pixels: the tower's input frames, uint8 (T, 3, S, S) "
        "resized/cropped/padded but not normalised, nothing encoded (for a run that trains the vision tower; "
        "the fingerprint still records the tower, whose size and mean/std define them)")
    overwrite: bool = Field(False, description="start over when the folder holds features of another config")


class PrecomputeConfig(Cfg):
    """``vlp precompute``: shards -> decoded frames -> frozen CLIP features, streamed by Ray Data."""

    run_name: Optional[str] = Field(None, description="label in the manifest; defaults to the output folder name")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="where the work runs. ray: the Ray Data graph (reads, decode tasks, encoder actors, "
        "writes spread over a cluster's nodes, GPU decode); local: this machine without Ray, data.decode_workers "
        "decode processes and the encoder in this process (no Ray start-up or per-task costs; CPU decoding only); "
        "auto: ray when a cluster is named (ray.address, RAY_ADDRESS), Ray already runs in this process, "
        "decode.device is cuda or encoder.accelerator_type is set, else local")
    data: DataConfig
    encoder: EncoderConfig = EncoderConfig()
    output: OutputConfig
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _local_decodes_on_cpu(self):
        if self.executor == "local" and self.data.decode.device == "cuda":
            raise ValueError("executor=local decodes in CPU processes; decode.device=cuda needs executor ray (or "
                             "auto)")
        return self
