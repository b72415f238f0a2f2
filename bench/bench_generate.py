"""Batched generation: answers/s of ``VideoLLM.generate_grouped`` (batches of 16) vs ``VideoLLM.generate`` one prompt
at a time, on the same prompts.

    .venv/bin/python bench/bench_generate.py [--quick] [--rounds R] [--prompts N] [--batch-size B]
                                             [--max-new-tokens T] [--patches P] [--threads K] [--cpu C]

Model (built in memory, seeded, untrained): a VideoLLM (valley pooler, linear connector from D=64 features) on a
LLaMA-family LM of width 512, 8 layers, 8 heads, MLP 1376 (~25M parameters; the tiny tokenizer's 531-token vocab),
float32 on CPU. Big enough that one decoding step of one prompt is mostly matrix work, not Python (the tiny-llama preset
of width 64 would make batching look better than it is).

Prompts (N=64 by default): a cycle of 4 kinds, each with its own question: a video (T=8, valley-pooled: P + 8
visual tokens), an image (T=1: P + 1), a text-only prompt, a video of T=4 (P + 4); P=64 patches by default (the
demo's 112 px tower; ``--patches 256`` is a 224 px CLIP's, written to generate_p256.json; ``--max-new-tokens 128``
to generate_n128.json). Random features, seeded. Every answer is greedy, up to
32 new tokens, stopped at the tokenizer's eos.

Sides: ``one_at_a_time`` = ``list(model.generate(...))`` for each prompt in turn (what ``vlp infer`` and ``vlp eval``
did before); ``batched`` = ``model.generate_grouped(prompts, B)``: batches of B=16 prompts of near embedded length
(what they do now: an infer actor call or an eval window holds 4 batches; here the 64 prompts are one window);
``batched_mixed`` = ``model.generate_batch`` on consecutive groups of B prompts, each mixing the four kinds (no
grouping: what a batch of a server is like). All include splicing the visual tokens. Fairness check: every side's
answers are compared token for token every round.

Timing: one warm-up round (not recorded), then R rounds (default 5), each running both sides once, the order
reversed every other round so that drift on this shared machine hits both alike; a ratio per round
(batched answers/s / one-at-a-time answers/s), reported as min/median/max. One process pinned to one core
(``--cpu``, default the last usable one) with one torch thread (``--threads K``: K threads on the last K usable
cores, written to generate_tK.json), so the numbers are per core, as
the other CPU benchmarks here: on this shared 2-core machine two intra-op threads competing with other jobs
made one-at-a-time decoding ~15x slower (OpenMP threads waiting on each other), which would have measured the
neighbours, not batching. CPU time taken by other processes is sampled from /proc.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import CpuAccount, loadavg, spread, write_json  # noqa: E402

TARGET = 4.0
KINDS = (("<video>\nWhat color is the shape?", 8, "video"), ("<image>\nWhat shape is shown?", 1, "image"),
         ("Name a colour that a shape in these clips can have, and one shape.", 0, None),
         ("<video>\nWhich direction does the shape move?", 4, "video"))
LLM = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
       "num_key_value_heads": 8}


def build_model(tok):
    """A VideoLLM on a seeded, untrained LLaMA of the sizes in ``LLM``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlp.config import validate
    from vlp.models.videollm import ModelConfig, VideoLLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, **LLM)).eval()
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}), llm=llm).eval()
    return model, sum(p.numel() for p in llm.parameters())


def make_prompts(tok, n: int, patches: int) -> list:
    """n prompts cycling through ``KINDS``, random (P + T, 64) valley-pooled features."""
    import torch

    from vlp.data.conversation import prompt_ids
    from vlp.models.videollm import Prompt

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        q, t, modality = KINDS[i % len(KINDS)]
        ids = torch.tensor(prompt_ids([{"from": "human", "value": q}], tok, "vicuna_v1"))
        feats = torch.randn(patches + t, 64, generator=g) if t else None
        out.append(Prompt(ids, feats, "valley_pooled", max(t, 1), modality))
    return out


