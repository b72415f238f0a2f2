"""``vlp chat``: ask a trained model about videos, images and sounds (0..N per conversation), decoding and encoding
each online with the same sampling, preprocessing and audio cuts the model's features were precomputed with. The
first question's ``<image>``/``<video>``/``<audio>`` placeholders place the items (matched per modality in order);
without any, one per item goes in front of it in the order given. A video's soundtrack is an item of its own
(``--with-audio``: each video is followed by its audio).

A media file that is missing or that no decoder can read raises :class:`BadMedia` (a user error naming the file);
audio given to a model trained without audio raises :class:`NoAudio`.
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
from .data.preprocess import resize_crop
from .errors import UserError


class BadMedia(UserError):
    """The file given to chat is missing, not a file, or not a video/image any decoder can read."""


class NoAudio(UserError):
    """Audio was given to a model whose export has no audio tower (it was trained without audio features)."""


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
    feats: torch.Tensor  # (T, 1 + P, D) frames, or audio (segments, tokens, D_a)

    @property
    def num_frames(self) -> int:
        return int(self.feats.shape[0])


def items_prompt(ids: torch.Tensor, items: Sequence[ChatItem], device: Optional[str] = None):
    """The model's :class:`vlp.models.videollm.Prompt` of prompt token ids (L,) and its items in placeholder order
    (none: a text-only prompt), their features on ``device`` when given."""
    from .models.videollm import Prompt

    feats = [it.feats if device is None else it.feats.to(device) for it in items]
    modalities = [it.modality for it in items]
    return Prompt(ids, feats or None, "frames", [it.num_frames for it in items], modalities or None)


class ChatSession:
    """Holds the model, the media items' visual features and the conversation so far."""

    def __init__(self, export_dir: str, device: str = "cpu"):
        from .formats.export import load_model
        from .online import OnlineEncoder

        self.model, self.tok, self.info = load_model(export_dir, device)
        self.template = self.info.prompt_template(export_dir)
        self.enc = OnlineEncoder(self.info, export_dir, device, self.model.tower)  # the export's towers and preprocessing
        self.conv: list[dict] = []
        self.items: list[ChatItem] = []
        self.order: list[int] = []  # the item of each placeholder of the conversation, in order

    @torch.no_grad()
    def encode_audio(self, path: str) -> ChatItem:
        """A file's sound (an audio file, or a video's soundtrack) -> its audio item, cut and encoded as precompute
        did. NoAudio for a model without audio; BadMedia when the file holds no decodable sound."""
        data = media_file(path).read_bytes()
        if self.enc.featurizer is None:
            raise NoAudio(f"{path}: this model was trained without audio (its export has no audio tower); audio "
                          "needs a model trained on features precomputed with encoder.audio_tower")
        try:
            dec = self.enc.featurizer(data)
        except MediaError as e:
            raise BadMedia(f"{path} has no audio vlp can decode: {e}") from None
        return ChatItem(path, "audio", self.enc.sound(dec.fbank).cpu())  # (n, F, M) -> (n, tokens, D_a)

    def frames(self, path: str) -> tuple[str, torch.Tensor]:
        """Decode + sample + resize/pad/crop as precompute did: (media type, (T, 3, S, S) uint8)."""
        return self.frames_of(media_file(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), path)

    def frames_of(self, data: bytes, ext: str, name: str) -> tuple[str, torch.Tensor]:
        """:meth:`frames` of a file's bytes already in memory (``ext``: its extension, a hint for the decoder;
        ``name``: how BadMedia names it)."""
        try:
            mtype, dec = decode_media(data, ext, self.enc.sampling, DecodeConfig())
        except MediaError as e:
            raise BadMedia(f"{name} is not a video or image vlp can decode: {e}") from None
        g = self.enc.geom
        return mtype, resize_crop(dec.frames, g.size, g.pad_to_square, g.mean)  # (T, H, W, 3) -> (T, 3, S, S)

    def encode(self, path: str) -> ChatItem:
        """Decode + sample + preprocess + encode one file; touches no conversation state (BadMedia if unreadable)."""
        return self.encode_bytes(media_file(path).read_bytes(), Path(path).suffix.lstrip(".").lower(), path)

    @torch.no_grad()
    def encode_bytes(self, data: bytes, ext: str, name: str) -> ChatItem:
        """:meth:`encode` of a media file's bytes (an image made in memory: lmms-eval's PIL images)."""
        mtype, x = self.frames_of(data, ext, name)
        return ChatItem(name, mtype, self.enc.frames(x).cpu())  # (T, 3, S, S) -> (T, 1 + P, D)

    def load_media(self, paths: Union[str, Sequence[str]], audio: Sequence[int] = (), with_audio: bool = False
                   ) -> list[str]:
        """Encode each file (:meth:`encode`; those at the positions in ``audio``: their sound, :meth:`encode_audio`)
        and start a new conversation about them; ``with_audio``: each video is followed by its soundtrack. -> the
        media types found."""
        items = []
        for i, p in enumerate([paths] if isinstance(paths, str) else paths):
            items.append(self.encode_audio(p) if i in audio else self.encode(p))
            if with_audio and items[-1].modality == "video":
                items.append(self.encode_audio(p))
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

    def answer_many(self, asks: Sequence[tuple[str, Sequence[ChatItem]]], max_new_tokens: int = 64,
                    batch_size: int = 16) -> list[str]:
        """:meth:`answer` for many (question, items) pairs, ``batch_size`` at a time in batches of near prompt
        length (:meth:`VideoLLM.generate_grouped`): the same greedy answers, in order."""
        prompts = []
        for question, items in asks:
            question, order = self.place(question, items)
            ids = torch.tensor(prompt_ids([{"from": "human", "value": question}], self.tok, self.template))
            prompts.append(items_prompt(ids, [items[i] for i in order]))
        out = self.model.generate_grouped(prompts, batch_size, max_new_tokens=max_new_tokens,
                                          eos_token_id=self.tok.eos_token_id)
        return [self.tok.decode(t, skip_special_tokens=True).strip() for t in out]

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
            # a character split over tokens decodes as U+FFFD until its last token: held back, not shown broken
            full = self.tok.decode(out, skip_special_tokens=True).rstrip("\ufffd")
            if len(full) > len(shown) and full.startswith(shown):
                yield full[len(shown):]
                shown = full
        rest = self.tok.decode(out, skip_special_tokens=True)[len(shown):]
        if rest:
            yield rest  # what is still held back when the answer ends (a character it never finished)


def run_chat(export_dir: str, media: Union[None, str, Sequence[str]], question: Optional[str],
             write: Callable[[str], None] = None, read: Callable[[str], str] = input, audio: Sequence[int] = (),
             with_audio: bool = False, **gen) -> int:
    """One question (``question``) or an interactive session about 0..N media files (those at the positions in
    ``audio``: their sound; ``with_audio``: each video followed by its soundtrack)."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    paths = [media] if isinstance(media, str) else list(media or [])
    for p in paths:
        media_file(p)  # a missing file fails before the model loads
    from .formats.export import ExportInfo

    if (audio or with_audio) and ExportInfo.read(export_dir).audio is None:  # and so does audio for a deaf model
        raise NoAudio(f"{export_dir}: this model was trained without audio (its export has no audio tower); --audio "
                      "and --with-audio need a model trained on features precomputed with encoder.audio_tower")
    session = ChatSession(export_dir)
    session.load_media(paths, audio, with_audio)
    if question is not None:
        for piece in session.ask(question, **gen):
            write(piece)
        write("\n")
        return 0
    for it in session.items:
        unit = "segment(s)" if it.modality == "audio" else "frame(s)"
        write(f"[{it.modality}: {it.path}, {it.num_frames} {unit}]\n")
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
