"""Typed model parts: families of classes (poolers, connectors, vision towers) chosen by a ``type`` key.

A *part class* owns its config class ``Cfg`` (a subclass of its family's config base with
``type: Literal["name"]`` and its own parameters), how it is built, and its token count. Registering the
class (``@POOLERS.register``) makes ``{type: name, ...}`` validate against that ``Cfg`` wherever the family's
config is used: a config field annotated ``POOLERS.field`` is a discriminated union whose members are whatever
is registered when it is validated. An unknown ``type`` fails at ``<path>.type`` with the known types; an
unknown parameter fails at ``<path>.<param>`` (``extra="forbid"``, as every ``vlp.config.Cfg``).

Plugins: ``import_plugin`` imports a module by name (``model.plugins``), so its parts register before the
configs that name them are validated, on the driver and in every Ray worker (workers validate the config they
are sent). See docs/extending.md.

May import: vlp.config, vlp.registry (no torch, no vlp.models modules).
"""

from __future__ import annotations

import importlib
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Optional

from pydantic import AfterValidator, SerializeAsAny, ValidationError, WrapValidator
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..config import Cfg
from ..registry import Registry


class PartCfg(Cfg):
    """Base of a family's config base. ``parts`` (set by the family's PartRegistry) names its registry."""

    parts: ClassVar[Optional["PartRegistry"]] = None
    type: str


class Part:
    """Base of a part class: an instance is made from its validated ``Cfg``."""

    Cfg: ClassVar[type[PartCfg]]

    def __init__(self, cfg: PartCfg):
        self.cfg = cfg


def _literal_name(cfg_cls: type[PartCfg]) -> str:
    """The one name of ``type: Literal["name"]`` in a part's Cfg."""
    ann = cfg_cls.model_fields["type"].annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) is not typing.Literal or len(args) != 1 or not isinstance(args[0], str):
        raise TypeError(f"{cfg_cls.__qualname__}.type must be annotated Literal['<name>'] (one name), got {ann}")
    return args[0]


class PartRegistry(Registry[type]):
    """Part classes of one family by ``type``; ``field`` is the config annotation that picks their ``Cfg``."""

    def __init__(self, kind: str, base: type[PartCfg]):
        super().__init__(kind)
        self.base = base
        base.parts = self
        # SerializeAsAny: model_dump writes the picked Cfg's own parameters, not just the base's fields
        self.field = Annotated[SerializeAsAny[base], WrapValidator(self._pick)]

    def register(self, part_cls):  # type: ignore[override]  (a class decorator: the name comes from Cfg.type)
        cfg_cls = getattr(part_cls, "Cfg", None)
        if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, self.base)):
            raise TypeError(f"{part_cls.__qualname__}.Cfg must subclass {self.base.__name__} to be a {self.kind}")
        return super().register(_literal_name(cfg_cls))(part_cls)

    def cfg_class(self, name: str) -> type[PartCfg]:
        return self.get(name).Cfg

    def config(self, data: Optional[dict] = None, **params: Any) -> PartCfg:
        """A validated config of the registered class ``data["type"]`` (the base's default type when absent)."""
        return self._pick({**(data or {}), **params}, None)

    def part(self, cfg: PartCfg | dict | str) -> Part:
        """The part for a config (a Cfg, a dict, or just a type name with default parameters)."""
        if isinstance(cfg, str):
            cfg = {"type": cfg}
        if not isinstance(cfg, PartCfg) or type(cfg) is self.base:
            cfg = self.config(cfg if isinstance(cfg, dict) else cfg.model_dump())
        return self.get(cfg.type)(cfg)

    def builtin_names(self) -> list[str]:
        """Types registered by vlp itself (docs list these; plugins' types are theirs to document)."""
        return [n for n in self.names() if self.get(n).__module__.startswith("vlp.")]

    def _pick(self, data: Any, handler) -> PartCfg:
        """Wrap validator of ``field``: validate a dict with the Cfg its ``type`` names."""
        if isinstance(data, self.base) and type(data) is not self.base:
            return data  # already a registered Cfg (e.g. a default)
        if isinstance(data, self.base):
            data = data.model_dump()
        if not isinstance(data, dict):
            if handler is None:
                raise TypeError(f"a {self.kind} config must be a mapping, got {type(data).__name__}")
            return handler(data)  # the usual "should be a valid dictionary" error
        name = data.get("type", self.base.model_fields["type"].default)
        if not isinstance(name, str) or name not in self:
            known = ", ".join(self.names()) or "(none)"
            err = PydanticCustomError("unknown_type", "unknown {kind} type {name}; known: {known}",
                                      {"kind": self.kind, "name": repr(name), "known": known})
            raise ValidationError.from_exception_data(self.base.__name__, [  # input: the mapping, so that
                InitErrorDetails(type=err, loc=("type",), input=data)])    # ConfigError adds no "(got ...)"
        return self.cfg_class(name).model_validate({**data, "type": name})


# ------------------------------------------------------------------------------------------------ plugins

def plugin_root(module) -> Optional[str]:
    """The sys.path folder a module was imported from (the folder above its top-level package)."""
    f = getattr(sys.modules.get(module.__name__.split(".")[0]), "__file__", None)
    if not f:
        return None
    p = Path(f).resolve().parent
    return str(p.parent if Path(f).name == "__init__.py" else p)


def share_with_local_workers(root: str, environ=os.environ) -> bool:
    """Put ``root`` on ``environ["PYTHONPATH"]`` unless it is there. A local Ray started after this (``ray.init``
    without an address) passes the driver's environment to every worker, so they import the plugin too. True
    when it was added."""
    parts = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root in parts:
        return False
    environ["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return True


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


def import_plugin(name: str) -> str:
    """Config validator: import module ``name`` (it registers parts when imported). In a process that has not
    started Ray yet, its folder is also put on PYTHONPATH for the local Ray workers (share_with_local_workers)."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # an ImportError, or the module's own failure (e.g. a type registered twice)
        raise ValueError(
            f"cannot import plugin module {name!r} ({type(e).__name__}: {e}). Plugin modules are imported by name "
            "on the driver and in every Ray worker: put their folder on PYTHONPATH (a local Ray hands the "
            "driver's PYTHONPATH to its workers) or ship it with the job (ray job submit --working-dir / "
            "runtime_env py_modules)") from None
    root = plugin_root(mod)
    if root and not _ray_started():
        share_with_local_workers(root)
    return name


# A config field's entry naming a plugin module (``model.plugins``, ``encoder.plugins``): imported when validated.
PluginModule = Annotated[str, AfterValidator(import_plugin)]
