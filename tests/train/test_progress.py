"""The resume state (vlp.train.progress) through the recipe's own epoch code: a state that stays bounded while an
epoch's samples grow, and exact resumes (what was consumed before the checkpoint plus what the resumed epoch streams
is the epoch's multiset: no duplicates, none missing) on the streaming path (the graph's Mixture and DropSeen over
real Parquet parts, in a random interleaving like Ray Data's, integer and fractional weights) and on the held path
(replayed; another world size; a checkpoint of the format before). Ray Train's own restart runs in
tests/train/test_train.py."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlp.config import validate
from vlp.train.config import TrainConfig
from vlp.train.data import DropSeen, EpochUnits, Mixture, mixture_passes, write_state
from vlp.train.progress import EpochState, PartProgress, done_units, from_ranges, state_ids, to_ranges
from vlp.train.recipe import Counters, TrainRecipe, take_group

ROWS_PER_PART = 25
WEIGHTS = (1.0, 2.5)  # integer: parts counted from the footer; 2.5: two whole passes and a seeded half


def _skip(uid: str) -> str:
    """Tokenize's verdict, fixed per sample: about one row in twelve is over max_length."""
    return "over max_length" if hashlib.md5(uid.split("#")[0].encode()).digest()[0] % 12 == 0 else ""


def _write_parts(root, n_parts: list[int]) -> list[list[str]]:
    """Per set, ``n`` real Parquet parts of ROWS_PER_PART rows (uid and length columns)."""
    out = []
    for i, n in enumerate(n_parts):
        paths = []
        for p in range(n):
            path = root / f"set{i}" / f"part-{p:03d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            uids = [f"sh{p}/{i}-{p}-{j}" for j in range(ROWS_PER_PART)]
            pq.write_table(pa.table({"uid": uids, "length": [20 + (7 * j) % 90 for j in range(ROWS_PER_PART)]}),
                           str(path))
            paths.append(str(path))
        out.append(paths)
    return out


def _cfg(n_sets: int = 2) -> TrainConfig:
    return validate(TrainConfig, {
        "run_name": "r", "data": {"sets": [{"uri": "unused", "weight": w} for w in WEIGHTS[:n_sets]],
                                  "template": "plain"},
        "model": {"vision_hidden_size": 64}, "batch": {"global_size": 4, "micro_size": 2},
        "scaling": {"num_workers": 1}})


def _graph_blocks(cfg: TrainConfig, parts: list[list[str]], state: str) -> list[list[dict]]:
    """Per unit (pass x part), the graph's blocks of 8 rows: the part as read_parquet(include_paths=True) reads
    it -> Mixture -> DropSeen -> Tokenize's columns (length, skip, media_type)."""
    units = []
    for k in range(max(mixture_passes(w) for w in WEIGHTS[:len(parts)])):
        for i, paths in enumerate(parts):
            w = cfg.data.sets[i].weight
            if k >= mixture_passes(w):
                continue
            mix = Mixture(f"s{i}", w, cfg.data.seed, state, "auto", copy=k, parts=paths)
            for path in paths:
                t = pq.read_table(path)
                blocks = []
                for a in range(0, t.num_rows, 8):
                    b = {c: np.asarray(t.column(c).to_pylist()[a:a + 8], dtype=object) for c in t.column_names}
                    b["path"] = np.asarray([path] * len(b["uid"]), dtype=object)
                    b = DropSeen(state, cfg.data.sets, parts, cfg.data.seed)(mix(b))
                    b["skip"] = np.asarray([_skip(u) for u in b["uid"]], dtype=object)
                    b["media_type"] = np.asarray(["video"] * len(b["uid"]), dtype=object)
                    blocks.append(b)
                units.append(blocks)
    return units


def _interleave(units: list[list[dict]], seed: int, concurrency: int = 3):
    """Rows of the units' blocks as a streaming executor gives them: ``concurrency`` parts read at once, their
    blocks interleaved in a seeded random order (Ray Data's order is not replayable: resume must not need it)."""
    rng = np.random.default_rng(seed)
    todo, active = [list(u) for u in units], []
    while todo or active:
        while todo and len(active) < concurrency:
            active.append(todo.pop(0))
        q = active[int(rng.integers(len(active)))]
        b = q.pop(0)
        if not q:
            active.remove(q)
        for j in range(len(b["uid"])):
            yield {k: v[j] for k, v in b.items()}


