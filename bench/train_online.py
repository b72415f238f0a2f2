"""Training benchmark 3, online encoding: precomputed features vs running the CLIP tower at every step.

    .venv/bin/python bench/train_online.py [--quick]

One process, 1 torch thread, the same length-grouped micro-batches of 8 in both modes: (a) Valley-pooled
features read from the feature set (vlp.train.recipe.batch_inputs, as the worker builds them) vs (b) uint8
frames (decoded + resized once, as precompute did), each step normalize + tiny-clip tower forward +
pool_valley(mode="frames") before the LLM forward/backward. The forward, backward and optimizer step are
vlp.train.recipe's (a plain PyTorch engine, bench/_train_common.PlainEngine). Alternating blocks of steps
(8 rounds of 4; --quick: 4 rounds of 3). Writes the ``online`` part of bench/results/train.json.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import spread  # noqa: E402
from _train_common import (GLOBAL, LR, SEED, PlainEngine, bench_main, model_config,  # noqa: E402
                           read_feature_rows, tokenise)

import numpy as np  # noqa: E402

ONLINE_ROWS = 96    # the samples whose decoded frames are held in memory (8 x 3 x 224 x 224 uint8 each)


def fingerprint(root: Path):
    """The instruct feature set's fingerprint (its sampling and preprocessing)."""
    from vlp.formats.featureset import FeatureSetLayout, Fingerprint

    return Fingerprint.read(FeatureSetLayout(str(root / "features" / "instruct")))


def decode_frames(root: Path, uids: set[str]) -> dict:
    """uid -> uint8 (T, 3, S, S): the shard media decoded, sampled and resized exactly as precompute did."""
    import torch

    from vlp.data.media import DecodeConfig, SamplingConfig
    from vlp.precompute.stages import DecodeFrames, ReadShard, shape_of

    fp = fingerprint(root)
    dec = DecodeFrames(SamplingConfig.model_validate(fp.sampling), DecodeConfig(), fp.preprocess.size, fp.preprocess.pad_to_square,
                       tuple(fp.preprocess.mean))
    out = {}
    for tar in sorted((root / "shards").glob("instruct-*.tar")):
        for row in ReadShard()({"shard": tar.stem, "uri": str(tar)}):
            uid = f"{row['shard']}/{row['key']}"
            if row["kind"] != "sample" or uid not in uids:
                continue
            r = dec.decode_row(row)  # one sample, one item: per-item lists of length 1
            arr = np.frombuffer(r["frames"][0], np.uint8).reshape(shape_of(r["frames_shape"][0]))
            out[uid] = torch.from_numpy(arr.copy())
    return out


class Stepper:
    """One training step on a micro-batch, with features read (precomputed) or made by the tower (online)."""

    def __init__(self, root: Path, frames: dict):
        import torch

        from vlp.models.videollm import VideoLLM
        from vlp.models.towers import build_vision_tower

        self.frames = frames
        self.tower = build_vision_tower({"type": "clip", "path": "preset:tiny-clip", "device": "cpu", "dtype": "float32"})
        self.pp = fingerprint(root).preprocess  # precompute's
        torch.manual_seed(SEED)
        model = VideoLLM(model_config())
        self.engine = PlainEngine(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR))

    def inputs(self, mb: list[dict], online: bool) -> tuple:
        import torch

        from vlp.data.preprocess import normalize
        from vlp.train.recipe import batch_inputs

        if not online:
            return batch_inputs(mb, "cpu", torch.float32)
        x = torch.cat([self.frames[r["uid"]] for r in mb])  # (sum T, 3, S, S) uint8
        lens = [self.frames[r["uid"]].shape[0] for r in mb]
        px = normalize(x, self.pp.mean, self.pp.std, self.tower.dtype)
        f = self.tower.features(px)  # (sum T, 1 + P, D), no grad (frozen tower)
        return ([torch.as_tensor(r["input_ids"]) for r in mb], [torch.as_tensor(r["labels"]) for r in mb],
                list(torch.split(f, lens)), ["frames"] * len(mb), lens)  # pool_valley(mode="frames") in the model

    def __call__(self, mb: list[dict], online: bool) -> tuple[float, float]:
        """(step seconds, seconds of it spent on the inputs: features read, or normalize + tower)."""
        t0 = time.perf_counter()
        args = self.inputs(mb, online)
        t_vis = time.perf_counter() - t0
        out = self.engine(*args)
        self.engine.backward(out.loss)
        self.engine.step()
        return time.perf_counter() - t0, t_vis


def frames_and_batches(root: Path) -> tuple[dict, list[list[dict]]]:
    """(uid -> decoded uint8 frames, the length-grouped micro-batches of GLOBAL rows holding them): the first
    ONLINE_ROWS tokenised rows of the instruct set whose media decode, what the online and tower benchmarks step on."""
    from vlp.train.data import length_grouped

    rows = tokenise(read_feature_rows(str(root / "features" / "instruct")))[:ONLINE_ROWS]
    frames = decode_frames(root, {r["uid"] for r in rows})
    rows = [r for r in rows if r["uid"] in frames]
    return frames, length_grouped(rows, GLOBAL, np.random.default_rng(SEED), True)


def bench_online(root: Path, rounds: int, steps_per_block: int) -> dict:
    import torch

    torch.set_num_threads(1)
    frames, mbs = frames_and_batches(root)
    step = Stepper(root, frames)
    for mb in mbs[:2]:  # warm-up both paths
        step(mb, False)
        step(mb, True)
    res = {"pre": [], "online": [], "online_visual": [], "pre_visual": []}
    ratios = []
    k = 0
    for rnd in range(rounds):
        blk = {}
        for mode in (("pre", "online") if rnd % 2 == 0 else ("online", "pre")):
            ts = []
            for j in range(steps_per_block):
                dt, tv = step(mbs[(k + j) % len(mbs)], mode == "online")
                ts.append(dt)
                res[f"{mode}_visual"].append(tv)
            res[mode] += ts
            blk[mode] = sum(ts)
        k += steps_per_block
        ratios.append(blk["online"] / blk["pre"])
    pre, onl = statistics.median(res["pre"]), statistics.median(res["online"])
    n_frames = statistics.mean(sum(frames[r["uid"]].shape[0] for r in mb) for mb in mbs)
    return {"micro_batch": GLOBAL, "micro_batches": len(mbs), "frames_per_micro_batch_mean": round(n_frames, 1),
            "rounds": rounds, "steps_per_block": steps_per_block, "torch_threads": 1,
            "step_s_median": {"precomputed": round(pre, 4), "online": round(onl, 4)},
            "visual_part_s_median": {"precomputed_read_fp16": round(statistics.median(res["pre_visual"]), 4),
                                     "online_normalize_tower": round(statistics.median(res["online_visual"]), 4)},
            "ratio_online_over_precomputed": spread(ratios),
            "ratio_median_steps": round(onl / pre, 3),
            "summary": f"online/precomputed step time {onl / pre:.2f}x (median steps)"}


def main() -> None:
    bench_main("online", __file__, __doc__, "4 rounds of 3 steps instead of 8 of 4", lambda a, root, work: bench_online(
        root, rounds=4 if a.quick else 8, steps_per_block=3 if a.quick else 4))

if __name__ == "__main__":
    main()
