"""Per-epoch cost of the training data: the streaming graph re-run every epoch vs the held path.

Builds a small feature set like the demo's instruction set (synthetic shards -> vlp precompute with the demo
tower), then, in one process and one local Ray, delivers several epochs of it to 2 readers (the way 2 Train
workers consume it), alternating rounds: ``stream`` (``data.materialize: never``: vlp.train.trainer.
build_dataset, read -> Mixture -> DropSeen -> Tokenize -> streaming split) and ``held`` (``materialize``:
build_held tokenises once, then each reader takes its rows from vlp.train.held.HeldRows' epoch plan).
Reports seconds per epoch (all rows delivered to both readers) and the ratio. Results:
bench/results/epoch.json; table in docs/benchmarks_train.md.

    python bench/bench_epoch.py [--quick] [--rounds 3] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from _benchutil import WORK, loadavg, spread, write_json


def feature_set(n: int) -> str:
    from vlp.config import validate
    from vlp.synth.demo import DemoConfig, run_demo

    root = WORK / f"epoch-{n}"
    cfg = validate(DemoConfig, {"root": str(root), "train": False, "ray": {"progress_bars": False},
                                "shards": {"videos": 0, "images": 0, "instructions": n, "heldout": 0}})
    run_demo(cfg, log=lambda *_: None)
    return str(root / "features" / "instruct")


def epoch_seconds(uri: str, mode: str, epochs: int, tmp: str) -> list[float]:
    """[setup seconds, then seconds per epoch] of ``mode`` (stream or held) over 2 readers."""
    from vlp.config import validate
    from vlp.train import TrainConfig
    from vlp.train.data import iter_rows, write_state
    from vlp.train.held import HeldRows
    from vlp.train.trainer import build_dataset, build_held

    cfg = validate(TrainConfig, {
        "run_name": "bench", "output_dir": tmp, "epochs": epochs,
        "data": {"sets": [{"uri": uri}], "template": "vicuna_v1", "max_length": 512},
        "model": {"llm": {"path": "preset:tiny-llama", "trainable": True}},
        "batch": {"global_size": 32, "micro_size": 16}, "scaling": {"num_workers": 2}})
    state = f"{tmp}/state-{mode}.json"
    t0 = time.perf_counter()
    if mode == "held":
        refs = build_held(cfg)
        readers = [HeldRows(refs) for _ in range(2)]
    else:
        its = build_dataset(cfg, state).streaming_split(2, equal=True)
    build = time.perf_counter() - t0
    out = []
    for epoch in range(epochs):
        write_state(state, epoch, [])
        counts = [0, 0]

        def read(i):
            rows = (readers[i].rows(readers[i].plan(0, epoch, set(), i, 2)) if mode == "held" else
                    iter_rows(its[i].iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2)))
            counts[i] = sum(1 for _ in rows)

        t = time.perf_counter()
        th = [threading.Thread(target=read, args=(i,)) for i in range(2)]
        for x in th:
            x.start()
        for x in th:
            x.join()
        out.append(time.perf_counter() - t)
        assert sum(counts) > 0, counts
    return [build] + out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 3 epochs (sanity check)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per mode (default 3)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per round (default 6, quick 3)")
    ap.add_argument("--samples", type=int, default=192, help="instruction samples in the feature set")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    epochs = args.epochs or (3 if args.quick else 6)

    import tempfile

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    uri = feature_set(args.samples)
    load_before = loadavg()
    res: dict[str, list] = {"stream": [], "held": []}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            per = {}
            for mode in (("stream", "held") if r % 2 == 0 else ("held", "stream")):
                secs = epoch_seconds(uri, mode, epochs, tmp)
                res[mode].append({"build_s": round(secs[0], 3), "epoch_s": [round(x, 3) for x in secs[1:]]})
                per[mode] = statistics.median(secs[2:] if len(secs) > 2 else secs[1:])  # epochs after the first
                print(f"round {r} {mode:<6} build {secs[0]:.2f}s epochs {' '.join(f'{x:.2f}' for x in secs[1:])}",
                      flush=True)
            ratios.append(per["stream"] / per["held"])
    med = {m: statistics.median(x for rr in v for x in rr["epoch_s"][1:]) for m, v in res.items()}
    payload = {"samples": args.samples, "epochs_per_round": epochs, "rounds": rounds, "feature_set": uri,
               "loadavg_before": load_before, "loadavg_after": loadavg(), "runs": res,
               "median_epoch_s_after_first": {m: round(v, 3) for m, v in med.items()},
               "speedup_held": spread(ratios)}
    path = write_json("epoch", args.quick, payload)
    print(f"median s/epoch (after the first): stream {med['stream']:.2f}, held {med['held']:.2f}; "
          f"ratio per round {spread(ratios)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
