"""GPU check: video decode (CPU vs NVDEC), CLIP encode in fp16 and a bf16 training step, as one JSON.

Run by bench/gpu_check.sh on a machine with an NVIDIA GPU (``--device cuda``); ``--device cpu`` runs every part
on the CPU (what this project's GPU-less machines can check: the script itself, the CPU numbers).

Parts (``--parts``, all by default):
  decode   test clips made with PyAV (libx264, 596x336 and 1920x1080), T=8 uniform frames per clip, through
           vlp's decoders: ``decode_media`` (decode + sample) and ``DecodeFrames.decode_item`` (+ resize/crop to
           224, what a decode task does). Methods: ``cpu`` (PyAV selective decode, one thread, the default),
           ``cpu_threads0`` (PyAV, library-default threads), ``torchcodec_cpu`` and ``nvdec`` (torchcodec on
           cuda; frames stay on the GPU, timed to a cuda synchronize). A method whose decoder cannot run here is
           recorded with its reason, not fatal. Reported: sampled frames/s (8 per clip), clips/s, median of rounds.
  encode   CLIP vision tower through vlp (``build_vision_tower``): ViT-L/14 geometry at 224 px with random weights
           (no download; throughput does not depend on the weights), fp16 on cuda (fp32 on cpu), images/s for a
           few batch sizes; and per clip, decode+resize+encode with frames decoded on the GPU (no host copy) vs
           decoded on CPU and copied up (what ``data.decode_placement: encoder`` saves).
  train    the normal vlp path as subprocesses: ``vlp make-shards`` (tiny synthetic set), ``vlp precompute``
           (decode on --device, tiny CLIP), ``vlp train`` stage 1 (tiny LLaMA, one worker, a few steps) in bf16 on
           cuda (fp32 on cpu); records rc, wall time, precision and the final loss.

Writes bench/results/<--out>.json (default gpu_check.json for cuda, gpu_check.cpu.json for cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import ROOT, WORK, loadavg, write_json  # noqa: E402

T = 8
SIZES = {"596x336": (596, 336, 25, 125), "1920x1080": (1920, 1080, 30, 60)}  # w, h, fps, frames


def log(*a):
    print("[bench_gpu]", *a, flush=True)


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ------------------------------------------------------------------------------------------------ clips

def make_clips(folder: Path, per_size: int) -> dict[str, list[Path]]:
    """``per_size`` libx264 mp4 clips per size (made once with PyAV, reused): {size: [paths]}."""
    import numpy as np

    from vlp.synth.shards import Attributes, encode_mp4, render_clip

    folder.mkdir(parents=True, exist_ok=True)
    combos = [("red", "circle", "left"), ("green", "square", "up"), ("blue", "triangle", "right")]
    out: dict[str, list[Path]] = {}
    for name, (w, h, fps, n) in SIZES.items():
        out[name] = []
        for i in range(per_size):
            p = folder / f"{name}-{i}.mp4"
            if not p.exists():
                frames = render_clip(Attributes(*combos[i % len(combos)]), np.random.default_rng(i), h, w, n)
                p.write_bytes(encode_mp4(frames, fps, "libx264"))  # (n, h, w, 3) -> h264 yuv420p
            out[name].append(p)
    return out


# ------------------------------------------------------------------------------------------------ decode

def decode_methods(device: str) -> dict[str, object]:
    """{method: DecodeConfig}: the CPU methods always, torchcodec on CPU and NVDEC when asked for cuda."""
    from vlp.data.media import DecodeConfig

    methods = {"cpu": DecodeConfig(), "cpu_threads0": DecodeConfig(threads=0, selective=False),
               "torchcodec_cpu": DecodeConfig(backend="torchcodec")}
    if device == "cuda":
        methods["nvdec"] = DecodeConfig(backend="torchcodec", device="cuda", cpu_fallback=False)
    return methods


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def time_method(fn, clips: list[bytes], device: str, rounds: int) -> dict:
    """Median seconds per clip over ``rounds`` passes (after one warm-up pass) -> frames/s and clips/s."""
    for data in clips[:1]:
        fn(data)
    sync(device)
    per_clip = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for data in clips:
            fn(data)
        sync(device)
        per_clip.append((time.perf_counter() - t0) / len(clips))
    s = statistics.median(per_clip)
    return {"s_per_clip": round(s, 5), "frames_per_s": round(T / s, 2), "clips_per_s": round(1 / s, 3),
            "rounds": rounds}


def bench_decode(clips: dict[str, list[Path]], device: str, rounds: int) -> dict:
    """{size: {method: {decode: ..., decode_resize: ...} or {error}}} for every method of :func:`decode_methods`."""
    from vlp.data.media import SamplingConfig, decode_media
    from vlp.precompute.stages import DecodeFrames

    sampling = SamplingConfig(num_frames=T)
    out: dict = {}
    for size, paths in clips.items():
        datas = [p.read_bytes() for p in paths]
        out[size] = {}
        for name, cfg in decode_methods(device).items():
            where = cfg.device
            stage = DecodeFrames(sampling, cfg, 224)
            try:
                dec = time_method(lambda d: decode_media(d, "mp4", sampling, cfg)[1], datas, where, rounds)
                full = time_method(lambda d: stage.decode_item(d, "mp4", "", "video"), datas, where, rounds)
                got = decode_media(datas[0], "mp4", sampling, cfg)[1]
                out[size][name] = {"decode": dec, "decode_resize": full, "decoder": got.decoder,
                                   "fallback": got.fallback, "frames_type": type(got.frames).__name__}
            except Exception as e:  # DecoderUnavailable (not installed, no GPU), or a decode failure
                out[size][name] = {"error": first_line(e)}
            log(size, name, json.dumps(out[size][name])[:200])
    return out


# ------------------------------------------------------------------------------------------------ encode

CLIP_ARCH = {"L14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
             "B16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)}


def clip_folder(arch: str) -> Path:
    """A CLIP vision checkpoint with ``arch``'s geometry at 224 px, patch 14 (random weights, saved once)."""
    folder = WORK / "gpu_check" / f"clip-{arch}-random"
    if not (folder / "config.json").exists():
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModel

        from vlp.models.presets import resolve_model_path

        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, **CLIP_ARCH[arch]))
        model.save_pretrained(folder)
        src = Path(resolve_model_path("preset:tiny-clip")) / "preprocessor_config.json"
        (folder / "preprocessor_config.json").write_text(src.read_text())
    return folder


