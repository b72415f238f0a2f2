"""``vlp demo``: the built-in tiny end-to-end run on one machine.

Today it covers the data half of the platform: synthetic shards -> three feature sets (caption
pretraining, instructions, held-out) -> a summary. Re-running reuses what is complete.
"""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from .config import Cfg, dump_config
from .data.media import SamplingConfig
from .data.synth import MakeShardsConfig, make_shards
from .inspect_ import format_report, inspect_features
from .models.vision import VisionTowerConfig
from .precompute import PrecomputeConfig, run_precompute
from .runtime import RayConfig
from .storage import get_fs, join


class DemoShardsConfig(MakeShardsConfig):
    out: str = Field("", description="empty: <root>/shards")


class DemoConfig(Cfg):
    """Everything the demo does, with tiny defaults."""

    root: str = Field("runs/demo", description="run folder holding shards, features and reports")
    shards: DemoShardsConfig = DemoShardsConfig()
    sampling: SamplingConfig = SamplingConfig()
    tower: VisionTowerConfig = VisionTowerConfig()
    mode: str = Field("valley_pooled", pattern="^(frames|valley_pooled)$")
    ray: RayConfig = RayConfig()
    run_name: Optional[str] = None


FEATURE_SETS = {"pretrain": ("webvid", "cc3m"), "instruct": ("instruct",), "heldout": ("heldout",)}


def run_demo(cfg: DemoConfig, log=print) -> dict:
    shards_cfg = cfg.shards.model_copy(update={"out": cfg.shards.out or join(cfg.root, "shards")})
    fs, root = get_fs(cfg.root)
    fs.makedirs(root, exist_ok=True)
    with fs.open(join(root, "demo_config.yaml"), "w") as f:
        f.write(dump_config(cfg))
    marker = join(shards_cfg.out, "_SUCCESS")
    sfs, _ = get_fs(shards_cfg.out)
    if sfs.exists(marker):
        log(f"[vlp] step 1/2 shards: reused {shards_cfg.out}")
        written = None
    else:
        log(f"[vlp] step 1/2 shards: writing synthetic shards to {shards_cfg.out}")
        written = make_shards(shards_cfg)
        with sfs.open(marker, "w") as f:
            f.write("ok\n")
    results = {}
    for name, families in FEATURE_SETS.items():
        specs = [join(shards_cfg.out, f"{fam}-*.tar") for fam in families
                 if getattr(shards_cfg, {"webvid": "videos", "cc3m": "images", "instruct": "instructions",
                                         "heldout": "heldout"}[fam]) > 0]
        if not specs:
            continue
        pc = PrecomputeConfig(
            run_name=name, data={"shards": specs, "sampling": cfg.sampling},
            encoder={"tower": cfg.tower}, output={"uri": join(cfg.root, "features", name), "mode": cfg.mode},
            ray=cfg.ray)
        log(f"[vlp] step 2/2 features: {name} <- {', '.join(families)}")
        run_precompute(pc, log=log)
        rep = inspect_features(pc.output.uri)
        log(format_report(rep))
        results[name] = rep
    log(f"[vlp] demo outputs are in {cfg.root}/ (shards/, features/<set>/manifest.json, errors.jsonl, summary.json)")
    return {"shards": written, "features": results}
