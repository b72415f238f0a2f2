"""`vlp serve` throughput and latency: concurrent OpenAI clients vs one request at a time on the same model.

    .venv/bin/python bench/bench_serve.py [--quick] [--requests N] [--rounds R] [--max-tokens T]
                                          [--concurrency 1,4,16]

Model: the tests' tiny untrained export (``tests/conftest.py``'s ``export`` fixture: a VideoLLM from the presets,
vision hidden size 64, the tiny CLIP tower at 224 px, saved with ``vlp.formats.export.export_model``), made once
under $VLP_CACHE/bench/serve.

Requests: N one-turn chat requests, greedy, ``max_tokens`` T (default 32). Three in four carry one image (a 64x96
PNG made with Pillow from ``vlp.synth`` frames, a different one per request, sent as a data URL) followed by a
question; one in four is text only. Every scenario sends the same N requests.

  baseline   one request at a time in this process, no server: ``vlp.chat.ChatSession`` (what ``vlp chat`` and
             the replica both use): ``encode_bytes`` of the request's PNG bytes (decode, preprocess, tower), then
             ``answer(question, items, max_new_tokens=T)`` (greedy ``VideoLLM.generate`` with a KV cache).
  serve@C    ``vlp serve`` started in this process by its own code (``vlp.serve.app.run_serve``, not blocking): a
             local Ray (``ray.num_cpus: 2``), Serve's HTTP proxy on 127.0.0.1 and a free port, one replica
             (``deployment.num_cpus: 1``; torch on one thread, as in this process: see OMP_NUM_THREADS below),
             batches of up to 16 requests gathered for 10 ms (``batch.batch_wait_timeout_s``). C threads, each with
             the real ``openai`` client (one shared ``OpenAI`` object), take the next request of the N until none is
             left.

Per scenario: wall time for the N requests -> requests/s, and each request's latency (call to answer) -> p50/p95.
Rounds: baseline, serve@1, serve@4, serve@16, the order reversed every other round; each round gives a ratio
(serve requests/s / baseline requests/s of the same round), reported as min/median/max. Warm-up (untimed): two
baseline answers and a burst of 8 concurrent requests to the server. Serve start-up (Ray, proxy, replica load) is
timed apart. Fairness check: every server answer is compared with the baseline's answer to the same request (equal, or
differing only where vlp chat's streamed text kept a U+FFFD for a character split over two tokens: ``same_text``).
Batch sizes: the replica's ``/health`` counters (``batches``) before and after each scenario -> mean batch size.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # media_makers, conftest.free_port

# torch on ONE thread on both sides: set before torch is imported here and before Ray starts, so that the replica
# inherits it too (Ray would otherwise give it one thread per reserved CPU). On this shared 2-core machine, torch's
# 2-thread pool made the baseline ~20x slower per request (0.62 s instead of 0.026 s) while another process kept
# one core busy; one thread per side keeps the comparison about batching and serving, not thread-pool contention.
os.environ["OMP_NUM_THREADS"] = os.environ.get("BENCH_SERVE_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# a busy shared machine can make the local node miss Ray's default registration deadlines (see bench_pack.py)
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")

from _benchutil import WORK, CpuAccount, loadavg, spread, write_json  # noqa: E402

KEY = "bench-key"
MODEL = "tiny"
QUESTIONS = ["What color is the shape?", "What shape is shown?", "Describe the picture.",
             "Where is the shape in the image?"]
TEXT_EVERY = 4  # one request in four is text only


def make_export() -> Path:
    """conftest's ``export`` fixture, made once under the bench cache."""
    out = WORK / "serve" / "export-v1"
    if (out / ".complete").exists():
        return out
    import shutil

    import torch
    from transformers import AutoTokenizer

    from vlp.config import validate
    from vlp.formats.export import export_model
    from vlp.models.presets import resolve_model_path
    from vlp.models.videollm import ModelConfig, VideoLLM

    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = VideoLLM(validate(ModelConfig, {"vision_hidden_size": 64}))
    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    export_model(model, tok, out, extra={
        "template": "vicuna_v1", "feature_mode": "valley_pooled",
        "encoder": {"type": "clip", "path": "preset:tiny-clip", "layer": -2, "hidden_size": 64, "image_size": 224},
        "sampling": {"mode": "uniform", "num_frames": 8, "fps": 1.0, "max_frames": 32},
        "preprocess": {"size": 224, "pad_to_square": False}})
    (out / ".complete").write_text("")
    return out


def make_requests(n: int) -> list[dict]:
    from media_makers import frames_of, pil_bytes

    colors, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    reqs = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        png = None
        if i % TEXT_EVERY != TEXT_EVERY - 1:
            png = pil_bytes(frames_of(1, seed=100 + i, color=colors[i % 4], shape=shapes[i % 3])[0], "PNG")
        reqs.append({"question": q, "png": png})
    return reqs


def content_of(req: dict):
    if req["png"] is None:
        return req["question"]
    url = "data:image/png;base64," + base64.b64encode(req["png"]).decode()
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": req["question"]}]


