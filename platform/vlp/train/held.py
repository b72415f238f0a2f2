"""The held path of the training data: small feature sets tokenised once and split per epoch by a seeded plan.

With ``data.materialize`` (auto for sets up to ``data.materialize_max_mb``), the driver runs each set through
``TagSet -> Tokenize`` once and materialises the result in Ray's object store
(:func:`vlp.train.trainer.build_held`). Every worker then gets the blocks' object refs and, at each epoch,
computes the same :func:`epoch_plan` from (seed, epoch, uids already seen): the mixture's copies
(:func:`vlp.train.data.copies_of`, the streaming path's rule), less the seen ones, in one seeded permutation of
the whole epoch, dealt to the ranks in turn. So an epoch costs no Ray Data execution at all (the streaming path
starts a streaming split and re-runs mixture, resume filter and tokenisation every epoch: 1-2 s of start-up
per epoch on 2 CPUs, most of a small stage's time), the shuffle is global instead of a local buffer, and an
epoch's order replays exactly from the seed.

:func:`epoch_plan` and :func:`rank_share` are plain functions (no Ray); :class:`HeldRows` reads the blocks
(Ray's ``BlockAccessor``, zero-copy from the object store) and builds the rows the recipe streams.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .data import copies_of, mixture_passes

Entry = tuple[int, int, str]  # (set index, row index in the set, uid of this copy: set:uid or set:uid#k)


def epoch_plan(sets: list[tuple[float, list[str]]], seed: int, epoch: int, seen: set[str]) -> list[Entry]:
    """Every row one epoch trains on, in the order every worker agrees on. ``sets``: per feature set its weight
    and its rows' uids (``s<i>:<uid>``, as TagSet writes them). Pass k holds copy k of each sample whose copy
    count (:func:`copies_of` of seed, epoch, set, uid) is above k, uid ``s<i>:<uid>#k`` for k > 0, exactly the
    streaming path's Mixture; uids in ``seen`` (trained on before a resume) are left out; the rest, sorted by uid
    (whatever order the blocks came in), is permuted by a generator seeded with (seed, epoch, len(seen))."""
    entries: list[Entry] = []
    for k in range(max((mixture_passes(w) for w, _ in sets), default=0)):
        for i, (w, uids) in enumerate(sets):
            if k >= mixture_passes(w):
                continue
            suffix = f"#{k}" if k else ""
            for j, uid in enumerate(uids):
                name, _, base = uid.partition(":")
                if copies_of(w, seed, epoch, name, base) > k and uid + suffix not in seen:
                    entries.append((i, j, uid + suffix))
    entries.sort(key=lambda e: e[2])  # the blocks' order is Ray Data's (not replayable); uids are unique per copy
    order = np.random.default_rng([seed, epoch, len(seen)]).permutation(len(entries))
    return [entries[j] for j in order]


def rank_share(plan: list[Entry], rank: int, world: int) -> list[Entry]:
    """This rank's rows: every world-th entry from its rank on (shares differ by at most one row; the recipe's
    all-ranks-stop rule counts a longer share's leftover as tail-dropped)."""
    return plan[rank::world]


class HeldRows:
    """A worker's view of the held sets: ``sets`` is ``[{"weight": w, "blocks": [ObjectRef, ...]}, ...]`` (the
    materialised TagSet -> Tokenize blocks of each set, in order). Blocks are fetched once (zero-copy from
    the object store) and rows converted only when streamed."""

    def __init__(self, sets: list[dict]):
        import ray
        from ray.data.block import BlockAccessor

        self.blocks = [[BlockAccessor.for_block(b) for b in ray.get(list(s["blocks"]))] for s in sets]
        self.where: list[list[tuple[int, int]]] = []  # per set: row index -> (block, row in block)
        plan_sets = []
        for s, blocks in zip(sets, self.blocks):
            uids, where = [], []
            for b, acc in enumerate(blocks):
                col = acc.to_numpy("uid") if acc.num_rows() else []
                uids += [str(u) for u in col]
                where += [(b, j) for j in range(len(col))]
            self.where.append(where)
            plan_sets.append((float(s["weight"]), uids))
        self.plan_sets = plan_sets

    def plan(self, seed: int, epoch: int, seen: set[str], rank: int, world: int) -> list[Entry]:
        return rank_share(epoch_plan(self.plan_sets, seed, epoch, seen), rank, world)

    def rows(self, entries: list[Entry], chunk: int = 64) -> Iterator[dict]:
        """The tokenised rows of ``entries`` in order (uid set to the copy's), converted ``chunk`` at a time."""
        from ray.data.block import BlockAccessor

        for c in range(0, len(entries), chunk):
            part = entries[c:c + chunk]
            by_block: dict[tuple[int, int], list[int]] = {}
            for n, (i, j, _) in enumerate(part):
                by_block.setdefault((i, self.where[i][j][0]), []).append(n)
            out: list = [None] * len(part)
            for (i, b), ns in by_block.items():
                batch = self.blocks[i][b].take([self.where[i][part[n][1]][1] for n in ns])
                cols = BlockAccessor.for_block(batch).to_batch_format("numpy")
                for q, n in enumerate(ns):
                    out[n] = {k: v[q] for k, v in cols.items()}
                    out[n]["uid"] = part[n][2]
            yield from out
