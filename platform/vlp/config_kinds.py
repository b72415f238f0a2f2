"""Which config class a shipped YAML holds, by file-name prefix (``precompute*.yaml`` -> PrecomputeConfig)."""

from __future__ import annotations

from .config import Cfg
from .registry import Registry

CONFIG_KINDS: Registry[type[Cfg]] = Registry("config kind")


def register_kinds() -> None:
    """Register the shipped config kinds (idempotent; imported lazily: they pull in their modules)."""
    from .synth.shards import MakeShardsConfig
    from .synth.demo import DemoConfig
    from .infer import InferConfig
    from .pack import PackConfig
    from .precompute import PrecomputeConfig
    from .serve import ServeConfig
    from .train import TrainConfig

    for name, cls in (("precompute", PrecomputeConfig), ("make_shards", MakeShardsConfig), ("demo", DemoConfig),
                      ("train", TrainConfig), ("infer", InferConfig), ("pack", PackConfig),
                      ("serve", ServeConfig)):
        if name not in CONFIG_KINDS:
            CONFIG_KINDS.register(name)(cls)


def kind_of(filename: str) -> type[Cfg]:
    register_kinds()
    stem = filename.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    for name in sorted(CONFIG_KINDS.names(), key=len, reverse=True):
        if stem == name or stem.startswith(name + "_"):
            return CONFIG_KINDS.get(name)
    raise KeyError(f"{filename}: name must start with one of {CONFIG_KINDS.names()}")
