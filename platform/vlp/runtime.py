"""Ray start-up shared by every entry point: attach to a cluster or start a local one, and ship the code.

Code shipping: a job submitted with ``ray job submit --working-dir .`` runs its driver in the uploaded copy
of the repo (``jobs/*.py`` put that copy's ``platform/`` first on ``sys.path``). Ray's workers do not see
the driver's ``sys.path``, so :func:`init_ray` adds the driver's ``vlp`` package to the job's runtime_env as
``py_modules``: every task and actor then imports the same ``vlp`` as the driver, not whatever is installed
on the cluster's image. ``ray.ship_code=installed`` turns this off (workers use the image's vlp wheel).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, Field

from .config import Cfg

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a submitted job's driver


class RayConfig(Cfg):
    """How to reach Ray. ``address=None`` starts a local Ray (laptop, tests); ``auto`` joins a cluster."""

    address: Optional[str] = Field(None, description="None: local ray.init(); 'auto' or ray://host:port: a cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs for a local Ray (None = all)")
    object_store_memory: Optional[int] = Field(None, ge=1 << 27, description="bytes, local Ray only")
    progress_bars: bool = Field(True, description="Ray Data progress bars")
    verbose: bool = Field(False, description="true: Ray's INFO logs and every line the workers print on the terminal "
                          "too, as Ray prints them (VLP_VERBOSE=1 does the same); false: those go to the run "
                          "folder's logs/ray.log only and the terminal gets vlp's lines, Ray Data's progress bars "
                          "and warnings")
    ship_code: Literal["auto", "py_modules", "installed"] = Field(
        "auto", description="how workers get vlp: py_modules = ship the driver's vlp package in the runtime_env; "
        "installed = use the vlp installed on the cluster's image; auto = py_modules when joining a cluster "
        "with vlp imported from a source checkout (jobs/*.py under ray job submit), else installed")


def known_accelerator_types() -> list[str]:
    """Ray's accelerator type names (``ray.util.accelerators``): A100, A100-40G, A100-80G, H100, ..."""
    from ray.util.accelerators import accelerators

    return sorted({v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)})


def check_accelerator_type(v: Optional[str]) -> Optional[str]:
    """Validator: None, or one of Ray's accelerator types (it becomes the ``accelerator_type:<v>`` resource)."""
    if v is None:
        return v
    known = known_accelerator_types()
    if v not in known:
        import difflib

        close = difflib.get_close_matches(v, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown accelerator type {v!r}{hint} (Ray knows: {', '.join(known)})")
    return v


# A config field holding an optional Ray accelerator type, validated by check_accelerator_type.
AcceleratorType = Annotated[Optional[str], AfterValidator(check_accelerator_type)]


def on_a_cluster(cfg: RayConfig) -> bool:
    """Whether a run belongs on Ray rather than in this process (commands with ``executor: auto``): a cluster is
    named (``ray.address``, ``RAY_ADDRESS``: also every ``ray job submit`` driver) or this process runs Ray."""
    import sys

    ray = sys.modules.get("ray")  # not imported here just to ask: importing Ray costs about a second
    return bool(cfg.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))


def vlp_package_dir() -> Path:
    """The folder of the ``vlp`` package this process imported."""
    import vlp

    return Path(vlp.__file__).resolve().parent


def is_source_checkout(pkg: Path) -> bool:
    """True when ``pkg`` is a source tree (e.g. ``<repo>/platform/vlp``), not an installed wheel."""
    return not any(part in ("site-packages", "dist-packages") for part in pkg.parts)


def submitted_job_runtime_env() -> dict:
    """The runtime_env the job was submitted with (``ray job submit``), {} outside a submitted job."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def code_runtime_env(ship_code: str, address: Optional[str], pkg: Path, job_env: dict) -> tuple[Optional[dict], str]:
    """(runtime_env for ray.init or None, one line saying why). Pure: no Ray needed.

    The runtime_env only adds ``py_modules``; Ray merges it with the submitted job's runtime_env (its
    ``working_dir``, ``excludes``, ``env_vars`` stay as they are), which its tasks and actors inherit.
    """
    if ship_code == "installed":
        return None, "ray.ship_code=installed: workers import the vlp installed on the cluster"
    if ship_code == "auto":
        if not address:
            return None, "local Ray: workers import vlp like the driver (same machine, same environment)"
        if not is_source_checkout(pkg):
            return None, f"vlp is installed ({pkg}): workers import the vlp installed on the cluster"
    if "py_modules" in job_env:
        # Ray refuses to merge two py_modules lists; the submitter chose the modules explicitly.
        return None, f"the submitted job's runtime_env sets py_modules {job_env['py_modules']}; not adding vlp"
    return {"py_modules": [str(pkg)]}, f"shipping {pkg} to the workers as runtime_env py_modules"


def _vlp_dir_on_worker() -> str:
    return str(vlp_package_dir())


def init_ray(cfg: RayConfig, log=print) -> None:
    """Start or join Ray (see the module doc), its output routed by :mod:`vlp.runlog` (the driver's loggers gated
    before ``ray.init``, so that its banner goes to the log too; the workers' stream after)."""
    import ray

    from .runlog import gate_ray_loggers, route_worker_output

    gate_ray_loggers()
    if ray.is_initialized():
        route_worker_output()
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    pkg = vlp_package_dir()
    runtime_env, why = code_runtime_env(cfg.ship_code, address, pkg, submitted_job_runtime_env())
    kwargs = dict(ignore_reinit_error=True, log_to_driver=True, runtime_env=runtime_env)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, include_dashboard=False,
                 **kwargs)
    gate_ray_loggers()
    route_worker_output()
    if address or runtime_env:
        log(f"[vlp] code: driver imports vlp from {pkg}; {why}")
    if cfg.ship_code == "installed" and is_source_checkout(pkg):
        log(f"[vlp] warning: ray.ship_code=installed but the driver runs vlp from a source tree ({pkg}); "
            "driver and workers may run different code (submit `vlp ...` instead of jobs/*.py)")
    if runtime_env:
        # One zero-CPU task proves that workers import the shipped copy (and fails early and clearly if not).
        where = ray.remote(num_cpus=0)(_vlp_dir_on_worker)
        try:
            log(f"[vlp] code: workers import vlp from {ray.get(where.remote(), timeout=600)}")
        except ray.exceptions.GetTimeoutError:
            log("[vlp] code: no worker answered within 600 s; not checked where workers import vlp from")
