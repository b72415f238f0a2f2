"""Synthetic WebVid / CC3M / instruction shards with learnable signal.

Every clip shows one coloured shape moving in one direction over a static textured background.
Colour and shape are visible in any single frame; direction only from temporal order, so a model
that gets direction right must be using temporal information (Valley's per-frame CLS tokens).
Captions and Q&A state colour, shape and direction. Everything is deterministic from the seed: attributes, captions, Q&A, JSON and the rendered pixels.
libx264's bitstream has been seen to differ by a few bytes between runs on a loaded machine (the decoded
frames agree to within a grey level); ``codec=mpeg4`` gave byte-identical files in our runs.
The layout is what video2dataset / img2dataset write: ``{key}.mp4|jpg`` + ``{key}.txt`` + ``{key}.json``,
written by ``webdataset.ShardWriter`` with pinned tar headers (mtime 0, mode 0644, no user/group): the same
members give the same shard bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from ..config import Cfg
from ..data.tario import TAR_HEADERS
from ..storage import StorageConfig, join, make_output_dir, write_atomic

# Bump when make_shards writes different samples for the same config (2: held-out clips in reversed,
# lossless pairs). The demo records it with the settings its shards were made with and refuses stale ones.
SYNTH_VERSION = 2

COLORS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 60, 230), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

QUESTIONS = {
    "color": ("What color is the shape?", "The shape is {color}."),
    "shape": ("What shape is shown?", "It is a {shape}."),
    "direction": ("Which direction does the shape move?", "It moves {direction}."),
}
# Text-only instructions (``text_only``: mPLUG-Owl mixes text-only data into its instruction stream): facts about the
# world's shapes and colours that no picture is needed for.
TEXT_FACTS = [(f"How many corners does a {s} have?", f"A {s} has {n} corners.")
              for s, n in (("circle", "no"), ("square", "four"), ("triangle", "three"))] + [
    ("Which colors can a shape have?", "A shape is red, green, blue or yellow."),
    ("Which directions can a shape move?", "It moves left, right, up or down.")]
# With ``audio``: a clip's soundtrack is a tone whose pitch names a word no frame shows, so only a model that hears
# the <audio> item can answer (kept out of QUESTIONS: the tiny tokenizer's corpus, and so the demo, stay as they are)
WORDS = {"apple": 330.0, "river": 660.0, "stone": 1320.0, "cloud": 2640.0}  # word -> pitch (Hz)
SOUND_QUESTION = ("Which word does the sound name?", "It names {word}.")
SOUND_RATE = 16000


class MakeShardsConfig(Cfg):
    """What ``vlp make-shards`` writes."""

    out: str = Field("runs/demo/shards", description="output folder or s3:// prefix")
    storage: StorageConfig = StorageConfig()
    seed: int = Field(0, description="everything is a function of this")
    videos: int = Field(48, ge=0, description="WebVid-like caption clips (webvid-*.tar)")
    images: int = Field(24, ge=0, description="CC3M-like caption images (cc3m-*.tar)")
    instructions: int = Field(48, ge=0, description="instruction samples with conversations (instruct-*.tar)")
    heldout: int = Field(24, ge=0, description="held-out clips with Q&A, never in training (heldout-*.tar)")
    text_only: int = Field(0, ge=0, description="text-only instruction samples, no media (text-*.tar): questions "
                           "about the world's shapes and colours (TEXT_FACTS), for mixing text-only data in")
    when: int = Field(0, ge=0, description="temporal grounding clips (when-*.tar): a shape visible for a known "
                      "interval, 'When is the red circle visible?' -> its span (vlp.synth.grounding)")
    where: int = Field(0, ge=0, description="referring images (where-*.tar): two shapes, 'Where is the red "
                       "circle?' -> its box")
    when_heldout: int = Field(0, ge=0, description="held-out temporal grounding clips (when_heldout-*.tar)")
    where_heldout: int = Field(0, ge=0, description="held-out referring images (where_heldout-*.tar)")
    samples_per_shard: int = Field(16, ge=1)
    width: int = Field(96, ge=16, le=4096)
    height: int = Field(64, ge=16, le=4096)
    num_frames: int = Field(16, ge=2, le=1000, description="frames per clip")
    fps: int = Field(8, ge=1, le=120)
    codec: Literal["libx264", "mpeg4"] = "libx264"
    image_fraction_in_instructions: float = Field(0.25, ge=0, le=1)
    audio: bool = Field(False, description="video clips get a soundtrack: a tone whose pitch names a word (WORDS) "
                        "no frame shows; instruction and held-out clips name it as an <audio> item (the mp4's "
                        "sound) and ask for the word")

    @model_validator(mode="after")
    def _even(self):
        if self.codec == "mpeg4" and (self.width % 2 or self.height % 2):
            raise ValueError("mpeg4 needs even width and height")
        return self


@dataclass
class Attributes:
    color: str
    shape: str
    direction: str

    def caption(self, media: str) -> str:
        if media == "image":
            return f"A {self.color} {self.shape} on a textured background."
        return f"A {self.color} {self.shape} moves {self.direction} over a textured background."


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Static low-frequency grey texture, (h, w, 3) uint8."""
    coarse = rng.uniform(70, 170, size=(h // 8 + 2, w // 8 + 2))
    yy = np.linspace(0, coarse.shape[0] - 1.001, h)
    xx = np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = yy.astype(int), xx.astype(int)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    c = coarse
    tex = (c[y0][:, x0] * (1 - fy) * (1 - fx) + c[y0 + 1][:, x0] * fy * (1 - fx)
           + c[y0][:, x0 + 1] * (1 - fy) * fx + c[y0 + 1][:, x0 + 1] * fy * fx)
    tex = tex + rng.normal(0, 6, size=(h, w))
    return np.repeat(np.clip(tex, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def _mask(shape: str, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # triangle pointing up
    top, bottom = cy - r, cy + r
    half = (yy - top) / (2 * r) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render_clip(attrs: Attributes, rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """(n, h, w, 3) uint8 frames of the shape moving in ``attrs.direction``."""
    bg = texture(rng, h, w)
    r = shape_radius(h, w)
    margin = r + 1
    # travel across most of the frame along the motion axis; random position on the other axis
    a0, a1 = margin, (w if attrs.direction in ("left", "right") else h) - margin
    other = rng.uniform(margin, (h if attrs.direction in ("left", "right") else w) - margin)
    pos = np.linspace(a0, a1, n)
    if attrs.direction in ("left", "up"):
        pos = pos[::-1]
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for i, p in enumerate(pos):
        cx, cy = (p, other) if attrs.direction in ("left", "right") else (other, p)
        frames[i] = draw_shape(bg, attrs.color, attrs.shape, cx, cy, r)
    return frames


def shape_radius(h: int, w: int) -> float:
    return max(3.0, min(h, w) * 0.16)


def draw_shape(bg: np.ndarray, color: str, shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(h, w, 3) background -> a copy with the shape drawn at (cx, cy)."""
    f = bg.copy()
    f[_mask(shape, bg.shape[0], bg.shape[1], cx, cy, r)] = np.array(COLORS[color], dtype=np.uint8)
    return f


def render_stills(rng: np.random.Generator, n: int, h: int, w: int) -> tuple[np.ndarray, dict]:
    """n single frames like the clips' (one shape anywhere a clip can put it, fresh background each):
    (n, h, w, 3) uint8 and labels {color: (n,) int, shape: (n,) int, xy: (n, 2) float in [-1, 1]}."""
    r = shape_radius(h, w)
    margin = r + 1
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    col = rng.integers(len(COLORS), size=n)
    shp = rng.integers(len(SHAPES), size=n)
    xy = np.stack([rng.uniform(margin, w - margin, n), rng.uniform(margin, h - margin, n)], 1)
    names = list(COLORS)
    for i in range(n):
        frames[i] = draw_shape(texture(rng, h, w), names[col[i]], SHAPES[shp[i]], xy[i, 0], xy[i, 1], r)
    return frames, {"color": col, "shape": shp, "xy": xy / np.array([w, h]) * 2 - 1}


def encode_mp4(frames: np.ndarray, fps: int, codec: str = "libx264", pix_fmt: str | None = None,
               container: str = "mp4", options: dict | None = None, sound: np.ndarray | None = None) -> bytes:
    """(n, h, w, 3) uint8 -> video bytes with PyAV (mp4 unless ``container`` says otherwise); ``sound``: a mono
    float32 (S,) waveform at SOUND_RATE muxed as an AAC soundtrack."""
    import av

    buf = io.BytesIO()
    n, h, w, _ = frames.shape
    with av.open(buf, mode="w", format=container) as c:
        st = c.add_stream(codec, rate=fps)
        st.width, st.height = w, h
        st.pix_fmt = pix_fmt or ("yuv420p" if (w % 2 == 0 and h % 2 == 0) else "yuv444p")
        if options is not None:
            st.options = options
        elif codec == "libx264":
            st.options = {"crf": "18", "preset": "veryfast"}
        sst = c.add_stream("aac", rate=SOUND_RATE, layout="mono") if sound is not None else None  # before muxing
        for f in frames:
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
        if sst is not None:
            mux_sound(c, sst, sound)
    return buf.getvalue()


def mux_sound(container, st, wave: np.ndarray) -> None:
    """Encode (S,) float32 at SOUND_RATE into ``st``, an AAC stream of ``container`` (PyAV, open for writing)."""
    import av

    step = st.codec_context.frame_size or 1024
    for i in range(0, wave.size, step):
        fr = av.AudioFrame.from_ndarray(wave[None, i:i + step].astype(np.float32), format="fltp", layout="mono")
        fr.sample_rate, fr.pts = SOUND_RATE, i
        for pkt in st.encode(fr):
            container.mux(pkt)
    for pkt in st.encode():
        container.mux(pkt)


def render_sound(word: str, seconds: float) -> np.ndarray:
    """(S,) float32 at SOUND_RATE: the tone that names ``word`` (WORDS), faded in and out over 10 ms."""
    t = np.arange(int(SOUND_RATE * seconds)) / SOUND_RATE
    wave = 0.3 * np.sin(2 * np.pi * WORDS[word] * t)
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return (wave * ramp).astype(np.float32)


def encode_jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _attrs(rng: np.random.Generator) -> Attributes:
    return Attributes(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)), str(rng.choice(DIRECTIONS)))


def conversation(attrs: Attributes, media: str, rng: np.random.Generator, kinds: list[str] | None = None) -> list[dict]:
    """LLaVA-style multi-turn conversation; the placeholder leads the first human turn."""
    if kinds is None:
        pool = ["color", "shape"] + (["direction"] if media == "video" else [])
        kinds = list(rng.permutation(pool)[: int(rng.integers(1, len(pool) + 1))])
    conv = []
    for i, k in enumerate(kinds):
        q, a = QUESTIONS[k]
        q = (f"<{media}>\n" if i == 0 else "") + q
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a.format(**attrs.__dict__)})
    return conv


def with_sound_turn(conv: list[dict], word: str) -> list[dict]:
    """A clip's conversation with its <audio> placeholder after the <video> one and the sound's question last."""
    conv = [dict(t) for t in conv]
    conv[0]["value"] = conv[0]["value"].replace("<video>\n", "<video>\n<audio>\n", 1)
    q, a = SOUND_QUESTION
    return [*conv, {"from": "human", "value": q}, {"from": "gpt", "value": a.format(word=word)}]


def vocabulary_corpus() -> list[str]:
    """Every caption and Q&A string the synthetic data can produce (for the tiny tokenizer)."""
    out = []
    for c in COLORS:
        for s in SHAPES:
            for d in DIRECTIONS:
                a = Attributes(c, s, d)
                out += [a.caption("video"), a.caption("image")]
                out += [q for q, _ in QUESTIONS.values()] + [ans.format(**a.__dict__) for _, ans in QUESTIONS.values()]
    out += ["<image>\n", "<video>\n", "USER: ", " ASSISTANT: ", "system user assistant",
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            "0123456789 .,:;!?'\"()[]{}-_/\\ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return out


def make_samples(kind: str, count: int, cfg: MakeShardsConfig, rng: np.random.Generator, shard_base: int):
    """Yield (key, members) for one shard family.

    Held-out clips come in reversed pairs: clip 2k+1 is clip 2k played backwards (same colour, shape, texture
    and path, opposite direction), so that a model blind to temporal order scores exactly chance on telling a
    direction from its opposite. They are encoded losslessly (libx264), so that the two clips of a pair decode to
    exactly the same frames in reverse order."""
    pair_seed, prev = 0, None
    for i in range(count):
        shard, idx = divmod(i, cfg.samples_per_shard)
        key = f"{shard_base + shard:05d}{idx:04d}"
        reverse_of = None
        if kind == "heldout" and i % 2 == 1:
            attrs = Attributes(prev[1].color, prev[1].shape, OPPOSITE[prev[1].direction])
            reverse_of = prev[0]
        else:
            attrs = _attrs(rng)
            pair_seed = int(rng.integers(2**62))
            prev = (key, attrs)
        clip_rng = np.random.default_rng(pair_seed) if kind == "heldout" else rng
        media = "video"
        if kind == "cc3m" or (kind == "instruct" and rng.random() < cfg.image_fraction_in_instructions):
            media = "image"
        meta = {"key": key, "url": f"synthetic://{kind}/{key}", "status": "success",
                "width": cfg.width, "height": cfg.height, **attrs.__dict__,
                "split": "heldout" if kind == "heldout" else "train", "media": media}
        members: dict[str, bytes] = {}
        if reverse_of is not None:
            meta["reverse_of"] = reverse_of
        sound = None
        if media == "video" and cfg.audio:
            meta["word"] = str(rng.choice(list(WORDS)))
            sound = render_sound(meta["word"], cfg.num_frames / cfg.fps)
        if media == "video":
            frames = render_clip(attrs, clip_rng, cfg.height, cfg.width, cfg.num_frames)
            # held-out clips lossless (x264 qp 0): a reversed pair then decodes to exactly reversed frames
            lossless = {"qp": "0", "preset": "veryfast"} if kind == "heldout" and cfg.codec == "libx264" else None
            members["mp4"] = encode_mp4(frames, cfg.fps, cfg.codec, options=lossless, sound=sound)
            meta["duration"] = cfg.num_frames / cfg.fps
            meta["num_frames"] = cfg.num_frames
        else:
            frames = render_clip(attrs, rng, cfg.height, cfg.width, 1)
            members["jpg"] = encode_jpeg(frames[0])
        caption = attrs.caption(media)
        meta["caption"] = caption
        if kind in ("instruct", "heldout"):
            kinds = ["color", "shape", "direction"] if kind == "heldout" else None
            meta["conversations"] = conversation(attrs, media, rng, kinds)
            if sound is not None:  # the mp4 is the video item and, through its soundtrack, the audio item
                meta.update(videos=["mp4"], audios=["mp4"], conversations=with_sound_turn(meta["conversations"],
                                                                                          meta["word"]))
        members["txt"] = caption.encode()
        members["json"] = json.dumps(meta).encode()
        yield shard_base + shard, key, members


def text_samples(kind: str, count: int, cfg: MakeShardsConfig, rng: np.random.Generator, shard_base: int):
    """Yield (shard, key, members) of text-only instruction samples: a json with one or two TEXT_FACTS turns."""
    for i in range(count):
        shard, idx = divmod(i, cfg.samples_per_shard)
        key = f"{shard_base + shard:05d}{idx:04d}"
        picked = rng.permutation(len(TEXT_FACTS))[: int(rng.integers(1, 3))]
        conv = [t for j in picked for t in ({"from": "human", "value": TEXT_FACTS[j][0]},
                                            {"from": "gpt", "value": TEXT_FACTS[j][1]})]
        meta = {"key": key, "url": f"synthetic://{kind}/{key}", "status": "success", "split": "train",
                "conversations": conv}
        yield shard_base + shard, key, {"json": json.dumps(meta).encode()}


def make_shards(cfg: MakeShardsConfig) -> dict:
    """Write all shard families; returns {family: [shard uris]}."""
    fs, root = make_output_dir(cfg.out, "out", cfg.storage)
    out: dict[str, list[str]] = {}
    from .grounding import grounding_samples

    families = [("webvid", cfg.videos), ("cc3m", cfg.images), ("instruct", cfg.instructions), ("heldout", cfg.heldout),
                ("text", cfg.text_only), ("when", cfg.when), ("where", cfg.where),
                ("when_heldout", cfg.when_heldout), ("where_heldout", cfg.where_heldout)]
    makers = {"text": text_samples, "when": grounding_samples, "where": grounding_samples,
              "when_heldout": grounding_samples, "where_heldout": grounding_samples}
    for fam_i, (fam, count) in enumerate(families):
        if count == 0:
            continue
        rng = np.random.default_rng([cfg.seed, fam_i])
        # keys are unique across families (as video2dataset's are across shards): family i uses shards i*1000+
        make = makers.get(fam, make_samples)
        samples = ((key, members) for _, key, members in make(fam, count, cfg, rng, fam_i * 1000))
        out[fam] = write_shards(fam, samples, cfg)
    return out


# TarWriter options that make the bytes a function of the members alone (its defaults: the time, user "bigdata")
def write_shards(family: str, samples, cfg: MakeShardsConfig) -> list[str]:
    """(key, members) -> ``{family}-00000.tar``, ``-00001`` ... of ``cfg.samples_per_shard`` samples each, in
    ``cfg.out``, with ``webdataset.ShardWriter`` (members of a sample in sorted order). Each shard is built in
    memory and written whole by ``storage.write_atomic`` (a rename locally, one PUT on S3) when complete; an
    error while writing leaves no partial shard. -> the shards' URIs."""
    import webdataset as wds  # imports torch: only when writing shards

    done: list[str] = []
    bufs: dict[str, io.BytesIO] = {}

    def opener(name: str) -> io.BytesIO:
        return bufs.setdefault(name, io.BytesIO())

    def upload(name: str) -> None:
        done.append(join(cfg.out, name))
        write_atomic(done[-1], bufs.pop(name).getvalue(), cfg.storage)

    # maxsize unbounded: the count alone splits shards, as make_samples' keys (shard number first) assume
    sink = wds.ShardWriter(f"{family}-%05d.tar", maxcount=cfg.samples_per_shard, maxsize=float("inf"),
                           opener=opener, post=upload, verbose=0, **TAR_HEADERS)
    for key, members in samples:
        sink.write({"__key__": key, **members})
    sink.close()  # not in a finally: ShardWriter.close writes the open shard, which must not happen on an error
    return done