def time_forward(fn, device: str, rounds: int) -> float:
    fn()
    sync(device)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_encode(device: str, arch: str, batches: list[int], rounds: int) -> tuple[dict, object]:
    """(images/s of the vision tower per batch size: uint8 frames already on the device, normalise + forward; the
    precompute encoder stage around that tower, for :func:`bench_decode_encode`)."""
    import torch

    from vlp.data.preprocess import normalize
    from vlp.models.towers import TowerConfig
    from vlp.precompute.stages import EncodeFeatures

    dtype = "float16" if device == "cuda" else "float32"
    enc = EncodeFeatures(TowerConfig(type="clip", path=str(clip_folder(arch)), layer=-2, dtype=dtype, device=device),
                         mode="valley_pooled")
    tower = enc.tower
    out = {"arch": f"ViT-{arch[0]}/{arch[1:]} 224px (random weights)", "dtype": dtype, "batches": {}}
    for b in batches:
        x = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8, device=device)  # (B, 3, S, S)
        with torch.inference_mode():
            s = time_forward(lambda: tower.features(normalize(x, tower.mean, tower.std, tower.dtype)), device, rounds)
        out["batches"][str(b)] = {"s_per_batch": round(s, 5), "images_per_s": round(b / s, 2)}
        log("encode", arch, dtype, b, out["batches"][str(b)])
    return out, enc


def bench_decode_encode(enc, clips: dict[str, list[Path]], device: str, rounds: int) -> dict:
    """Per clip: decode + resize + encode (``enc``: the precompute encoder stage), frames decoded on the GPU and
    handed over in place (``encoder`` placement) vs decoded on CPU and copied up (what a decode task's output
    costs the encoder)."""
    from vlp.data.media import DecodeConfig, SamplingConfig
    from vlp.precompute.stages import DecodeFrames

    sampling = SamplingConfig(num_frames=T)
    variants = {"cpu_decode": DecodeConfig()}
    if device == "cuda":
        variants["gpu_decode_in_place"] = DecodeConfig(backend="torchcodec", device="cuda", cpu_fallback=False)
    out: dict = {}
    for size, paths in clips.items():
        datas = [p.read_bytes() for p in paths]
        out[size] = {}
        for name, cfg in variants.items():
            stage = DecodeFrames(sampling, cfg, 224)
            try:
                out[size][name] = time_method(lambda d: enc.encode([stage.decode_item(d, "mp4", "", "video").array]),
                                              datas, device, rounds)
            except Exception as e:
                out[size][name] = {"error": first_line(e)}
            log("decode+encode", size, name, out[size][name])
    return out


# ------------------------------------------------------------------------------------------------ train

def vlp_cmd(args: list[str], logf: Path) -> dict:
    """``python -m vlp.cli ARGS`` in a subprocess (the normal CLI path): rc, wall seconds, the output's tail."""
    t0 = time.perf_counter()
    with open(logf, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vlp.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT).returncode
    tail = logf.read_text().splitlines()[-5:]
    log(" ".join(args[:1]), f"rc={rc}", tail[-1:] if tail else "")
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "tail": tail, "log": str(logf)}