class InProcessStream(TrainRecipe):
    """The recipe with Ray Train's streaming split replaced by the graph's functions run here (a subclass that
    changes one step keeps the others: epoch_stream, begin_epoch, checkpoint_state are the recipe's)."""

    parts: list[list[str]] = []
    order_seed = 0

    def stream_rows(self, rng):
        return _interleave(_graph_blocks(self.cfg, self.parts, self.state_path), self.order_seed)


def _recipe(cfg, tmp_path, parts, order_seed: int, state: dict | None = None) -> InProcessStream:
    r = InProcessStream(cfg, {"run_dir": str(tmp_path), "state_path": str(tmp_path / "data_state.json"),
                              "held": None, "parts": parts})
    r.parts, r.order_seed = parts, order_seed
    if state is not None:
        r.restore_state(state)
    return r


def _train(recipe: TrainRecipe, epoch: int, stop_at: int | None, every: int):
    """Steps of ``recipe``'s epoch (take a group, count it consumed) with a checkpoint state every ``every``
    steps, until the stream ends or ``stop_at`` steps. -> (uids trained per step, [(state, steps) per checkpoint])."""
    stream, steps, ckpts = recipe.epoch_stream(epoch), [], []
    while stop_at is None or len(steps) < stop_at:
        group, _ = recipe.next_group(stream)
        if group is None:
            break
        recipe.consumed(group)
        steps.append([str(r["uid"]) for mb in group for r in mb])
        if len(steps) % every == 0:
            ckpts.append((recipe.checkpoint_state(epoch, False), len(steps)))
    return steps, ckpts


def _epoch_uids(cfg, parts, tmp_path, epoch: int) -> list[str]:
    state = str(tmp_path / "full_state.json")
    write_state(state, epoch)
    return [str(u) for unit in _graph_blocks(cfg, parts, state) for b in unit for u in b["uid"]]


class Units:
    """A fixed epoch of units (what EpochUnits reads from the parts): unit -> its rows' uids in order."""

    def __init__(self, rows: dict[str, list[str]]):
        self.rows = rows

    def __call__(self, unit: str) -> int:
        return len(self.rows[unit])

    def uids(self, unit: str) -> list[str]:
        return self.rows[unit]


def test_ranges_and_the_part_account():
    assert to_ranges([5, 0, 1, 2, 7, 8, 2]) == [[0, 2], [5, 5], [7, 8]] and to_ranges([]) == []
    assert list(from_ranges([[0, 2], [5, 5]])) == [0, 1, 2, 5]
    assert done_units({"s0.1": [[3, 4]]}) == {"s0.1.3", "s0.1.4"}
    units = Units({"s0.0.4": ["s0:a", "s0:b", "s0:c"], "s0.0.5": ["s0:d"], "s0.0.6": ["s0:e", "s0:f", "s0:g"]})
    acc = PartProgress(units)
    acc.add("s0.0.4", "s0:a")
    acc.add("s0.0.4", "s0:c")
    acc.add("s0.0.6", "s0:f")
    assert acc.state() == {"done": {}, "open": {"s0.0.4": [[0, 0], [2, 2]], "s0.0.6": [[1, 1]]}}
    acc.add("s0.0.4", "s0:b")
    assert acc.state() == {"done": {"s0.0": [[4, 4]]}, "open": {"s0.0.6": [[1, 1]]}}
    assert state_ids(acc.state()) == 2
    with pytest.raises(RuntimeError, match="after the unit was done"):
        acc.add("s0.0.4", "s0:a")
    again = PartProgress(units, json.loads(json.dumps(acc.state())))  # a resume: open positions -> uids
    again.add("s0.0.5", "s0:d")
    again.add("s0.0.6", "s0:e")
    again.add("s0.0.6", "s0:g")
    assert again.state() == {"done": {"s0.0": [[4, 6]]}, "open": {}}
    with pytest.raises(RuntimeError, match="2 rows consumed, the epoch holds 1"):
        PartProgress(Units({"s0.0.1": ["x"]}), {"open": {"s0.0.1": [[0, 0]]}}).add("s0.0.1", "y")