def same_text(chat: str, served: str) -> bool:
    """The served answer is the baseline's, except where ``vlp chat``'s streamed text kept a U+FFFD: ChatSession
    yields the decoded text as it grows, so a multi-byte character split over two tokens shows as U+FFFD after the
    first token and is never corrected (same length), while the server holds such a piece back and sends the
    character. Token ids are the same; only that character differs."""
    return len(chat) == len(served) and all(a == b or a == "\ufffd" for a, b in zip(chat, served))


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


# ---------------------------------------------------------------------------------------------- the two sides

def run_baseline(session, reqs: list[dict], max_tokens: int) -> tuple[float, list[float], list[str]]:
    lat, answers = [], []
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        items = [session.encode_bytes(r["png"], "png", "request.png")] if r["png"] is not None else []
        answers.append(session.answer(r["question"], items, max_new_tokens=max_tokens))
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, lat, answers


def run_serve_clients(client, reqs: list[dict], contents: list, conc: int, max_tokens: int
                      ) -> tuple[float, list[float], list[str], list[int]]:
    lat = [0.0] * len(reqs)
    answers = [""] * len(reqs)
    tokens = [0] * len(reqs)

    def one(i: int):
        t = time.perf_counter()
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": contents[i]}],
                                           max_tokens=max_tokens, temperature=0)
        lat[i] = time.perf_counter() - t
        answers[i] = (r.choices[0].message.content or "").strip()
        tokens[i] = r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=conc) as pool:
        list(pool.map(one, range(len(reqs))))  # re-raises the first failure
    return time.perf_counter() - t0, lat, answers, tokens