def train_step(device: str, work: Path, cpus: int) -> dict:
    """make-shards -> precompute (decode on ``device``) -> one short stage-1 training (bf16 on cuda), by the CLI."""
    run = time.strftime("%Y%m%d-%H%M%S")
    shards, feats, train = work / "shards", work / f"features-{device}", work / "train"
    gpu = device == "cuda"
    shutil.rmtree(feats, ignore_errors=True)  # else precompute resumes the last run's committed shards: no work
    steps = {}
    steps["make_shards"] = vlp_cmd(["make-shards", "--config", "configs/local/make_shards.yaml", f"out={shards}",
                                    "videos=16", "images=8", "instructions=0", "heldout=0", "samples_per_shard=8",
                                    "width=192", "height=112"], work / "make_shards.log")
    steps["precompute"] = vlp_cmd([
        "precompute", "--config", "configs/local/precompute.yaml",
        f"data.shards=[{shards}/webvid-*.tar, {shards}/cc3m-*.tar]", f"data.decode.device={device}",
        f"encoder.tower.device={device}", f"output.uri={feats}", "output.overwrite=true", f"ray.num_cpus={cpus}",
        "ray.progress_bars=false"], work / "precompute.log")
    steps["train"] = vlp_cmd([
        "train", "--config", "configs/local/train_stage1.yaml", f"data.sets=[{{uri: {feats}, weight: 1.0}}]",
        f"output_dir={train}", f"run_name=gpu-check-{device}-{run}", "scaling.num_workers=1",
        f"scaling.use_gpu={str(gpu).lower()}", f"deepspeed.precision={'bf16' if gpu else 'auto'}", "epochs=1",
        "batch.global_size=8", "batch.micro_size=4", f"ray.num_cpus={cpus}"], work / "train.log")
    out: dict = {"steps": steps}
    summary = feats / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())["this_run"]
        out["precompute"] = {k: s.get(k) for k in ("samples_ok", "frames_per_s", "decoders", "decode_fallbacks")}
        out["precompute"]["placement"] = log_lines(work / "precompute.log", "[vlp] decode on ")
    ts = train / f"gpu-check-{device}-{run}" / "train_summary.json"
    if ts.exists():
        t = json.loads(ts.read_text())
        out["train"] = {"steps": t.get("steps"), "final_loss": t.get("final_metrics", {}).get("loss"),
                        "samples_per_s": t.get("final_metrics", {}).get("samples_per_s"),
                        "preflight": log_lines(work / "train.log", "[vlp] memory preflight: ")}  # names the precision
    return out


def log_lines(path: Path, prefix: str) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.startswith(prefix)] if path.exists() else []


def torchcodec_version() -> str:
    try:
        import torchcodec

        return torchcodec.__version__
    except Exception as e:  # not installed, or its libraries (FFmpeg, a CUDA torch) do not load
        return f"unavailable ({first_line(e)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), required=True)
    ap.add_argument("--parts", default="decode,encode,train")
    ap.add_argument("--clips", type=int, default=3, help="clips per size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--arch", choices=sorted(CLIP_ARCH), default=None, help="default L14 on cuda, B16 on cpu")
    ap.add_argument("--batches", default=None, help="encode batch sizes; default 32,128 on cuda, 8 on cpu")
    ap.add_argument("--cpus", type=int, default=min(8, os.cpu_count() or 2), help="ray.num_cpus for the train part")
    ap.add_argument("--work", default=str(WORK / "gpu_check"))
    ap.add_argument("--out", default=None, help="results name (bench/results/<out>.json)")
    ap.add_argument("--quick", action="store_true", help="1 clip per size, 1 round (a sanity run)")
    a = ap.parse_args()
    if a.quick:
        a.clips, a.rounds = 1, 1
    gpu = a.device == "cuda"
    arch = a.arch or ("L14" if gpu else "B16")
    batches = [int(b) for b in (a.batches or ("32,128" if gpu else "8")).split(",")]
    parts = a.parts.split(",")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": a.device, "parts": parts, "clips_per_size": a.clips, "rounds": a.rounds,
                 "sampled_frames_per_clip": T, "sizes": {k: dict(zip(("w", "h", "fps", "frames"), v))
                                                        for k, v in SIZES.items()}, "load_before": loadavg(),
                 "nvidia_smi": os.environ.get("VLP_GPU_CHECK_SMI"), "torchcodec": torchcodec_version()}
    clips = make_clips(work / "clips", a.clips) if {"decode", "encode"} & set(parts) else {}
    if "decode" in parts:
        res["decode"] = bench_decode(clips, a.device, a.rounds)
    if "encode" in parts:
        res["encode"], enc = bench_encode(a.device, arch, batches, a.rounds)
        res["decode_encode"] = bench_decode_encode(enc, clips, a.device, a.rounds)
    if "train" in parts:
        res["train_step"] = train_step(a.device, work, a.cpus)
    res["load_after"] = loadavg()
    path = write_json(a.out or ("gpu_check" if gpu else "gpu_check.cpu"), a.quick, res)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
