"""Size of the resume state (vlp_state.json) over a long streaming epoch: the parts format vs the uid list before.

One epoch of a feature set of ``--rows`` rows in parts of ``--part-rows`` (Valley's stage 1: ~1.3 M samples)
streams through the recipe's own epoch code (vlp.train.recipe.TrainRecipe: epoch_stream, next_group, consumed,
checkpoint_state) in this process on one gloo rank: the graph's Mixture and DropSeen over real Parquet parts
(uid and length columns only: no features), ``--concurrency`` parts read at once with their blocks interleaved at
random, Ray Data's local shuffle buffer modelled by a buffer of ``--shuffle`` rows, about 1% of rows skipped at
"tokenisation". A checkpoint state every ``--every`` steps of ``--global-batch`` rows. Reports, per checkpoint,
the ids and bytes of the state and what the format before would have written (every uid trained on in the
epoch: computed, not serialised, from the same uids). Results: bench/results/resume_state.json; numbers in
docs/training.md ("Exact data position").

    python bench/bench_resume_state.py [--quick] [--rows 1300000] [--part-rows 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib

import numpy as np

from _benchutil import WORK, write_json


def write_parts(n_rows: int, part_rows: int) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = WORK / f"resume-state-{n_rows}-{part_rows}"
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for p in range(0, n_rows, part_rows):
        path = root / f"part-{p // part_rows:05d}.parquet"
        n = min(part_rows, n_rows - p)
        if not path.exists():
            uids = [f"shard{p // part_rows:05d}/{j:09d}" for j in range(n)]
            pq.write_table(pa.table({"uid": uids, "length": rng.integers(300, 2048, n)}), str(path))
        paths.append(str(path))
    return paths


def stream(paths: list[str], sets: list, state: str, seed: int, concurrency: int, shuffle: int):
    """The epoch's rows as a streaming split gives them: parts read ``concurrency`` at a time (blocks of 256
    interleaved at random), Mixture -> DropSeen per block, a local shuffle buffer of ``shuffle`` rows."""
    import pyarrow.parquet as pq

    from vlp.train.data import DropSeen, Mixture

    mix, drop = Mixture("s0", 1.0, 0, state, "auto", parts=paths), DropSeen(state, sets, [paths], 0)
    rng = np.random.default_rng(seed)

    def blocks(path):
        t = pq.read_table(path)
        cols = {c: np.asarray(t.column(c).to_pylist(), dtype=object) for c in t.column_names}
        for a in range(0, t.num_rows, 256):
            b = {k: v[a:a + 256] for k, v in cols.items()}
            b["path"] = np.asarray([path] * len(b["uid"]), dtype=object)
            yield drop(mix(b))

    todo, active, buf = list(paths), [], []
    while todo or active:
        while todo and len(active) < concurrency:
            active.append(blocks(todo.pop(0)))
        it = active[int(rng.integers(len(active)))]
        b = next(it, None)
        if b is None:
            active.remove(it)
            continue
        for j in range(len(b["uid"])):
            skip = "over max_length" if zlib.crc32(b["uid"][j].encode()) % 100 == 0 else ""  # ~1%, fixed per row
            buf.append({"uid": b["uid"][j], "unit": b["unit"][j], "length": int(b["length"][j]),
                        "media_type": "video", "skip": skip})
            if len(buf) >= shuffle:
                yield buf.pop(int(rng.integers(len(buf))))
    rng.shuffle(buf)
    yield from buf


def run(args) -> dict:
    import torch.distributed as dist

    from vlp.config import validate
    from vlp.train.config import TrainConfig
    from vlp.train.progress import state_ids
    from vlp.train.recipe import TrainRecipe

    paths = write_parts(args.rows, args.part_rows)
    cfg = validate(TrainConfig, {"run_name": "bench", "data": {"sets": [{"uri": "unused"}], "template": "plain"},
                                 "model": {"vision_hidden_size": 64},
                                 "batch": {"global_size": args.global_batch, "micro_size": args.global_batch // 8},
                                 "scaling": {"num_workers": 1}})
    run_dir = WORK / "resume-state-run"
    run_dir.mkdir(parents=True, exist_ok=True)

    class Recipe(TrainRecipe):
        def stream_rows(self, rng):
            return stream(paths, cfg.data.sets, self.state_path, 0, args.concurrency, args.shuffle)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    rec = Recipe(cfg, {"run_dir": str(run_dir), "state_path": str(run_dir / "data_state.json"), "held": None,
                       "parts": [paths]})
    t0, trained, old_bytes, points = time.perf_counter(), 0, 0, []
    old_wrapper = {"step": 0, "epoch": 0, "seen": [], "final": False}  # the format before, less its uids
    st = rec.epoch_stream(0)
    while True:
        group, _ = rec.next_group(st)
        if group is None:
            break
        rec.consumed(group)
        for mb in group:
            trained += len(mb)
            old_bytes += sum(len(json.dumps(str(r["uid"]))) + 2 for r in mb)  # '"uid", ' in the old list
        if rec.epoch_state.steps % args.every == 0:
            state = rec.checkpoint_state(0, False)
            points.append({"step": rec.epoch_state.steps, "rows_trained": trained,
                           "state_ids": state_ids(state["parts"]), "state_bytes": len(json.dumps(state)),
                           "old_ids": trained, "old_bytes": old_bytes + len(json.dumps(old_wrapper))})
    dist.destroy_process_group()
    return {"rows": args.rows, "part_rows": args.part_rows, "parts": len(paths), "global_batch": args.global_batch,
            "every": args.every, "concurrency": args.concurrency, "shuffle": args.shuffle,
            "seconds": round(time.perf_counter() - t0, 1), "rows_trained": trained,
            "max_state_ids": max(p["state_ids"] for p in points),
            "max_state_bytes": max(p["state_bytes"] for p in points),
            "last_old_ids": points[-1]["old_ids"], "last_old_bytes": points[-1]["old_bytes"],
            "checkpoints": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k rows (a sanity check)")
    ap.add_argument("--rows", type=int, default=1_300_000)
    ap.add_argument("--part-rows", type=int, default=1000)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--shuffle", type=int, default=1000)
    args = ap.parse_args()
    if args.quick:
        args.rows = 100_000
    res = run(args)
    summary = {k: v for k, v in res.items() if k != "checkpoints"}
    print(json.dumps(summary, indent=1))
    print("written:", write_json("resume_state", args.quick, res))


if __name__ == "__main__":
    main()
