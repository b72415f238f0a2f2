"""``vlp serve``'s typed config (:class:`ServeConfig`) and the Ray Serve deployment options it implies.

Pure: imports neither Ray nor torch, so the config validates (and its options are checked) anywhere.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Optional

from pydantic import Field, model_validator

from ..config import Cfg
from ..errors import UserError
from ..runtime import AcceleratorType, RayConfig
from ..storage import StorageConfig


class MissingKey(UserError):
    """``api_key_env`` names an environment variable that is not set where the server runs."""


class AutoscalingConfig(Cfg):
    """Ray Serve autoscaling of the model replicas (its ``autoscaling_config``)."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0: scale to zero)")
    max_replicas: int = Field(1, ge=1, description="most replicas (each holds the model, and num_gpus GPUs)")
    target_ongoing_requests: float = Field(4.0, gt=0, description="requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(30.0, ge=0, description="load must stay high this long before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="load must stay low this long before one is removed")

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class DeploymentConfig(Cfg):
    """Where and how many model replicas run (each loads the export once)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count, used when autoscaling is null")
    autoscaling: Optional[AutoscalingConfig] = Field(None, description="null: num_replicas replicas; set: Ray "
                                                     "Serve scales them: {min_replicas: 1, max_replicas: 1, "
                                                     "target_ongoing_requests: 4, upscale_delay_s: 30, "
                                                     "downscale_delay_s: 600} (defaults)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; > 0 runs the towers and the LLM on cuda")
    accelerator_type: AcceleratorType = Field(None, description="Ray accelerator type the replicas need (A100, "
                                              "H100, ...); None: any node with the GPUs")
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica works on at once (Serve's "
                                      "max_ongoing_requests); the autoscaler's signal")
    max_queued_requests: int = Field(64, ge=-1, description="requests waiting for a replica beyond that; more are "
                                     "answered 503 by Serve (-1: no limit)")


class BatchConfig(Cfg):
    """Batching across clients (``@serve.batch``): requests that arrive together are decoded together."""

    max_batch_size: int = Field(8, ge=1, description="most requests in one decoding batch")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long the first request of a batch waits "
                                        "for others to join it")


class LimitsConfig(Cfg):
    """What one request may ask for; beyond it the request gets a 4xx with an OpenAI error body."""

    max_request_bytes: int = Field(64 << 20, ge=1024, description="request body size (413 beyond)")
    max_media_bytes: int = Field(32 << 20, ge=1, description="one media item's size, decoded from its data URL or "
                                 "read from its file (413 beyond; never more than this + 1 bytes are read)")
    max_media_items: int = Field(8, ge=0, description="media parts per request (400 beyond)")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="prompt tokens (text + visual) per request; "
                                             "None = the LLM's max_position_embeddings (400 beyond)")
    max_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask for (400 beyond)")


class MediaConfig(Cfg):
    """Where media parts may come from besides data: URLs (http(s) URLs are never fetched)."""

    local: bool = Field(True, description="allow file:// URLs and plain paths on the replica's machine")
    root: Optional[str] = Field(None, description="when set, local media must lie under this folder")
    s3: bool = Field(True, description="allow s3:// URLs (the top-level storage; credentials from the replica's "
                     "environment)")


class ServeConfig(Cfg):
    """``vlp serve``: an OpenAI-compatible chat server for an export on Ray Serve."""

    model: str = Field(..., description="export folder of a trained run: a path on the replicas' machines, or "
                       "s3://... (copied once per machine into the vlp cache)")
    storage: StorageConfig = Field(StorageConfig(), description="S3 endpoint/region of an s3:// model and of "
                                   "s3:// media")
    model_name: Optional[str] = Field(None, description="the model id clients send; None = the export folder's "
                                      "name, or its run's when it is `export` (runs/x/stage2/export -> stage2)")
    host: str = Field("127.0.0.1", description="HTTP host of `vlp serve` (0.0.0.0 listens on every interface)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of `vlp serve`")
    route_prefix: str = Field("/", pattern=r"^/", description="the app's route prefix (its paths hang under it)")
    app_name: str = Field("vlp", min_length=1, description="the Serve application's name")
    api_key: Optional[str] = Field(None, description="when set, requests need `Authorization: Bearer KEY` (401 "
                                   "otherwise); prefer api_key_env, so the key is not written into configs")
    api_key_env: Optional[str] = Field(None, description="name of an environment variable holding the key, read "
                                       "on the replicas (a replica whose variable is unset refuses to start)")
    page: bool = Field(True, description="serve the chat page at / (upload an image or video, ask, multi-turn)")
    max_tokens: int = Field(64, ge=1, description="answer length when a request sets no max_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="when a request sets none (0 = greedy, as vlp chat; "
                               "OpenAI's own default is 1)")
    limits: LimitsConfig = LimitsConfig()
    media: MediaConfig = MediaConfig()
    batch: BatchConfig = BatchConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    ray: RayConfig = Field(RayConfig(), description="how `vlp serve` reaches Ray (address null: a local Ray)")
    log_dir: str = Field("runs/serve", description="folder whose logs/ray.log gets Ray's and the replicas' output "
                         "(the terminal: vlp's lines and warnings; ray.verbose=true: everything)")

    @model_validator(mode="after")
    def _one_key_source(self):
        if self.api_key and self.api_key_env:
            raise ValueError("set api_key or api_key_env, not both")
        return self

    def resolve_api_key(self) -> Optional[str]:
        """The key requests must carry (None: no key). MissingKey when api_key_env names an unset variable: a
        server meant to be protected does not start open."""
        if not self.api_key_env:
            return self.api_key
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise MissingKey(f"api_key_env={self.api_key_env}: that environment variable is not set (or empty) "
                             "here; set it, or unset api_key_env to serve without a key")
        return key

    def served_model(self) -> str:
        """The model id: ``model_name``, else the export folder's name (its parent's when it is ``export``)."""
        if self.model_name:
            return self.model_name
        p = PurePosixPath(self.model.rstrip("/"))
        return p.parent.name if p.name == "export" and p.parent.name else p.name

    def device(self) -> str:
        """Where a replica runs the towers and the LLM: cuda when the replicas ask Ray for GPUs."""
        return "cuda" if self.deployment.num_gpus > 0 else "cpu"

    def deployment_options(self) -> dict:
        """Keyword arguments of ``Deployment.options``: replicas or autoscaling, resources, request limits."""
        d = self.deployment
        actor = {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus}
        if d.accelerator_type:
            actor["accelerator_type"] = d.accelerator_type
        opts = {"ray_actor_options": actor, "max_ongoing_requests": d.max_ongoing_requests,
                "max_queued_requests": d.max_queued_requests}
        if d.autoscaling is None:
            return {**opts, "num_replicas": d.num_replicas}
        return {**opts, "autoscaling_config": d.autoscaling.model_dump()}
