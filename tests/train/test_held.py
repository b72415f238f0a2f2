"""The held path's epoch plan without Ray: the same copies as the streaming graph's Mixture, the resume filter,
one seeded order per epoch, and disjoint rank shares (HeldRows itself runs in tests/train/test_train.py)."""

from __future__ import annotations

import numpy as np

from vlp.train.data import Mixture, mixture_passes, write_state
from vlp.train.held import epoch_plan, rank_share

SETS = [(1.0, [f"s0:a{i}" for i in range(40)]), (2.5, [f"s1:b{i}" for i in range(30)]),
        (0.5, [f"s2:c{i}" for i in range(50)])]


def _mixture_uids(tmp_path, epoch: int) -> set[str]:
    """What the streaming graph's Mixture passes give for SETS in ``epoch``."""
    state = str(tmp_path / "state.json")
    write_state(state, epoch, [])
    out = set()
    for i, (w, uids) in enumerate(SETS):
        base = np.asarray([u.partition(":")[2] for u in uids], dtype=object)
        for k in range(mixture_passes(w)):
            out |= set(Mixture(f"s{i}", w, 7, state, "auto", copy=k)({"uid": base})["uid"])
    return out


def test_the_plan_holds_the_mixtures_copies(tmp_path):
    for epoch in (0, 1):
        plan = epoch_plan(SETS, 7, epoch, set())
        uids = [e[2] for e in plan]
        assert len(uids) == len(set(uids)) and set(uids) == _mixture_uids(tmp_path, epoch)
        assert 40 + 60 + 10 < len(uids) < 40 + 90 + 40  # 2.5: two passes and a seeded half; 0.5: a seeded half
        for i, j, uid in plan:
            assert uid.split("#")[0] == SETS[i][1][j]


def test_seen_rows_are_left_out_and_the_order_replays_from_the_seed():
    plan = epoch_plan(SETS, 7, 3, set())
    seen = {e[2] for e in plan[:25]}
    rest = epoch_plan(SETS, 7, 3, seen)
    assert {e[2] for e in rest} == {e[2] for e in plan[25:]}
    assert epoch_plan(SETS, 7, 3, set()) == plan  # every worker computes the same plan
    other = epoch_plan([SETS[0]], 7, 4, set())
    assert sorted(other) == sorted(epoch_plan([SETS[0]], 7, 3, set())) and other != epoch_plan([SETS[0]], 7, 3, set())


def test_rank_shares_split_the_plan_without_overlap():
    plan = epoch_plan(SETS, 7, 0, set())
    shares = [rank_share(plan, r, 3) for r in range(3)]
    assert sorted(e for s in shares for e in s) == sorted(plan)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert epoch_plan([], 7, 0, set()) == []


def test_the_plan_does_not_depend_on_the_order_rows_came_in():
    shuffled = [(w, list(np.random.default_rng(1).permutation(uids))) for w, uids in SETS]
    assert ([e[2] for e in epoch_plan(shuffled, 7, 2, set())] == [e[2] for e in epoch_plan(SETS, 7, 2, set())])
