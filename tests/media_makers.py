"""Real media made in memory with PyAV and Pillow, shared by the tests (one copy of each maker)."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from vlp.synth.shards import Attributes, encode_mp4, render_clip


def frames_of(n: int, h: int = 64, w: int = 96, seed: int = 0, direction: str = "right", color: str = "red",
              shape: str = "circle") -> np.ndarray:
    """(n, h, w, 3) uint8: a shape moving over a texture, so frames differ from one another."""
    return render_clip(Attributes(color, shape, direction), np.random.default_rng(seed), h, w, n)


def encode(frames: np.ndarray, fmt: str = "mp4", codec: str = "libx264", fps: int = 8,
           pix_fmt: str = "yuv420p", options: dict | None = None) -> bytes:
    """Frames -> a container in memory, with PyAV (constant frame rate)."""
    return encode_mp4(frames, fps, codec, pix_fmt, container=fmt, options=options)


def encode_vfr(frames: np.ndarray, times: list[float], fmt: str = "mp4") -> bytes:
    """Variable frame rate: frame i is shown at ``times[i]`` seconds (pts set by hand, 1 ms time base)."""
    tb = Fraction(1, 1000)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as c:
        st = c.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        st.time_base = tb
        st.codec_context.time_base = tb
        for f, t in zip(frames, times):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(round(t * 1000)), tb
            for pkt in st.encode(vf):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return buf.getvalue()


def mjpeg_still(img: np.ndarray, fmt: str = "mp4") -> bytes:
    """A one-frame MJPEG "video" (what some scrapers save as .mp4 for a still)."""
    return encode(img[None], fmt=fmt, codec="mjpeg", fps=1, pix_fmt="yuvj420p")


def pil_bytes(img: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gif_bytes(frames: np.ndarray, ms: int = 100) -> bytes:
    ims = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=len(ims) > 1, append_images=ims[1:], duration=ms, loop=0)
    return buf.getvalue()


def wav_bytes(seconds: float = 0.2) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="wav") as c:
        st = c.add_stream("pcm_s16le", rate=8000)
        st.layout = "mono"
        n = int(8000 * seconds)
        fr = av.AudioFrame.from_ndarray(np.zeros((1, n), np.int16), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 8000, 0
        for pkt in st.encode(fr):
            c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return buf.getvalue()


def aac_in_mp4() -> bytes:
    """An mp4 with only an audio track (a scraper that kept the wrong stream)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        st = c.add_stream("aac", rate=16000)
        st.layout = "mono"
        for i in range(4):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = 16000, i * 1024
            for pkt in st.encode(fr):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return buf.getvalue()


AUDIO_SAMPLE_FORMAT = {"pcm_s16le": "s16", "flac": "s16", "libmp3lame": "fltp", "aac": "fltp"}


def tone(freqs: list[float], seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    """(C, n) float32: channel c a sine at ``freqs[c]`` Hz."""
    t = np.arange(int(rate * seconds)) / rate
    return np.stack([amp * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32)


def audio_bytes(signal: np.ndarray, rate: int, fmt: str = "wav", codec: str = "pcm_s16le",
                video: np.ndarray | None = None) -> bytes:
    """(C, n) float in [-1, 1] -> a container in memory with PyAV (mono or stereo); with ``video`` frames
    (T, H, W, 3) an mp4-style file with a libx264 track and this soundtrack."""
    buf = io.BytesIO()
    sf = AUDIO_SAMPLE_FORMAT[codec]
    layout = "mono" if signal.shape[0] == 1 else "stereo"
    with av.open(buf, mode="w", format=fmt) as c:
        if video is not None:
            vs = c.add_stream("libx264", rate=8)
            vs.height, vs.width, vs.pix_fmt = video.shape[1], video.shape[2], "yuv420p"
        st = c.add_stream(codec, rate=rate)
        st.layout = layout
        step = st.codec_context.frame_size or 1024
        for i in range(0, signal.shape[1], step):
            chunk = signal[:, i:i + step]
            arr = ((chunk.T.reshape(1, -1) * 32767).astype(np.int16) if sf == "s16" else chunk.copy())
            fr = av.AudioFrame.from_ndarray(arr, format=sf, layout=layout)
            fr.sample_rate, fr.pts = rate, i
            for pkt in st.encode(fr):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
        if video is not None:
            for k, img in enumerate(video):
                for pkt in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    c.mux(pkt)
            for pkt in vs.encode():
                c.mux(pkt)
    return buf.getvalue()


def shard_file(path, samples):
    """Write ``samples`` ([(key, {ext: bytes})]) as one WebDataset tar at ``path`` (a Path); returns it."""
    from vlp.data.tario import write_tar

    with open(path, "wb") as f:
        write_tar(f, samples)
    return path