def test_epoch_units_count_what_mixture_gives(tmp_path):
    """Per unit, the rows EpochUnits expects (footer for a whole pass, uid column for the fractional one) are
    the rows Mixture streams, for integer and fractional weights, in two epochs."""
    cfg = _cfg()
    parts = _write_parts(tmp_path, [3, 3])
    for epoch in (0, 1):
        units = EpochUnits(cfg.data.sets, parts, cfg.data.seed, epoch)
        state = str(tmp_path / "s.json")
        write_state(state, epoch)
        got: dict = {}
        for unit in _graph_blocks(cfg, parts, state):
            for b in unit:
                for u, name in zip(b["uid"], b["unit"]):
                    got.setdefault(name, []).append(str(u))
        assert len(got) == 3 + 3 * 3
        assert all(units(name) == len(uids) and units.uids(name) == uids for name, uids in got.items())
        assert ROWS_PER_PART // 4 < units("s1.2.0") < ROWS_PER_PART and units("s1.1.2") == ROWS_PER_PART


def test_a_resumed_streaming_epoch_is_exact_and_its_state_stays_bounded(one_rank, tmp_path):
    """An epoch of 1000 + 2.5 x 500 rows over 60 parts; a checkpoint every 10 steps; the run dies at step 157 and
    resumes from the step-150 checkpoint in another streaming order. Trained before the checkpoint + trained after
    it + skipped + tail = the epoch, each row once; the skipped count is the epoch's; the state holds at most a
    few ranges, about the rows in flight (the old one held every uid consumed: up to the whole epoch)."""
    cfg, epoch = _cfg(), 2
    parts = _write_parts(tmp_path, [40, 20])
    full = _epoch_uids(cfg, parts, tmp_path, epoch)
    assert len(full) == len(set(full)) and 1000 + 1000 + 100 < len(full) < 1000 + 1000 + 500
    first = _recipe(cfg, tmp_path, parts, order_seed=0)
    before, ckpts = _train(first, epoch, stop_at=157, every=10)
    state, done_steps = ckpts[-1]
    assert done_steps == 150 and state["mode"] == "stream" and "seen" not in state
    json.loads((tmp_path / "data_state.json").read_text())  # the fresh epoch's: small, no uids
    resumed = _recipe(cfg, tmp_path, parts, order_seed=1, state=json.loads(json.dumps(state)))
    after, ckpts2 = _train(resumed, epoch, stop_at=None, every=10)
    data_state = json.loads((tmp_path / "data_state.json").read_text())
    assert data_state["parts"] == state["parts"] and "seen" not in data_state
    trained = [u for s in before[:done_steps] + after for u in s]
    assert len(trained) == len(set(trained)), "a row trained twice"
    skipped = {u for u in full if _skip(u)}
    assert not skipped & set(trained)
    tail = set(full) - set(trained) - skipped
    assert sum(resumed.counters.skipped.values()) == len(skipped)  # before the checkpoint (restored) + after it
    assert resumed.counters.tail_dropped == len(tail) and len(tail) < 32 + 4  # a window, a partial group
    sizes = [(state_ids(st["parts"]), len(json.dumps(st)), n) for st, n in ckpts + ckpts2]
    print("\nstate ids / vlp_state.json bytes / steps:", sizes[::5], "rows trained:", len(trained))
    window = cfg.batch.micro_size * cfg.batch.grad_accum * cfg.data.group_window  # 32 rows in flight
    assert max(ids for ids, _, _ in sizes) <= window + 16  # ranges: about the rows in flight, not the epoch's
    assert max(b for _, b, _ in sizes) < 1000 and len(trained) > 1800


def test_a_checkpoint_of_the_format_before_resumes_a_streaming_epoch(one_rank, tmp_path):
    """vlp_state.json as the code before wrote it (every uid trained on in the epoch, no format) resumes exactly:
    its epoch goes on in uids ("seen"), its skipped rows stream again and are counted then, once."""
    cfg, epoch = _cfg(), 0
    parts = _write_parts(tmp_path, [12, 6])
    full = _epoch_uids(cfg, parts, tmp_path, epoch)
    before, _ = _train(_recipe(cfg, tmp_path, parts, order_seed=0), epoch, stop_at=40, every=10)
    old = {"step": 40, "epoch": epoch, "seen": [u for s in before for u in s], "final": False}
    resumed = _recipe(cfg, tmp_path, parts, order_seed=1, state=old)
    after, ckpts = _train(resumed, epoch, stop_at=None, every=10)
    assert resumed.epoch_state.mode == "seen" and ckpts[0][0]["mode"] == "seen"
    trained = [u for s in before + after for u in s]
    skipped = {u for u in full if _skip(u)}
    assert len(trained) == len(set(trained)) and not skipped & set(trained)
    assert len(set(full) - set(trained) - skipped) == resumed.counters.tail_dropped < 36
    assert sum(resumed.counters.skipped.values()) == len(skipped)


