"""How far an epoch got, in a checkpoint whose size does not grow with the samples seen.

A checkpoint used to list the uid of every sample trained on in its epoch (``seen``: ~1.3 M ids for Valley's
stage 1, gathered to rank 0 at every checkpoint). It now says, per data path:

* held (:mod:`vlp.train.held`): each rank's stream of an epoch is a pure function of (seed, epoch, rank, world), so
  the optimizer steps done in the epoch (and the world size they were done with) are enough: a resumed worker
  rebuilds the same stream and passes over the ``steps x grad_accum`` micro-batches already trained on.
* stream (Ray Data's streaming split, not replayable): progress per *unit*, one pass of the mixture over one
  feature-set part (``s<i>.<pass>.<part index>``). A unit whose rows for the epoch have all been consumed
  (trained on, or skipped at tokenisation) is kept as done: ranges of part indices per set and pass; of the
  others, the rows consumed so far as ranges of their positions in the unit (its rows for the epoch in part
  order: a part streams in order, so what it has consumed is nearly a prefix with holes where rows are still
  in buffers). Size: the parts, plus about the rows in flight.
* seen: the uids consumed, as before; for checkpoints written before this format, and for the rare conversions
  (a held checkpoint resumed with another world size, a streaming one resumed on the held path), for the rest of
  that epoch only.

Plain data and functions (no Ray, no torch): :class:`EpochState` (what vlp_state.json holds) and
:class:`PartProgress` (rank 0's account of a streaming epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

FORMAT = 2  # vlp_state.json format; checkpoints before it have no "format" and list every uid in "seen"


def unit_of(set_name: str, copy: int, part: int) -> str:
    """The unit of pass ``copy`` of a set over its part number ``part`` (index in the set's committed parts)."""
    return f"{set_name}.{copy}.{part}"


def split_unit(unit: str) -> tuple[str, int, int]:
    """``s0.1.17`` -> ("s0", 1, 17)."""
    name, copy, part = unit.rsplit(".", 2)
    return name, int(copy), int(part)


def to_ranges(nums: Iterable[int]) -> list[list[int]]:
    """[0, 1, 2, 5, 7, 8] -> [[0, 2], [5, 5], [7, 8]] (inclusive ranges of the sorted distinct numbers)."""
    out: list[list[int]] = []
    for n in sorted(set(nums)):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> Iterator[int]:
    for a, b in ranges:
        yield from range(int(a), int(b) + 1)


def done_units(done: dict) -> set[str]:
    """{"s0.0": [[0, 2]]} -> {"s0.0.0", "s0.0.1", "s0.0.2"}: the units a state's ``done`` names."""
    return {f"{key}.{p}" for key, ranges in done.items() for p in from_ranges(ranges)}


class PartProgress:
    """Rank 0's account of a streaming epoch: units (:func:`unit_of`) all of whose rows for the epoch were
    consumed are done; of the others, the uids consumed so far (ranges of their positions in the state).
    ``units(unit)`` is the number of rows the unit gives the epoch, asked once per unit when its first row is
    added, and ``units.uids(unit)`` those rows' uids in order, read only for the units open at a checkpoint
    (:class:`vlp.train.data.EpochUnits`)."""

    def __init__(self, units, state: Optional[dict] = None):
        state = state or {}
        self.units = units
        self.done: dict[str, set[int]] = {k: set(from_ranges(r)) for k, r in state.get("done", {}).items()}
        self.open: dict[str, set[str]] = {u: open_uids(units.uids(u), r) for u, r in state.get("open", {}).items()}
        self.want: dict[str, int] = {}
        self.index: dict[str, dict[str, int]] = {}  # open unit -> uid -> position (built at a checkpoint)

    def add(self, unit: str, uid: str) -> None:
        """One consumed row (a uid of unit ``unit``); the unit becomes done with its last row."""
        key, part = unit.rsplit(".", 1)
        if int(part) in self.done.get(key, ()):
            raise RuntimeError(f"row {uid} of unit {unit} consumed after the unit was done (a row trained twice)")
        rows = self.open.setdefault(unit, set())
        rows.add(uid)
        if unit not in self.want:
            self.want[unit] = self.units(unit)
        if len(rows) > self.want[unit]:
            raise RuntimeError(f"unit {unit}: {len(rows)} rows consumed, the epoch holds {self.want[unit]}")
        if len(rows) == self.want[unit]:
            self.done.setdefault(key, set()).add(int(part))
            del self.open[unit]
            self.index.pop(unit, None)

    def state(self) -> dict:
        """JSON: {"done": {"s<i>.<pass>": [[first, last], ...]}, "open": {unit: [[first, last], ...]}} (part
        indices; positions of the rows consumed in the unit's rows)."""
        for u in self.open:
            if u not in self.index:
                self.index[u] = {uid: i for i, uid in enumerate(self.units.uids(u))}
        return {"done": {k: to_ranges(v) for k, v in sorted(self.done.items())},
                "open": {u: to_ranges(self.index[u][uid] for uid in v) for u, v in sorted(self.open.items())}}


def open_uids(uids: list[str], ranges) -> set[str]:
    """The uids at the positions ``ranges`` of a unit's rows ``uids``."""
    return {uids[i] for i in from_ranges(ranges)}


def state_ids(parts: dict) -> int:
    """How many ranges a streaming state holds (done and open): what must stay bounded."""
    return sum(len(v) for v in parts.get("done", {}).values()) + sum(len(v) for v in parts.get("open", {}).values())


@dataclass
class EpochState:
    """Where a checkpoint left its epoch (vlp_state.json less step, epoch and final). ``mode``: "held" (``steps``
    optimizer steps done by ``world`` ranks), "stream" (``parts``: :meth:`PartProgress.state`) or "seen" (``seen``:
    every uid consumed). ``counters``: skipped and tail-dropped rows of the run so far, summed over ranks, as
    far as the resumed run will not count them again (held: up to the epoch's start, which the replay recounts;
    stream and seen: the skipped rows consumed, and the tails of finished epochs)."""

    mode: str
    steps: int = 0
    world: int = 0
    parts: dict = field(default_factory=dict)
    seen: list = field(default_factory=list)
    counters: Optional[dict] = None

    @classmethod
    def from_json(cls, st: dict) -> "EpochState":
        """The state of a vlp_state.json; one written before this format (a ``seen`` list) is mode "seen"."""
        if "format" not in st:
            return cls(mode="seen", seen=list(st.get("seen", [])))
        return cls(mode=st["mode"], steps=int(st.get("epoch_steps", 0)), world=int(st.get("world", 0)),
                   parts=st.get("parts") or {}, seen=list(st.get("seen") or []), counters=st.get("counters"))

    def to_json(self) -> dict:
        out = {"format": FORMAT, "mode": self.mode, "epoch_steps": self.steps, "world": self.world,
               "counters": self.counters}
        if self.mode == "stream":
            out["parts"] = self.parts
        if self.mode == "seen":
            out["seen"] = self.seen
        return out

    def started(self) -> bool:
        """Whether anything of the epoch was consumed (a fresh epoch needs no resume filter)."""
        return bool(self.steps or self.seen or self.parts.get("done") or self.parts.get("open"))

    def describe(self) -> str:
        if self.mode == "held":
            return f"{self.steps} steps of it done by {self.world} ranks"
        if self.mode == "stream":
            n_done = len(done_units(self.parts.get("done", {})))
            n_open = sum(len(list(from_ranges(v))) for v in self.parts.get("open", {}).values())
            return f"{self.steps} steps of it done: {n_done} part passes done, {n_open} rows of others"
        return f"{len(self.seen)} samples already seen in it"
