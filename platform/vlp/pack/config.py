"""Config of ``vlp pack`` (``vlp pack --format F --annotations A --media-root M --out O`` / ``jobs/pack.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..config import Cfg
from ..runtime import RayConfig
from ..storage import StorageConfig
from .formats import ANNOTATION_FORMATS


class PackConfig(Cfg):
    """Annotations + a media folder -> WebDataset shards (video2dataset/img2dataset layout)."""

    format: ANNOTATION_FORMATS.field = Field(
        ANNOTATION_FORMATS.config(), description="the annotation format and its parameters ({type: llava|valley|"
        "videochatgpt|sharegpt|captions|charades_sta|refcoco, ...}; docs/pack_formats.md)")
    annotations: list[str] = Field(..., min_length=1, description="annotation files, globs or folders (local or "
                                   "s3://), read in sorted order")
    media_root: str = Field("", description="folder (or s3:// prefix) the annotations' media paths are relative to")
    out: str = Field(..., description="output folder or s3:// prefix for the shards")
    storage: StorageConfig = Field(StorageConfig(), description="S3 endpoint etc. for annotations, media and out")
    prefix: str = Field("data", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
                        description="shard names: {prefix}-{group:06d}.tar")
    samples_per_shard: int = Field(1000, ge=1, description="records per output shard (one group = one task, "
                                   "the unit of resume)")
    max_shard_bytes: int = Field(3_000_000_000, ge=1 << 20, description="a group whose shard would pass this is "
                                 "split into {prefix}-{group:06d}-{k}.tar (webdataset.ShardWriter's maxsize)")
    max_item_bytes: int = Field(2 << 30, ge=1, description="a media file larger than this is an error for its "
                                "record (it is never read)")
    media_check: Literal["sniff", "none"] = Field(
        "sniff", description="sniff: an image/video item whose magic bytes are no known image/video container is "
        "an error; none: pack whatever the file holds (precompute reports what it cannot decode)")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="where the groups run: ray = Ray Data tasks (a cluster: groups spread over its nodes); "
        "local = threads in this process (no Ray start-up; one machine); auto = ray when a cluster is named "
        "(ray.address, RAY_ADDRESS) or Ray is already running in this process, else local")
    workers: int = Field(0, ge=0, le=256, description="local executor: groups packed at once (0 = this machine's "
                         "CPUs)")
    cpus_per_task: float = Field(1.0, gt=0, description="ray executor: CPUs reserved per group task")
    fetch_threads: int = Field(0, ge=0, le=256, description="threads per group fetching media, at most twice as "
                               "many records in flight (object-store latency overlaps); 0 = auto: 8 when the media "
                               "root is an object store, none on local disk (reads in the group's own thread)")
    overwrite: bool = Field(False, description="delete an output packed with other settings instead of refusing")
    ray: RayConfig = RayConfig()
