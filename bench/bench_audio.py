"""Audio decode + fbank throughput per core: vlp's audio featurizer vs a plain PyAV + numpy loop.

    .venv/bin/python bench/bench_audio.py [--quick] [--rounds N] [--cpu K]

One process pinned to one core (numpy/torch one thread), so every number is "per core". Every method runs on the
same files, interleaved: each round runs both methods on every file, the order alternating from round to round,
so a noisy neighbour slows both alike. Speed is files/s; the ratio vlp / plain is taken per round (its spread
shows how noisy the machine was). Target: vlp >= 0.9 x plain.

Files: the shared demo's audio (../shared/media/llamafactory_mllm_demo: 1.mp3, 2.wav, 3.flac) when that folder
exists, and always made ones: 10.24 s tones as wav (44.1 kHz stereo), mp3 (44.1 kHz), m4a/aac (48 kHz) and an
mp4 soundtrack, made with PyAV.

Methods (both end at the same (1, 1024, 128) normalised AST fbank of the first 10.24 s at 16 kHz mono):
  plain     av.open; decode every frame of the first audio stream; av.AudioResampler(fltp, 16 kHz) on each;
            mean over channels; concatenate; the first 10.24 s; ASTFeatureExtractor(...)  <- the baseline
  vlp       vlp.data.audio.AudioFeaturizer(AudioConfig(), ast path)(data): the same steps plus the checks
            (no stream / silence / sample-rate cap) and decoding stopped after the kept segment
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _benchutil import SHARED_MEDIA, loadavg, spread, write_json  # noqa: E402

SECONDS = 10.24


def made_files() -> list[tuple[str, bytes]]:
    """10.24 s tones in the containers vlp reads (PyAV), and an mp4 with a video track and this soundtrack."""
    import av

    out = []
    for name, fmt, codec, rate, layout in (("tone.wav", "wav", "pcm_s16le", 44100, "stereo"),
                                           ("tone.mp3", "mp3", "libmp3lame", 44100, "stereo"),
                                           ("tone.m4a", "ipod", "aac", 48000, "stereo"),
                                           ("clip.mp4", "mp4", "aac", 48000, "mono")):
        buf = io.BytesIO()
        with av.open(buf, mode="w", format=fmt) as c:
            vs = c.add_stream("libx264", rate=8) if name == "clip.mp4" else None
            if vs is not None:
                vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
            st = c.add_stream(codec, rate=rate, layout=layout)
            if vs is not None:
                for i in range(int(SECONDS * 8)):
                    for pkt in vs.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 255, np.uint8))):
                        c.mux(pkt)
                for pkt in vs.encode():
                    c.mux(pkt)
            mux_tone(c, st, rate, 2 if layout == "stereo" else 1)
        out.append((name, buf.getvalue()))
    return out


def mux_tone(c, st, rate: int, channels: int) -> None:
    import av

    t = np.arange(int(rate * (SECONDS + 0.5))) / rate
    wave = np.stack([0.3 * np.sin(2 * np.pi * (440 + 220 * ch) * t) for ch in range(channels)]).astype(np.float32)
    fmt = "s16" if st.codec_context.name == "pcm_s16le" else "fltp"  # what each codec here takes
    step = st.codec_context.frame_size or 1024
    layout = "stereo" if channels == 2 else "mono"
    for i in range(0, wave.shape[1], step):
        chunk = wave[:, i:i + step]
        arr = (chunk.T.reshape(1, -1) * 32767).astype(np.int16) if fmt == "s16" else chunk.copy()
        fr = av.AudioFrame.from_ndarray(arr, format=fmt, layout=layout)
        fr.sample_rate, fr.pts = rate, i
        for pkt in st.encode(fr):
            c.mux(pkt)
    for pkt in st.encode():
        c.mux(pkt)


def plain(data: bytes, extractor) -> np.ndarray:
    """The plain loop: PyAV decode of everything, resample, channel mean, cut, the extractor's fbank."""
    import av

    parts = []
    with av.open(io.BytesIO(data)) as c:
        st = c.streams.audio[0]
        rs = av.AudioResampler(format="fltp", rate=16000)
        for frame in c.decode(st):
            for out in rs.resample(frame):
                parts.append(out.to_ndarray().mean(axis=0))
    wave = np.concatenate(parts)[: int(SECONDS * 16000)].astype(np.float32)
    return np.asarray(extractor([wave], sampling_rate=16000, return_tensors="np")["input_values"], np.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 rounds (sanity check)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, quick 2)")
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the last usable one)")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 10)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    from vlp.data.audio import AudioConfig, AudioFeaturizer, load_extractor
    from vlp.models.presets import resolve_model_path

    path = resolve_model_path("preset:tiny-ast")
    extractor, vlp = load_extractor(path), AudioFeaturizer(AudioConfig(), path)
    files = made_files() + [(p.name, p.read_bytes()) for ext in ("mp3", "wav", "flac")
                            for p in sorted(SHARED_MEDIA.glob(f"*.{ext}"))]
    methods = {"plain": lambda d: plain(d, extractor), "vlp": lambda d: vlp(d).fbank}
    for name, data in files:  # same output (up to the resampler flush at the cut), and a warm-up round
        a, b = methods["plain"](data), methods["vlp"](data)
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-3, (name, a.shape, b.shape, np.abs(a - b).max())
    secs = {m: [0.0] * rounds for m in methods}
    for r in range(rounds):
        for m in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            t0 = time.perf_counter()
            for _, data in files:
                methods[m](data)
            secs[m][r] = time.perf_counter() - t0
    ratios = [p / v for p, v in zip(secs["plain"], secs["vlp"])]  # vlp speed / plain speed per round
    result = {"files": [n for n, _ in files], "rounds": rounds, "cpu": cpu, "loadavg_end": loadavg(),
              "files_per_s": {m: round(len(files) * rounds / sum(s), 2) for m, s in secs.items()},
              "ratio_vlp_vs_plain": spread(ratios)}
    out = write_json("audio", args.quick, result)
    print(f"audio decode + fbank, {len(files)} files x {rounds} rounds on cpu {cpu}: plain "
          f"{result['files_per_s']['plain']} files/s, vlp {result['files_per_s']['vlp']} files/s, vlp/plain "
          f"{result['ratio_vlp_vs_plain']} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
