"""Typed configuration: YAML files + dotted overrides, validated in one pass.

Every config class derives from :class:`Cfg` (unknown keys are errors). ``load_config`` merges a YAML
file with ``a.b.c=value`` overrides and validates the result; any problem (unknown key, wrong type,
impossible value) raises :class:`ConfigError` whose message lists *every* problem by dotted path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import UserError

C = TypeVar("C", bound="Cfg")


class Cfg(BaseModel):
    """Base of all vlp configs: strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ConfigError(UserError, ValueError):
    """A config failed validation; ``problems`` holds (dotted path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = ""):
        self.problems = problems
        self.source = source
        head = f"invalid config{f' ({source})' if source else ''}: {len(problems)} problem(s)"
        lines = [f"  - {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join([head, *lines]))


def _dotted(loc: Sequence[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            # discriminated unions add the tag name to the location; it is not a key the user wrote
            if parts and p.startswith("function-"):
                continue
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _problems_from(err: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        out.append((_dotted(e["loc"]), msg))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``data.num_frames=8`` -> (["data", "num_frames"], 8). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([(text, "override must look like key.path=value")])
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError([(key or text, "override key must be a dotted path like data.num_frames")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"cannot parse value {raw!r}: {e}")]) from None
    return key.split("."), value


def _seed_defaults(cls: Optional[type[BaseModel]], data: dict, path: Sequence[str], seeded: set) -> None:
    """Before ``a.b.c=v`` sets a key inside a section the file does not have, copy that section's default (the
    field's default instance, e.g. the demo's ``stage2``) into ``data``, so the override changes one key of the
    default and not a bare class default with every other key reset (or missing, when required). The sections
    copied are added to ``seeded`` (as tuples of keys)."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        field = cls.model_fields.get(part) if cls is not None else None
        default = field.default if field is not None else None
        if not isinstance(node, dict):
            return
        if part not in node and isinstance(default, BaseModel):
            node[part] = default.model_dump(mode="json")
            seeded.add(tuple(path[: i + 1]))
        node = node.get(part)
        cls = type(default) if isinstance(default, BaseModel) else _model_class(field)


def _model_class(field) -> Optional[type[BaseModel]]:
    ann = getattr(field, "annotation", None)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def apply_overrides(data: dict, overrides: Sequence[str], cls: Optional[type[BaseModel]] = None) -> dict:
    """Set every ``a.b.c=value`` in ``data``; with ``cls``, a section the data lacks starts from its default."""
    problems, seeded = [], set()
    for ov in overrides:
        try:
            path, value = parse_override(ov)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        _seed_defaults(cls, data, path, seeded)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                problems.append((".".join(path[: i + 1]), f"is a {type(nxt).__name__}, cannot set {'.'.join(path)}"))
                break
            node = nxt
        else:
            if path[-1] == "type" and tuple(path[:-1]) in seeded and node.get("type") != value:
                node.clear()  # a part section copied from the default of another type: its parameters do not apply
            node[path[-1]] = value
    if problems:
        raise ConfigError(problems, "overrides")
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError([("<file>", f"config file {str(p)!r} does not exist")], str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([("<file>", f"YAML syntax error: {e}")], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([("<root>", "top level of a config must be a mapping")], str(p))
    return data


def validate(cls: type[C], data: dict, source: str = "") -> C:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_problems_from(e), source) from None


def load_config(cls: type[C], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> C:
    """Load ``path`` (or the class defaults when None), apply dotted overrides, validate."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, overrides, cls)
    return validate(cls, data, str(path) if path else "defaults")


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