def one_at_a_time(model, prompts, max_new: int, eos: int) -> list[list[int]]:
    return [list(model.generate(p.input_ids, p.features, p.mode, p.num_frames, max_new_tokens=max_new,
                                eos_token_id=eos, modalities=p.modalities)) for p in prompts]


def batched(model, prompts, max_new: int, eos: int, batch_size: int, share: bool) -> list[list[int]]:
    return model.generate_grouped(prompts, batch_size, max_new_tokens=max_new, eos_token_id=eos, share_prefix=share)


def batched_mixed(model, prompts, max_new: int, eos: int, batch_size: int, share: bool) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch_size):
        out += model.generate_batch(prompts[i:i + batch_size], max_new_tokens=max_new, eos_token_id=eos,
                                    share_prefix=share)
    return out


def timed_rounds(sides: dict, rounds: int) -> tuple[dict, dict, dict, list[bool]]:
    """Run every side once per round (warm-up round -1 unrecorded), order reversed every other round -> (wall
    seconds per side per round, this process's CPU seconds likewise, the answers of the last round per side, per
    round: were the sides' answers identical)."""
    names = list(sides)
    secs: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    answers: dict[str, list] = {}
    same = []
    for r in range(-1, rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t, c = time.perf_counter(), time.process_time()
            answers[n] = sides[n]()
            if r >= 0:
                secs[n].append(time.perf_counter() - t)
                cpu[n].append(time.process_time() - c)
        if r >= 0:
            same.append(all(answers[n] == answers[names[0]] for n in names))
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {secs[n][-1]:.1f}s (cpu {cpu[n][-1]:.1f}s)"
                                                            for n in names), flush=True)
    return secs, cpu, answers, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 prompts, 1 round (sanity check)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5, quick 1)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts (default 64, quick 16)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--patches", type=int, default=64, help="P: visual tokens per item are P + T")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, pinned to as many cores")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="batched sides run the prompts' shared prefix in every row (written to generate_noprefix)")
    ap.add_argument("--cpu", type=int, default=None, help="the one core to pin to (default: the last usable ones)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    n = args.prompts or (16 if args.quick else 64)

    import torch
    from transformers import AutoTokenizer

    from vlp.models.presets import resolve_model_path

    usable = sorted(os.sched_getaffinity(0))
    cpus = {args.cpu} if args.cpu is not None else set(usable[-args.threads:])  # one core per thread
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    model, n_params = build_model(tok)
    prompts = make_prompts(tok, n, args.patches)
    eos, new, bs = tok.eos_token_id, args.max_new_tokens, args.batch_size
    sides = {"one_at_a_time": lambda: one_at_a_time(model, prompts, new, eos),
             "batched": lambda: batched(model, prompts, new, eos, bs, not args.no_shared_prefix),
             "batched_mixed": lambda: batched_mixed(model, prompts, new, eos, bs, not args.no_shared_prefix)}
    print(f"[bench_generate] {n} prompts, batch {bs}, up to {new} new tokens, LM {n_params / 1e6:.1f}M params, "
          f"{torch.get_num_threads()} thread(s) pinned to cpu(s) {sorted(cpus)}, {rounds} rounds", flush=True)
    load_before = loadavg()
    acct = CpuAccount()
    secs, cpu, answers, same = timed_rounds(sides, rounds)
    usage = acct.stop()
    report(args, rounds, n, n_params, prompts, (secs, cpu), answers, same, usage, load_before)
    return 0


def report(args, rounds, n, n_params, prompts, times, answers, same, usage, load_before) -> None:
    """Write bench/results/generate[_pP][_nT][_tK][_noprefix](.quick).json and print the table."""
    import torch

    from vlp.models.generation import shared_prefix

    secs, cpu = times
    per_round = [a / b for a, b in zip(secs["one_at_a_time"], secs["batched"])]
    mixed_round = [a / b for a, b in zip(secs["one_at_a_time"], secs["batched_mixed"])]
    cpu_round = [a / b for a, b in zip(cpu["one_at_a_time"], cpu["batched"])]
    rate = {k: round(n / statistics.median(v), 2) for k, v in secs.items()}
    ratio = round(statistics.median(per_round), 2)
    lens = [len(a) for a in answers["batched"]]
    payload = {
        "what": "answers/s of greedy generation over the same prompts: VideoLLM.generate_grouped in batches of "
                "batch_size vs VideoLLM.generate one prompt at a time",
        "settings": {"prompts": n, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                     "patches": args.patches, "shared_prefix": not args.no_shared_prefix,
                     "shared_prefix_tokens": shared_prefix([p.input_ids for p in prompts]),
                     "kinds": [{"question": q, "T": t, "modality": m} for q, t, m in KINDS],
                     "embedded_lengths": sorted({int(len(p.input_ids)) - (p.features is not None) +
                                                 (p.features.shape[0] if p.features is not None else 0)
                                                 for p in prompts}),
                     "llm": {**LLM, "vocab_size": "tiny tokenizer", "params": n_params, "dtype": "float32"},
                     "torch_threads": torch.get_num_threads(), "pinned_cpus": sorted(os.sched_getaffinity(0)),
                     "rounds": rounds, "warmup_rounds": 1,
                     "order": "interleaved, reversed every other round"},
        "answer_tokens": {"mean": round(statistics.mean(lens), 1), "min": min(lens), "max": max(lens)},
        "answers_identical_every_round": all(same),
        "results": {k: {"answers_per_s": rate[k], "seconds_per_round": [round(x, 2) for x in v],
                        "cpu_seconds_per_round": [round(x, 2) for x in cpu[k]],
                        "answers_per_cpu_s": round(n / statistics.median(cpu[k]), 2)} for k, v in secs.items()},
        "ratio_batched_vs_one_at_a_time": {"median": ratio, "per_round": spread(per_round)},
        "ratio_mixed_batches_vs_one_at_a_time": {
            "what": "batched_mixed: generate_batch on consecutive prompts, each batch mixing the four kinds",
            "median": round(statistics.median(mixed_round), 2), "per_round": spread(mixed_round)},
        "ratio_cpu_time": {"what": "the same ratio from this process's CPU time (not slowed by time-sharing with "
                                   "other processes on its core; still by their cache and memory traffic)",
                           "median": round(statistics.median(cpu_round), 2), "per_round": spread(cpu_round)},
        "target": {"what": f"batched >= {TARGET}x one at a time (answers/s, CPU)", "ratio": ratio,
                   "met": ratio >= TARGET},
        "loadavg_before": load_before, "loadavg_after": loadavg(), "cpu_accounting": usage,
        "noise_other_processes_share": round(usage.get("cpu_s", {}).get("other_processes", 0.0) /
                                             max(usage.get("cpu_s_available", 1.0), 1e-9), 3),
    }
    name = "generate" + (f"_p{args.patches}" if args.patches != 64 else "") + (
        f"_n{args.max_new_tokens}" if args.max_new_tokens != 32 else "") + (
        f"_t{args.threads}" if args.threads != 1 else "") + ("_noprefix" if args.no_shared_prefix else "")
    path = write_json(name, args.quick, payload)
    print(f"\n{'side':16s} {'answers/s':>10s}")
    for k in secs:
        print(f"{k:16s} {rate[k]:10.2f}")
    print(f"ratio batched / one at a time: median {ratio} ({spread(per_round)}; from CPU time "
          f"{payload['ratio_cpu_time']['median']}); mixed batches "
          f"{payload['ratio_mixed_batches_vs_one_at_a_time']['median']}; answers identical: {all(same)}; "
          f"answer tokens mean {payload['answer_tokens']['mean']}\n-> {path}")


if __name__ == "__main__":
    sys.exit(main())
