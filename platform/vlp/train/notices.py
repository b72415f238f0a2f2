"""Ray Train callbacks that run on the Train controller. Its output reaches the driver as worker output, where
:mod:`vlp.runlog` shows ``[vlp]`` lines on the terminal and puts the rest in the run's logs/ray.log."""

from __future__ import annotations

from ray.train import UserCallback

from ..runlog import one_line


class RestartNotice(UserCallback):
    """One ``[vlp]`` line per worker failure that Ray Train restarts the workers after (from the last checkpoint).
    The failure that ends the run is not announced here: the driver raises it (vlp.train.trainer.TrainingFailed)."""

    def __init__(self, run_name: str, max_failures: int):
        self.run_name, self.max_failures = run_name, max_failures
        self.failures = 0

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        self.failures += 1
        if self.max_failures != -1 and self.failures > self.max_failures:
            return
        what = "; ".join(f"rank {rank}: {one_line(e)}" for rank, e in sorted(worker_exceptions.items()))
        print(f"[vlp] train {self.run_name}: a worker failed ({what}); restarting the workers from the last "
              f"checkpoint (failure {self.failures} of at most {self.max_failures})", flush=True)