def replica_env(var: str):
    """``var`` in the Serve replica's environment (from /proc: the process named ray::ServeReplica...)."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if not f.read().startswith(b"ray::ServeReplica"):
                    continue
            with open(f"/proc/{p}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            return env.get(var.encode(), b"").decode() or None
        except OSError:
            continue
    return "?"


def health(base: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=60) as r:
        return json.loads(r.read())


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests, 1 round, results in serve.quick.json")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--batch-wait", type=float, default=0.01, help="batch.batch_wait_timeout_s")
    ap.add_argument("--name", default="serve")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds = 8, 1
    concs = [int(c) for c in args.concurrency.split(",")]
    t_start = time.perf_counter()
    load_before = loadavg()

    import openai
    import ray
    import torch
    from ray import serve

    from conftest import free_port
    from vlp.chat import ChatSession
    from vlp.config import validate
    from vlp.serve import ServeConfig
    from vlp.serve.app import run_serve

    export = make_export()
    reqs = make_requests(args.requests)
    contents = [content_of(r) for r in reqs]
    print(f"export {export}; {len(reqs)} requests ({sum(r['png'] is not None for r in reqs)} with an image), "
          f"max_tokens {args.max_tokens}, concurrency {concs}, {args.rounds} rounds")

    t = time.perf_counter()
    session = ChatSession(str(export))
    session_load_s = time.perf_counter() - t

    max_batch = max(16, max(concs))
    cfg = validate(ServeConfig, {
        "model": str(export), "model_name": MODEL, "port": free_port(), "api_key": KEY,
        "max_tokens": args.max_tokens,
        "batch": {"max_batch_size": max_batch, "batch_wait_timeout_s": args.batch_wait},
        "deployment": {"num_cpus": 1, "max_ongoing_requests": max(32, 2 * max(concs))},
        "ray": {"num_cpus": 2, "progress_bars": False}})
    t = time.perf_counter()
    url = run_serve(cfg, block=False, log=print)
    serve_start_s = time.perf_counter() - t
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)
    try:
        # warm-up: imports, first forward passes, the proxy's connections
        t = time.perf_counter()
        base_ans = run_baseline(session, reqs[:2], args.max_tokens)[2]
        baseline_warm_s = time.perf_counter() - t
        t = time.perf_counter()
        run_serve_clients(client, reqs[:8], contents[:8], 8, args.max_tokens)
        serve_warm_s = time.perf_counter() - t
        print(f"serve start {serve_start_s:.1f}s, warm-up: baseline {baseline_warm_s:.1f}s, serve {serve_warm_s:.1f}s")

        replica_threads = replica_env("OMP_NUM_THREADS")
        print(f"torch threads: baseline {torch.get_num_threads()}, replica OMP_NUM_THREADS={replica_threads}")
        names = ["baseline"] + [f"serve@{c}" for c in concs]
        rounds = []
        reference: list[str] | None = None
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            row, ans_by = {}, {}
            for name in order:
                acc = CpuAccount(period=1.0)
                h0 = health(url) if name != "baseline" else None
                if name == "baseline":
                    wall, lat, ans = run_baseline(session, reqs, args.max_tokens)
                    toks = None
                else:
                    wall, lat, ans, toks = run_serve_clients(client, reqs, contents, int(name.split("@")[1]),
                                                             args.max_tokens)
                h1 = health(url) if name != "baseline" else None
                cpu = acc.stop()
                rec = {"wall_s": round(wall, 3), "requests_per_s": round(len(reqs) / wall, 3),
                       "latency_p50_s": round(statistics.median(lat), 3), "latency_p95_s": round(pct(lat, 95), 3),
                       "latency_mean_s": round(statistics.mean(lat), 3),
                       "noise": round(cpu["cpu_s"].get("other_processes", 0.0) / max(1e-9, cpu["cpu_s_available"]), 3),
                       "cpu_s": cpu["cpu_s"]}
                if name == "baseline":
                    reference = reference or ans
                    rec["same_answers_as_first_baseline"] = ans == reference
                else:
                    nb = h1["batches"] - h0["batches"]
                    rec.update({"batches": nb, "mean_batch_size": round(len(reqs) / max(1, nb), 2),
                                "largest_batch_so_far": h1.get("largest_batch"),
                                "completion_tokens": sum(toks)})
                row[name], ans_by[name] = rec, ans
                print(f"round {r + 1} {name:9s} {rec['requests_per_s']:7.2f} req/s  p50 {rec['latency_p50_s']:.3f}s "
                      f"p95 {rec['latency_p95_s']:.3f}s" + (f"  batch {rec['mean_batch_size']}" if name != "baseline"
                                                             else "") + f"  noise {rec['noise']:.0%}", flush=True)
            b = row["baseline"]["requests_per_s"]
            for name in names[1:]:
                row[name]["ratio_vs_baseline"] = round(row[name]["requests_per_s"] / b, 3)
                a, bl = ans_by[name], ans_by["baseline"]
                row[name]["answers_differing_from_baseline"] = sum(x != y for x, y in zip(a, bl))
                row[name]["same_answers_as_baseline"] = all(same_text(y, x) for x, y in zip(a, bl))
            rounds.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()

    summary = {}
    for name in names:
        xs = [rd[name] for rd in rounds]
        s = {"requests_per_s": spread([x["requests_per_s"] for x in xs]),
             "latency_p50_s": spread([x["latency_p50_s"] for x in xs]),
             "latency_p95_s": spread([x["latency_p95_s"] for x in xs]),
             "noise_max": max(x["noise"] for x in xs)}
        if name != "baseline":
            s["ratio_vs_baseline"] = spread([x["ratio_vs_baseline"] for x in xs])
            s["mean_batch_size"] = spread([x["mean_batch_size"] for x in xs])
            s["same_answers_as_baseline"] = all(x["same_answers_as_baseline"] for x in xs)
            s["answers_differing_only_by_split_characters"] = max(x["answers_differing_from_baseline"] for x in xs)
        summary[name] = s

    payload = {
        "what": "vlp serve (Ray Serve, batched across clients, the real openai client in C threads) vs one request "
                "at a time in-process (vlp.chat.ChatSession: encode_bytes + greedy answer), same export and requests",
        "model": {"export": "tests' tiny untrained export (vision_hidden_size 64, preset:tiny-clip at 224 px, "
                            "preset:tiny-tokenizer, vicuna_v1)", "path": str(export)},
        "requests": {"n": len(reqs), "with_image": sum(r["png"] is not None for r in reqs),
                     "text_only": sum(r["png"] is None for r in reqs),
                     "image": "64x96 PNG (Pillow, vlp.synth frames), data URL", "max_tokens": args.max_tokens,
                     "temperature": 0},
        "server": {"ray_num_cpus": 2, "deployment_num_cpus": 1,
                   "replica_omp_num_threads": replica_threads, "replicas": 1,
                   "max_batch_size": max_batch, "batch_wait_timeout_s": args.batch_wait,
                   "max_ongoing_requests": cfg.deployment.max_ongoing_requests, "host": "127.0.0.1"},
        "baseline_torch_threads": torch.get_num_threads(),
        "startup_s": {"chat_session_load": round(session_load_s, 2), "run_serve": round(serve_start_s, 2),
                      "baseline_warmup_2_requests": round(baseline_warm_s, 2),
                      "serve_warmup_8_requests": round(serve_warm_s, 2)},
        "warmup_answers_equal_first_two": base_ans == (reference or [])[:2],
        "summary": summary, "rounds": rounds,
        "elapsed_s": round(time.perf_counter() - t_start, 1), "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    path = write_json(args.name, args.quick, payload)

    print(f"\n{'config':10s} {'req/s min/med/max':>22s} {'ratio min/med/max':>20s} {'p50 s':>7s} {'p95 s':>7s} "
          f"{'batch':>6s} {'same':>5s}")
    for name in names:
        s = summary[name]
        rq = s["requests_per_s"]
        ra = s.get("ratio_vs_baseline", {"min": 1, "median": 1, "max": 1})
        print(f"{name:10s} {rq['min']:6.2f}/{rq['median']:6.2f}/{rq['max']:6.2f} "
              f"{ra['min']:6.2f}/{ra['median']:5.2f}/{ra['max']:5.2f} {s['latency_p50_s']['median']:7.3f} "
              f"{s['latency_p95_s']['median']:7.3f} {s.get('mean_batch_size', {}).get('median', 1):6} "
              f"{str(s.get('same_answers_as_baseline', '')):>5s}")
    print(f"load {load_before} -> {loadavg()}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
