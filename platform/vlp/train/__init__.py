"""Training: VideoLLM on precomputed features, DeepSpeed ZeRO under Ray Train."""

from .config import TrainConfig
from ..formats.export import export_model, load_model
from .trainer import TrainSetupError, check_setup, run_train

__all__ = ["TrainConfig", "export_model", "load_model", "TrainSetupError", "check_setup", "run_train"]
