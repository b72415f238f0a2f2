"""Ray start-up shared by every entry point: attach to a cluster or start a local one."""

from __future__ import annotations

import os
from typing import Optional

from pydantic import Field

from .config import Cfg


class RayConfig(Cfg):
    """How to reach Ray. ``address=None`` starts a local Ray (laptop, tests); ``auto`` joins a cluster."""

    address: Optional[str] = Field(None, description="None: local ray.init(); 'auto' or ray://host:port: a cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="CPUs for a local Ray (None = all)")
    object_store_memory: Optional[int] = Field(None, ge=1 << 27, description="bytes, local Ray only")
    progress_bars: bool = Field(True, description="Ray Data progress bars")


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(ignore_reinit_error=True, log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory, include_dashboard=False,
                 **kwargs)
