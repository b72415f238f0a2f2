"""The base of the on-storage JSON records (fingerprint, manifest, shard commit, export info) and the one check of
a format version string. May import: errors only.

A record reads the JSON a format holds and writes it back key for key: unknown keys are kept (``extra="allow"``)
and only the keys that were read or set are written (``exclude_unset``), so a record loaded from an older file
and written again is that file.
"""

from __future__ import annotations

import json
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import UserError

R = TypeVar("R", bound="Record")


class RecordError(UserError, ValueError):
    """A format's JSON file is not valid JSON or lacks what its record needs (a torn or foreign file)."""

    exit_code = 1


class Record(BaseModel):
    """A JSON record of an on-storage format; see the module docstring for how it round-trips."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_json(self) -> dict:
        """The JSON object this record stands for (what was read or set, nothing filled in by defaults)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2).encode()

    @classmethod
    def from_json(cls: type[R], data: Any, source: str) -> R:
        """Validate a parsed JSON object; ``source`` (the file) names it in the error."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}" for x in e.errors())
            raise RecordError(f"{source} is not a valid {cls.__name__} record ({problems})") from None

    @classmethod
    def from_bytes(cls: type[R], data: bytes, source: str) -> R:
        return cls.from_json(parse_json(data, source), source)


def parse_json(data: bytes, source: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{source} is not valid JSON ({e})") from None


def format_problem(found: Optional[str], current: str) -> Optional[str]:
    """None when a reader of ``current`` (e.g. ``vlp-features/1``) can read ``found``; None is a file written
    before formats were versioned (the first version's layout). Otherwise why not: newer, or unknown."""
    if found is None or found == current:
        return None
    name, _, version = current.partition("/")
    f_name, _, f_version = str(found).partition("/")
    if f_name == name and f_version.isdigit() and version.isdigit() and int(f_version) > int(version):
        return f"format {found!r} is newer than this vlp reads ({current})"
    return f"format {found!r} is unknown to this vlp (it reads {current})"