def test_bad_unit_sources_and_a_held_state_on_the_streaming_path_fail_loudly(tmp_path):
    """A row from a file that is not one of the set's parts has no unit (a bug, not a user error: the trainer
    hands Mixture the parts it reads); a held checkpoint inside an epoch cannot be continued by a streaming
    worker (the driver refuses it first: tests/train/test_train_units.py)."""
    cfg = _cfg(1)
    parts = _write_parts(tmp_path, [1])
    state = str(tmp_path / "s.json")
    write_state(state, 0)
    mix = Mixture("s0", 1.0, 0, state, "auto", parts=parts)
    batch = {"uid": np.asarray(["a"], dtype=object), "path": np.asarray(["/elsewhere.parquet"], dtype=object)}
    with pytest.raises(RuntimeError, match="not one of s0's parts"):
        mix(batch)
    held_state = {"step": 3, "epoch": 0, "final": False, "format": 2, "mode": "held", "epoch_steps": 3, "world": 1}
    with pytest.raises(RuntimeError, match="cannot be resumed on the streaming data path"):
        _recipe(cfg, tmp_path, parts, 0, held_state).begin_epoch(0)


def _held_sets(ray, n: list[int]) -> list[dict]:
    """Held sets as build_held leaves them: tokenised blocks in Ray's object store (uid, length, skip, ...)."""
    out = []
    for i, count in enumerate(n):
        uids = [f"s{i}:u{j}" for j in range(count)]
        tables = [pa.table({"uid": uids[a:a + 16], "length": [20 + (13 * j) % 97 for j in range(a, min(a + 16, count))],
                            "skip": [_skip(u) for u in uids[a:a + 16]],
                            "media_type": ["video"] * len(uids[a:a + 16])}) for a in range(0, count, 16)]
        out.append({"weight": WEIGHTS[i], "blocks": [ray.put(t) for t in tables]})
    return out


def _held_recipe(cfg, tmp_path, held, rank: int, world: int, state: dict | None = None) -> TrainRecipe:
    r = TrainRecipe(cfg, {"run_dir": str(tmp_path), "state_path": str(tmp_path / "data_state.json"),
                          "held": held, "parts": []}, rank, world)
    if state is not None:
        r.restore_state(state)
    return r


def _mb_uids(stream) -> list[list[str]]:
    return [[str(r["uid"]) for r in mb] for mb in stream]


@pytest.mark.ray
def test_a_held_epoch_resumes_with_the_same_micro_batches_from_its_step_count(ray_local, one_rank, tmp_path):
    """Held: the state is the steps done (and the world size); each rank's resumed stream is the rest of the
    uninterrupted one, micro-batch for micro-batch, and the skipped rows are counted once (the replay counts
    the epoch's again: the state keeps the counters of the epochs before)."""
    cfg, epoch, accum = _cfg(), 1, _cfg().batch.grad_accum
    held = _held_sets(ray_local, [60, 40])
    one = _held_recipe(cfg, tmp_path, held, 0, 1)
    one.counters = Counters({"over max_length": 1000}, 3)  # as if earlier epochs had skipped and dropped rows
    stream = one.epoch_stream(epoch)
    for _ in range(5):
        one.consumed(take_group(stream, accum))
    state = one.checkpoint_state(epoch, False)
    assert one.counters.skipped["over max_length"] > 1000  # the epoch's skipped rows so far ...
    assert {k: v for k, v in state.items() if k != "step"} == {  # ... are not in the state: the replay counts them
        "epoch": 1, "final": False, "format": 2, "mode": "held", "epoch_steps": 5, "world": 1,
        "counters": {"skipped": {"over max_length": 1000}, "tail_dropped": 3}}
    state["world"] = 2  # the same, taken by two ranks
    for r in range(2):
        full = _held_recipe(cfg, tmp_path, held, r, 2)
        want = _mb_uids(full.epoch_stream(epoch))
        again = _held_recipe(cfg, tmp_path, held, r, 2, state)
        assert _mb_uids(again.epoch_stream(epoch)) == want[5 * accum:] and len(want) > 5 * accum
        assert again.counters.skipped.get("over max_length", 0) == (1000 if r == 0 else 0) + \
            full.counters.skipped.get("over max_length", 0)


