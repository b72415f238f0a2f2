"""``vlp chat``: ask a trained model about a video or image, decoding and encoding it online with the
same sampling and preprocessing the model's features were precomputed with.

A media file that is missing or that no decoder can read raises :class:`BadMedia` (a user error naming the file).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .data.conversation import prompt_ids
from .data.media import DecodeConfig, MediaError, decode_media
from .data.preprocess import normalize, resize_crop
from .errors import UserError


class BadMedia(UserError):
    """The file given to chat is missing, not a file, or not a video/image any decoder can read."""


def media_file(path: str) -> Path:
    """``path`` as a Path; BadMedia when it is missing or a folder."""
    p = Path(path)
    if not p.is_file():
        raise BadMedia(f"{path}: " + ("is a folder, not a media file" if p.is_dir() else "no such file"))
    return p


class ChatSession:
    """Holds the model, the media's visual features and the conversation so far."""

    def __init__(self, export_dir: str, device: str = "cpu"):
        from .models.towers import build_vision_tower
        from .formats.export import load_model

        self.model, self.tok, self.info = load_model(export_dir, device)
        enc, self.sampling = self.info.media(export_dir)
        self.template = self.info.prompt_template(export_dir)
        self.tower = build_vision_tower({"type": enc.type, "path": enc.path, "layer": enc.layer, "device": device})
        self.geom = self.info.geometry(self.tower.image_size, self.tower.mean, self.tower.std)
        self.conv: list[dict] = []
        self.feats: Optional[torch.Tensor] = None
        self.media_type = "video"
        self.num_frames = 1

    def frames(self, path: str) -> tuple[str, torch.Tensor]:
        """Decode + sample + resize/pad/crop as precompute did: (media type, (T, 3, S, S) uint8)."""
        data = media_file(path).read_bytes()
        try:
            mtype, dec = decode_media(data, Path(path).suffix.lstrip(".").lower(), self.sampling, DecodeConfig())
        except MediaError as e:
            raise BadMedia(f"{path} is not a video or image vlp can decode: {e}") from None
        g = self.geom
        return mtype, resize_crop(dec.frames, g.size, g.pad_to_square, g.mean)  # (T, H, W, 3) -> (T, 3, S, S)

    @torch.no_grad()
    def load_media(self, path: str) -> str:
        """Decode + sample + preprocess + encode; returns the media type found."""
        mtype, x = self.frames(path)
        px = normalize(x, self.geom.mean, self.geom.std, self.tower.dtype)  # the feature set's mean/std
        self.feats = self.tower.features(px).float().cpu()  # (T, 1 + P, D)
        self.media_type, self.num_frames = mtype, self.feats.shape[0]
        self.conv = []
        return mtype

    def ask(self, question: str, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
            top_p: float = 1.0) -> Iterator[str]:
        """Stream the answer as text pieces; the turn is added to the conversation."""
        text = (f"<{self.media_type}>\n" if not self.conv and self.feats is not None else "") + question
        self.conv.append({"from": "human", "value": text})
        ids = torch.tensor(prompt_ids(self.conv, self.tok, self.template))
        out: list[int] = []
        shown = ""
        for tok in self.model.generate(ids, self.feats, "frames", self.num_frames, max_new_tokens=max_new_tokens,
                                       do_sample=do_sample, temperature=temperature, top_p=top_p,
                                       eos_token_id=self.tok.eos_token_id):
            out.append(tok)
            full = self.tok.decode(out, skip_special_tokens=True)
            if len(full) > len(shown):
                yield full[len(shown):]
                shown = full
        self.conv.append({"from": "gpt", "value": shown.strip()})


def run_chat(export_dir: str, media: Optional[str], question: Optional[str], write: Callable[[str], None] = None,
             read: Callable[[str], str] = input, **gen) -> int:
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    if media:
        media_file(media)  # a missing file fails before the model loads
    session = ChatSession(export_dir)
    if media:
        mtype = session.load_media(media)
        if question is None:
            write(f"[{mtype}: {media}, {session.num_frames} frame(s)] ask away; empty line or Ctrl-D to quit\n")
    if question is not None:
        for piece in session.ask(question, **gen):
            write(piece)
        write("\n")
        return 0
    while True:
        try:
            q = read("you> ")
        except EOFError:
            break
        if not q.strip():
            break
        write("vlp> ")
        for piece in session.ask(q.strip(), **gen):
            write(piece)
        write("\n")
    return 0
