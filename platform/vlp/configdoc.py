"""Configuration reference generated from the config classes (``vlp config-docs``)."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from .models.parts import PartCfg


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin is typing.Union:
        return " \\| ".join(_type_name(a) for a in args if a is not type(None)) + (
            " \\| None" if type(None) in args else "")
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args if a is not Ellipsis)}]"
    return getattr(ann, "__name__", str(ann))


def _row(path: str, type_name: str, default: str, desc: str | None) -> str:
    return f"| `{path}` | {type_name} | `{default}` | {(desc or '').replace('|', chr(92) + '|')} |"


def _rows(model: type[BaseModel], prefix: str = "", inst: BaseModel | None = None) -> list[str]:
    """One table row per leaf field; ``inst`` is the parent's default instance of ``model`` (its values, not the
    class defaults, are what a config gets: e.g. the demo's tower path or stage-2 epochs)."""
    rows = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = f.annotation
        cur = getattr(inst, name) if inst is not None else (None if f.is_required() else f.default)
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if typing.get_origin(ann) is list and typing.get_args(ann) and isinstance(typing.get_args(ann)[0], type) \
                and issubclass(typing.get_args(ann)[0], BaseModel):
            rows += _rows(typing.get_args(ann)[0], f"{path}[].")
            continue
        if sub is not None and issubclass(sub, PartCfg) and sub.parts is not None:
            rows += part_rows(sub, f"{path}.", cur)
            continue
        if sub is not None:
            rows += _rows(sub, f"{path}.", cur if isinstance(cur, BaseModel) else None)
            continue
        default = "required" if inst is None and f.is_required() else repr(cur)
        rows.append(_row(path, _type_name(ann), default, f.description))
    return rows


def part_rows(base: type[PartCfg], prefix: str, cur) -> list[str]:
    """A registry-backed union (models/parts.py): the default type's rows, ``type`` listing vlp's own types, then
    the parameters of the other types, each marked with its type. Plugins' types are not listed."""
    reg = base.parts
    if not isinstance(cur, base) or type(cur) is base:
        cur = reg.config(cur.model_dump() if isinstance(cur, BaseModel) else None)
    rows = []
    for line in _rows(type(cur), prefix, cur):
        if line.startswith(f"| `{prefix}type` |"):
            names = " \\| ".join(repr(n) for n in reg.builtin_names())
            line = _row(f"{prefix}type", names, repr(cur.type), f"a registered {reg.kind} class "
                        "(docs/extending.md); parameters of one type only are marked with it")
        rows.append(line)
    for name in reg.builtin_names():
        cls = reg.cfg_class(name)
        if cls is type(cur):
            continue
        for fname, f in cls.model_fields.items():
            if fname not in base.model_fields:
                default = "required" if f.is_required() else repr(f.default)
                rows.append(_row(f"{prefix}{fname}", _type_name(f.annotation), default,
                                 f"(type {name}) {f.description or ''}".strip()))
    return rows


def config_reference() -> str:
    from .config_kinds import CONFIG_KINDS, register_kinds

    register_kinds()
    out = ["# Configuration reference", "",
           "Generated from the config classes by `vlp config-docs` (a test checks it is current). Every key can be "
           "set in YAML or overridden on the command line as `dotted.path=value`; unknown keys and bad values fail "
           "before any work with one message listing every problem.", ""]
    for name in CONFIG_KINDS.names():
        cls = CONFIG_KINDS.get(name)
        out += [f"## `{name}` ({cls.__name__})", "", (cls.__doc__ or "").strip().splitlines()[0], "",
                "Shipped files: `configs/**/" + name + "*.yaml`.", "",
                "| key | type | default | description |", "|---|---|---|---|", *_rows(cls), ""]
    return "\n".join(out)