@pytest.mark.ray
def test_a_held_state_resumes_on_another_world_size_and_an_old_seen_list_still_resumes(ray_local, one_rank,
                                                                                       tmp_path):
    """Another world size: the old ranks' streams are replayed to the uids they consumed ("seen" for the rest of
    the epoch); the new ranks stream the rest, once. A vlp_state.json from before (a ``seen`` list) resumes."""
    cfg, epoch = _cfg(), 0
    held = _held_sets(ray_local, [60, 40])
    plan = [str(r["uid"]) for r in _held_recipe(cfg, tmp_path, held, 0, 1).held_rows(epoch, 0, 1, set())]
    state = {"step": 9, "epoch": epoch, "final": False, "format": 2, "mode": "held", "epoch_steps": 3, "world": 2,
             "counters": {"skipped": {}, "tail_dropped": 0}}
    old = [_mb_uids(_held_recipe(cfg, tmp_path, held, r, 2).epoch_stream(epoch))[:3 * 2] for r in range(2)]
    three = [_held_recipe(cfg, tmp_path, held, r, 3, state) for r in range(3)]
    rest = [str(row["uid"]) for rec in three for row in rec.held_rows(epoch, rec.rank, 3, set(
        rec.begin_epoch(epoch).seen))]
    consumed = set(three[0].epoch_state.seen)
    assert three[0].epoch_state.mode == "seen" and {u for mbs in old for mb in mbs for u in mb} <= consumed
    assert sorted(rest + list(consumed)) == sorted(plan)  # each row of the epoch once: consumed or to come
    n_skip = sum(1 for u in consumed if _skip(u))
    assert n_skip and three[0].counters.skipped == {"over max_length": n_skip}  # they will not stream again
    legacy = {"step": 4, "epoch": epoch, "seen": plan[:10], "final": False}  # vlp_state.json before the format
    rec = _held_recipe(cfg, tmp_path, held, 0, 1, legacy)
    got = [u for mb in _mb_uids(rec.epoch_stream(epoch)) for u in mb]
    assert not set(got) & set(plan[:10]) and rec.epoch_state.mode == "seen"
    seen = rec.checkpoint_state(epoch, False)["seen"]  # that epoch goes on in uids: + the skipped rows read
    assert set(plan[:10]) <= set(seen) and all(_skip(u) for u in set(seen) - set(plan[:10]))


def test_a_streaming_state_on_the_held_path_becomes_its_uids(tmp_path):
    """data.materialize may change between attempts: a streaming checkpoint resumed on the held path drops the
    rows of its done units (read from their parts) and its open uids."""
    cfg = _cfg()
    parts = _write_parts(tmp_path, [2, 2])
    rec = _recipe(cfg, tmp_path, parts, 0)
    uids = rec.stream_uids(0, {"done": {"s1.2": [[0, 1]], "s0.0": [[1, 1]]}, "open": {"s1.0.0": [[0, 1], [5, 5]]}})
    units = EpochUnits(cfg.data.sets, parts, cfg.data.seed, 0)
    first = units.uids("s1.0.0")
    want = first[:2] + first[5:6] + units.uids("s0.0.1") + units.uids("s1.2.0") + units.uids("s1.2.1")
    assert Counter(uids) == Counter(want) and all(u.endswith("#2") for u in units.uids("s1.2.0"))
    assert EpochState.from_json({"step": 1, "epoch": 0, "seen": ["a"]}).mode == "seen"


def test_drop_seen_drops_done_units_and_consumed_rows(tmp_path):
    cfg = _cfg(1)
    parts = _write_parts(tmp_path, [3])
    state = str(tmp_path / "s.json")
    write_state(state, 0)
    blocks = [b for unit in _graph_blocks(cfg, parts, state) for b in unit]
    batch = {k: np.concatenate([b[k] for b in blocks]) for k in ("uid", "unit")}
    write_state(state, 0, parts={"done": {"s0.0": [[1, 1]]}, "open": {"s0.0.2": [[0, 9], [20, 20]]}})
    drop = DropSeen(state, cfg.data.sets, parts, cfg.data.seed)
    kept = list(drop(batch)["uid"])
    part2 = [str(u) for u, p in zip(batch["uid"], batch["unit"]) if p == "s0.0.2"]
    assert kept == [str(u) for u, p in zip(batch["uid"], batch["unit"]) if p == "s0.0.0"] + part2[10:20] + part2[21:]
    write_state(state, 0, seen=[str(batch["uid"][0])])  # a checkpoint of the format before
    assert list(DropSeen(state)(batch)["uid"]) == [str(u) for u in batch["uid"][1:]]
    write_state(state, 0)
    assert DropSeen(state)(batch) is batch
