"""Training: VideoLLM on precomputed features, DeepSpeed ZeRO under Ray Train. ``trainer`` is the driver (checks,
preflight, the Ray Data graph, the TorchTrainer), ``recipe`` the per-worker TrainRecipe with named steps, ``data``
the stages of the training data graph, ``memory`` the preflight, ``config`` the TrainConfig, ``notices`` a Ray Train
callback on the controller (a line per worker failure it restarts after).
May import: config, errors, storage, runtime, runlog, data, models, formats. Never precompute (it reads feature sets
through formats), cli."""

from .config import TrainConfig
from ..formats.export import export_model, load_model
from .trainer import TrainingFailed, TrainSetupError, check_setup, run_train

__all__ = ["TrainConfig", "export_model", "load_model", "TrainSetupError", "TrainingFailed", "check_setup",
           "run_train"]
