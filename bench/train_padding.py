"""Training benchmark 4, padding: length-grouped micro-batches vs random batching.

    .venv/bin/python bench/train_padding.py [--quick]

Padding fraction of the micro-batches that the worker's own stream (vlp.train.recipe.micro_batches: windows of
micro x grad_accum x group_window rows, each cut by vlp.train.data.length_grouped) makes with grouping by length
(the default), by modality then length (data.group_by_modality, LLaVA's order) and without grouping (random), on
tokenised rows of a mixture: instruction videos (264 visual tokens) and images (257), caption rows, long
multi-turn conversations and text-only conversations. Averaged over 30 stream orders (10 with --quick).
Writes the ``padding`` part of bench/results/train.json (bench/_train_common.py).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_common import SEED, TARGET_PAD, bench_main, read_feature_rows, tokenise  # noqa: E402

import numpy as np  # noqa: E402

# (micro, grad_accum); (16, 4) = the TrainConfig defaults at 2 workers
PAD_CONFIGS = ((4, 1), (8, 1), (8, 2), (16, 1), (16, 4))
GROUP_WINDOW = 8  # TrainDataConfig.group_window default
ORDERS = {"random": (False, False), "grouped_by_length": (True, False),  # the library's default
          "grouped_by_modality_then_length": (True, True)}


def mixture_rows(root: Path) -> tuple[list[dict], dict]:
    """Tokenised rows of a mixed set: instruction videos/images as they are, caption rows (pretrain set),
    long multi-turn conversations and text-only conversations (copies of instruction rows, rewritten)."""
    instruct = read_feature_rows(str(root / "features" / "instruct"))
    pretrain = read_feature_rows(str(root / "features" / "pretrain"))
    rng = np.random.default_rng(SEED)
    long_rows, text_rows = [], []
    for i, r in enumerate(instruct):
        conv = json.loads(r["conversations"])
        qa = [(conv[j]["value"].split("\n", 1)[-1], conv[j + 1]["value"]) for j in range(0, len(conv), 2)]
        if i % 2 == 0:  # long: 4-12 turns
            turns = [qa[t % len(qa)] for t in range(int(rng.integers(4, 13)))]
            c = []
            for t, (q, a) in enumerate(turns):
                c += [{"from": "human", "value": (f"<{r['media_type']}>\n" if t == 0 else "") + q},
                      {"from": "gpt", "value": a}]
            long_rows.append({**r, "uid": r["uid"] + "~long", "conversations": json.dumps(c)})
        if i % 4 == 1:  # text-only: no placeholder, 1-6 turns
            c = []
            for t in range(int(rng.integers(1, 7))):
                q, a = qa[t % len(qa)]
                c += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            text_rows.append({**r, "uid": r["uid"] + "~text", "conversations": json.dumps(c)})
    inst = tokenise(instruct)
    rows = inst + tokenise(pretrain, fmt="caption") + tokenise(long_rows) + tokenise(text_rows)
    kinds = {"instruction video": sum(1 for r in inst if r["media_type"] == "video"),
             "instruction image": sum(1 for r in inst if r["media_type"] == "image"),
             "caption (video+image)": len(pretrain), "long multi-turn": len(long_rows), "text-only": len(text_rows)}
    return rows, kinds


def stream_padding(stream: list[dict], micro: int, window: int, seed: int, by_length: bool,
                   by_modality: bool) -> float:
    """Padding of the micro-batches the worker's stream makes of these rows (the tail remainder dropped)."""
    from vlp.train.data import padding_fraction
    from vlp.train.recipe import Counters, micro_batches

    mbs = list(micro_batches(iter(stream), micro, window, np.random.default_rng(seed), by_length, by_modality,
                             Counters()))
    return padding_fraction(mbs)


def bench_padding(root: Path, seeds: int) -> dict:
    rows, kinds = mixture_rows(root)
    no_text = [r for r in rows if not r["uid"].endswith("~text")]
    lens = [int(r["length"]) for r in rows]
    res = {"rows": len(rows), "kinds": kinds, "length_min": min(lens), "length_median": statistics.median(lens),
           "length_max": max(lens), "group_window": GROUP_WINDOW, "seeds": seeds,
           "note": "text-only rows keep the media_type of the feature row they came from (a feature set has no "
                   "text-only media type); window = micro x grad_accum x group_window (8), 1 worker",
           "configs": []}
    for mix_name, mix in (("with_text_only", rows), ("without_text_only", no_text)):
        for micro, accum in PAD_CONFIGS:
            window = micro * accum * GROUP_WINDOW
            rec = {"mixture": mix_name, "rows": len(mix), "micro": micro, "grad_accum": accum, "window": window}
            acc: dict = {name: [] for name in ORDERS}
            for seed in range(seeds):
                order = np.random.default_rng([SEED, seed]).permutation(len(mix))  # the stream's order
                stream = [mix[i] for i in order]
                for name, (by_length, by_modality) in ORDERS.items():
                    acc[name].append(stream_padding(stream, micro, window, seed, by_length, by_modality))
            for name, v in acc.items():
                rec[name] = round(float(statistics.mean(v)), 4)
            res["configs"].append(rec)
    res["summary"] = summary(res["configs"])
    return res


def summary(configs: list[dict]) -> dict:
    lib, mod = "grouped_by_length", "grouped_by_modality_then_length"
    main = next(c for c in configs if c["mixture"] == "with_text_only" and c["micro"] == 8 and c["grad_accum"] == 1)
    return {"micro8_window64_grouped": main[lib], "micro8_window64_random": main["random"],
            "micro8_window64_by_modality": main[mod],
            "worst_grouped": max(c[lib] for c in configs), "worst_by_modality": max(c[mod] for c in configs),
            "target": TARGET_PAD, "met": all(c[lib] < TARGET_PAD for c in configs),
            "met_configs": sum(c[lib] < TARGET_PAD for c in configs), "configs": len(configs)}


def main() -> None:
    bench_main("padding", __file__, __doc__, "10 stream orders instead of 30",
               lambda a, root, work: bench_padding(root, seeds=10 if a.quick else 30))

if __name__ == "__main__":
    main()
