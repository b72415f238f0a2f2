"""Tracking settings (the real MLflow run is in tests/train/test_train.py: a run with a worker failure logs every
second step into one MLflow run)."""

from __future__ import annotations

import pytest

from vlp.config import ConfigError, validate
from vlp.train.config import TrainConfig
from vlp.train.recipe import flat_config


def test_flat_config_names_params_by_dotted_path():
    assert flat_config({"optim": {"lr": 2e-5, "betas": [0.9, 0.99]}, "epochs": 1}) == {
        "optim.lr": 2e-5, "optim.betas": "[0.9, 0.99]", "epochs": 1}


@pytest.mark.parametrize("over, path", [({"report_every": 0}, "tracking.report_every"),
                                        ({"mlflow": {"experiment_name": "x"}}, "tracking.mlflow.tracking_uri")])
def test_tracking_settings_are_checked(over, path):
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "x"}]}, "tracking": over})


def test_ray_reports_wait_for_their_interval_and_every_rank_decides_the_same(monkeypatch):
    """ray.train.report blocks until Ray's controller takes the previous report (it polls every 2 s), so a report
    every step capped training at one step per poll; reports now wait for tracking.report_interval_s of training,
    counted from the step times reduced over ranks (the same on every rank). MLflow still gets every report_every."""
    import ray.train

    from vlp.train.recipe import TrainRecipe, report_due

    assert report_due(5.0, 5.0) and not report_due(4.9, 5.0) and report_due(0.0, 0.0)
    cfg = validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "x"}]},
                                 "tracking": {"report_every": 2, "report_interval_s": 3.0}})
    sent = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: sent.append(metrics["step"]))
    recipe = TrainRecipe(cfg, {"run_dir": "unused", "state_path": "unused"})
    recipe.in_ray_train = True
    for step in range(1, 21):  # steps of 0.5 s: every 2nd step is due for a report, and 3 s pass every 6th step
        recipe.step, recipe.metrics = step, {"step": step}
        recipe.since_report += 0.5
        recipe.report()
    assert sent == [6, 12, 18]


@pytest.mark.parametrize("every, want", [(6, ["6c", "12c", "18c"]), (8, [6, "8c", 14, "16c"])])
def test_a_checkpoint_step_sends_one_report_and_the_interval_starts_over(monkeypatch, every, want):
    """The checkpoint's report carries its step's metrics: no metrics report before it at that step (it would wait
    for Ray's controller to take the first, up to 2 s per checkpoint), and the interval counts from it (every=8:
    without that, step 12 would report 4 steps after the checkpoint at 8)."""
    import ray.train

    from vlp.train.recipe import TrainRecipe

    cfg = validate(TrainConfig, {"run_name": "r", "data": {"sets": [{"uri": "x"}]},
                                 "checkpoint": {"every_n_steps": every}, "tracking": {"report_every": 1, "report_interval_s": 3.0}})
    sent = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: sent.append(
        f"{metrics['step']}c" if "checkpoint" in kw else metrics["step"]))
    recipe = TrainRecipe(cfg, {"run_dir": "unused", "state_path": "unused"})
    recipe.in_ray_train = True
    for step in range(1, 19):  # steps of 0.5 s
        recipe.step, recipe.metrics = step, {"step": step}
        recipe.since_report += 0.5
        recipe.report()
        if step % every == 0:  # what save() sends
            recipe.send_report(dict(recipe.metrics), checkpoint=None)
    assert sent == want
