"""``vlp chat``: ask a trained model about videos and images (0..N per conversation), decoding and encoding each
online with the same sampling and preprocessing the model's features were precomputed with. The first question's
``<image>``/``<video>`` placeholders place the items (matched per modality in order); without any, one per item
goes in front of it in the order given.

A media file that is missing or that no decoder can read raises :class:`BadMedia` (a user error naming the file).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .data.conversation import PLACEHOLDER_RE, prompt_ids
from .data.media import DecodeConfig, MediaError, decode_media
from .data.sample import match_placeholders
from .data.preprocess import normalize, resize_crop
from .errors import UserError


class BadMedia(UserError):
    """The file given to chat is missing, not a file, or not a video/image any decoder can read."""


class BadPrompt(UserError):
    """The question's placeholders do not match the media given (or come after the first question)."""


def media_file(path: str) -> Path:
    """``path`` as a Path; BadMedia when it is missing or a folder."""
    p = Path(path)
    if not p.is_file():
        raise BadMedia(f"{path}: " + ("is a folder, not a media file" if p.is_dir() else "no such file"))
    return p


@dataclass
class ChatItem:
    """One media item of a chat: its file, the modality its decoder found and its tower features."""
    path: str
    modality: str
    feats: torch.Tensor  # (T, 1 + P, D)

    @property
    def num_frames(self) -> int:
        return int(self.feats.shape[0])


class ChatSession:
    """Holds the model, the media items' visual features and the conversation so far."""

    def __init__(self, export_dir: str, device: str = "cpu"):
        from .models.towers import build_vision_tower
        from .formats.export import load_model

        self.model, self.tok, self.info = load_model(export_dir, device)
        enc, self.sampling = self.info.media(export_dir)
        self.template = self.info.prompt_template(export_dir)
        self.tower = build_vision_tower({"type": enc.type, "path": enc.path, "layer": enc.layer, "device": device})
        self.geom = self.info.geometry(self.tower.image_size, self.tower.mean, self.tower.std)
        self.conv: list[dict] = []
        self.items: list[ChatItem] = []
        self.order: list[int] = []  # the item of each placeholder of the conversation, in order

    def frames(self, path: str) -> tuple[str, torch.Tensor]:
        """Decode + sample + resize/pad/crop as precompute did: (media type, (T, 3, S, S) uint8)."""
        return self.frames_of(media_file(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), path)

    def frames_of(self, data: bytes, ext: str, name: str) -> tuple[str, torch.Tensor]:
        """:meth:`frames` of a file's bytes already in memory (``ext``: its extension, a hint for the decoder;
        ``name``: how BadMedia names it)."""
        try:
            mtype, dec = decode_media(data, ext, self.sampling, DecodeConfig())
        except MediaError as e:
            raise BadMedia(f"{name} is not a video or image vlp can decode: {e}") from None
        g = self.geom
        return mtype, resize_crop(dec.frames, g.size, g.pad_to_square, g.mean)  # (T, H, W, 3) -> (T, 3, S, S)

    def encode(self, path: str) -> ChatItem:
        """Decode + sample + preprocess + encode one file; touches no conversation state (BadMedia if unreadable)."""
        return self.encode_bytes(media_file(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), path)

    @torch.no_grad()
    def encode_bytes(self, data: bytes, ext: str, name: str) -> ChatItem:
        """:meth:`encode` of a media file's bytes (an image made in memory: lmms-eval's PIL images)."""
        mtype, x = self.frames_of(data, ext, name)
        px = normalize(x, self.geom.mean, self.geom.std, self.tower.dtype)  # the feature set's mean/std
        return ChatItem(name, mtype, self.tower.features(px).float().cpu())  # (T, 1 + P, D)

    def load_media(self, paths: Union[str, Sequence[str]]) -> list[str]:
        """Encode each file (:meth:`encode`) and start a new conversation about them; -> the media types found."""
        items = [self.encode(p) for p in ([paths] if isinstance(paths, str) else paths)]
        self.items, self.conv, self.order = items, [], []
        return [it.modality for it in items]

    @staticmethod
    def place(question: str, items: Sequence[ChatItem]) -> tuple[str, list[int]]:
        """A first question with its placeholders (as written when it has any, ``<image>``/``<video>`` matched per
        modality in order; else one per item in the order given, each on its own line) and the item of each
        placeholder. BadPrompt when they do not match."""
        if items and not PLACEHOLDER_RE.search(question):
            question = "".join(f"<{it.modality}>\n" for it in items) + question
        try:
            _, order = match_placeholders("chat", [{"from": "human", "value": question}], [it.modality for it in items])
        except ValueError as e:
            raise BadPrompt(str(e).replace("sample 'chat': ", "the question and the media given: ")) from None
        return question, order

    def first_turn(self, question: str) -> str:
        """The conversation's first question with its placeholders (:meth:`place`); records their items."""
        question, self.order = self.place(question, self.items)
        return question

    def ask(self, question: str, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
            top_p: float = 1.0) -> Iterator[str]:
        """Stream the answer as text pieces; the turn is added to the conversation."""
        if not self.conv:
            question = self.first_turn(question)
        elif PLACEHOLDER_RE.search(question):
            raise BadPrompt("media placeholders may only appear in the first question")
        self.conv.append({"from": "human", "value": question})
        shown = ""
        for piece in self.stream(self.conv, [self.items[i] for i in self.order], max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, temperature=temperature, top_p=top_p):
            shown += piece
            yield piece
        self.conv.append({"from": "gpt", "value": shown.strip()})

    def answer(self, question: str, items: Sequence[ChatItem], max_new_tokens: int = 64) -> str:
        """Greedy answer to a one-turn conversation about ``items`` (from :meth:`encode`), placed as in a first
        question. Stateless: the session's conversation and items are neither read nor changed (batch eval)."""
        question, order = self.place(question, items)
        conv = [{"from": "human", "value": question}]
        return "".join(self.stream(conv, [items[i] for i in order], max_new_tokens=max_new_tokens)).strip()

    def stream(self, conv: list[dict], items: Sequence[ChatItem], max_new_tokens: int = 64, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0) -> Iterator[str]:
        """The answer to ``conv`` (ending with a human turn; ``items`` in placeholder order) as new text pieces."""
        ids = torch.tensor(prompt_ids(conv, self.tok, self.template))
        out: list[int] = []
        shown = ""
        for tok in self.model.generate(ids, [it.feats for it in items] or None, "frames",
                                       [it.num_frames for it in items], max_new_tokens=max_new_tokens,
                                       do_sample=do_sample, temperature=temperature, top_p=top_p,
                                       eos_token_id=self.tok.eos_token_id,
                                       modalities=[it.modality for it in items]):
            out.append(tok)
            full = self.tok.decode(out, skip_special_tokens=True)
            if len(full) > len(shown):
                yield full[len(shown):]
                shown = full


def run_chat(export_dir: str, media: Union[None, str, Sequence[str]], question: Optional[str],
             write: Callable[[str], None] = None, read: Callable[[str], str] = input, **gen) -> int:
    """One question (``question``) or an interactive session about 0..N media files."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    paths = [media] if isinstance(media, str) else list(media or [])
    for p in paths:
        media_file(p)  # a missing file fails before the model loads
    session = ChatSession(export_dir)
    session.load_media(paths)
    if question is not None:
        for piece in session.ask(question, **gen):
            write(piece)
        write("\n")
        return 0
    for it in session.items:
        write(f"[{it.modality}: {it.path}, {it.num_frames} frame(s)]\n")
    write("ask away; empty line or Ctrl-D to quit\n")
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
