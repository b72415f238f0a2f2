"""The Ray Train entry point of a training worker: builds the :class:`vlp.train.recipe.TrainRecipe` and runs it.

The recipe's helpers are re-exported here for code that imported them from this module before the recipe
existed (``deepspeed_config``, ``lr_scheduler``, ``build_model``, ``PEAK_FLOPS``).
"""

from __future__ import annotations

from .recipe import PEAK_FLOPS, TrainRecipe, build_model, deepspeed_config, lr_scheduler

__all__ = ["PEAK_FLOPS", "TrainRecipe", "build_model", "deepspeed_config", "lr_scheduler", "train_loop_per_worker"]


def train_loop_per_worker(config: dict) -> None:
    """``TorchTrainer``'s per-worker function: ``config`` holds the run's TrainConfig (``cfg``, as JSON) and
    ``meta`` (run_dir, state_path, total_steps, export_extra) from :func:`vlp.train.trainer.run_train`."""
    TrainRecipe.from_ray(config).run()
