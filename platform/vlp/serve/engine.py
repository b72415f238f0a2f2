"""What one ``vlp serve`` replica does with requests, without Ray: load the export, turn a parsed request into a
:class:`Job` (media fetched within limits, decoded and encoded exactly as ``vlp chat`` does, prompt tokens counted
and checked), and decode a batch of jobs step by step (:meth:`Engine.answer_batch`, the one batch step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from ..chat import BadMedia as UnreadableMedia
from ..chat import ChatItem, items_prompt
from ..data.conversation import prompt_ids
from ..models.generation import next_tokens
from ..models.videollm import visual_token_count
from ..storage import localize
from .config import ServeConfig
from .media import fetch
from .protocol import BadMedia, BadRequest, ChatRequest, MediaRef
from .stream import AnswerText, Delta


@dataclass
class Job:
    """One request, ready for decoding."""

    ids: torch.Tensor  # (L,) prompt ids, VISUAL_TOKEN_INDEX at each media placeholder
    items: list[ChatItem]  # media items in placeholder order, features (T, 1 + P, D)
    prompt_tokens: int  # text + visual tokens the LLM reads
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    cancelled: bool = False  # set when a stop string ended the answer or the client went away: decode no further


class Engine:
    """The export's model, tokenizer and towers on the config's device (a :class:`vlp.chat.ChatSession`, whose
    media decoding and encoding it uses as is), and the request limits."""

    def __init__(self, cfg: ServeConfig, export_dir: Optional[str] = None):
        from ..chat import ChatSession

        self.cfg, self.device, self.name = cfg, cfg.device(), cfg.served_model()
        self.session = ChatSession(export_dir or localize(cfg.model, cfg.storage), self.device)
        self.model, self.tok = self.session.model, self.session.tok
        self.positions: Optional[int] = getattr(self.model.llm.config, "max_position_embeddings", None)
        limits = [n for n in (cfg.limits.max_prompt_tokens, self.positions) if n]
        self.prompt_limit: Optional[int] = min(limits) if limits else None

    def prepare(self, req: ChatRequest) -> Job:
        """Fetch, decode and encode the request's media, tokenise its conversation, check the token limits.
        APIError (BadRequest / TooLarge / BadMedia) for a request that cannot be answered."""
        # every placeholder is the one VISUAL_TOKEN_INDEX, whatever its modality: the ids do not depend on what
        # the media turn out to be (that travels with each item), so the text is counted before any decoding
        ids = prompt_ids(req.conversation(["image"] * len(req.media)), self.tok, self.session.template)
        text_tokens = len(ids) - len(req.media)
        self.check_prompt(text_tokens)
        items = [self.encode(ref) for ref in req.media]
        n = text_tokens + sum(visual_token_count(self.model.cfg, tuple(it.feats.shape), "frames", it.num_frames,
                                                 it.modality) for it in items)
        temperature = self.cfg.temperature if req.temperature is None else req.temperature
        return Job(torch.tensor(ids, device=self.device), items, n, self.budget(n, req.max_tokens), temperature,
                   req.top_p, req.stop, req.seed)

    def encode(self, ref: MediaRef) -> ChatItem:
        """One media part -> its item, read within the size limit and decoded + sampled + preprocessed + encoded
        as ``vlp chat`` does (ChatSession.encode_bytes: the export's sampling, preprocessing and tower)."""
        m = fetch(ref.url, self.cfg.limits.max_media_bytes, self.cfg.media, ref.where, self.cfg.storage)
        try:
            return self.session.encode_bytes(m.data, m.ext, m.name)
        except UnreadableMedia as e:
            raise BadMedia(str(e), param=ref.where, code="invalid_media") from None

    def check_prompt(self, n: int) -> None:
        if self.prompt_limit is not None and n > self.prompt_limit:
            raise BadRequest(f"the prompt is {n} tokens (text and media); this server takes at most "
                             f"{self.prompt_limit}", param="messages", code="context_length_exceeded")

    def budget(self, n: int, requested: Optional[int]) -> int:
        """The answer's token budget for a prompt of ``n`` tokens: ``requested``, or the server's default cut to
        what fits the LLM's positions. BadRequest when the prompt is over the limit or prompt + answer do not fit."""
        self.check_prompt(n)
        room = self.positions - n if self.positions else None
        if requested is not None and room is not None and requested > room:
            raise BadRequest(f"this model's context is {self.positions} tokens; the request asks for {n + requested} "
                             f"({n} in the messages, {requested} in the answer)", param="max_tokens",
                             code="context_length_exceeded")
        budget = requested if requested is not None else min(self.cfg.max_tokens, room or self.cfg.max_tokens)
        if budget < 1:
            raise BadRequest(f"the prompt ({n} tokens) leaves no room for an answer in this model's "
                             f"{self.positions}-token context", param="messages", code="context_length_exceeded")
        return budget

    def pick(self, jobs: Sequence[Job]):
        """The batch's next-token rule: (B, V) logits -> (B,) ids; greedy rows at once, each sampling row with its
        own temperature, top_p and seeded generator (as ``vlp chat`` samples)."""
        gens = [torch.Generator(device=self.device).manual_seed(j.seed) if j.temperature > 0 and j.seed is not None
                else None for j in jobs]

        def pick(logits: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B,)
            out = logits.argmax(-1)
            for i, j in enumerate(jobs):
                if j.temperature > 0:
                    out[i] = next_tokens(logits[i:i + 1], True, j.temperature, j.top_p, gens[i])[0]
            return out

        return pick

    def answer_batch(self, jobs: Sequence[Job]) -> Iterator[list[Optional[int]]]:
        """THE batch step: decode ``jobs`` together in one left-padded batch with a KV cache
        (``VideoLLM.decode_batch``), one token each per step. Yields, per step, one entry per job: its next token
        id, or None once it has finished (EOS, its max_tokens, or ``job.cancelled``); ends when every job has."""
        prompts = [items_prompt(j.ids, j.items, self.device) for j in jobs]
        yield from self.model.decode_batch(prompts, [j.max_tokens for j in jobs], self.pick(jobs),
                                           self.tok.eos_token_id, lambda i: jobs[i].cancelled)

    def stream_batch(self, jobs: Sequence[Job]) -> Iterator[list[Optional[Delta]]]:
        """:meth:`answer_batch` as text: per step, per job a Delta (new text; its last one with the finish reason
        and token count), then None for a job whose answer is complete. A stop string cancels its job."""
        answers = [AnswerText(self.decode, j.stop, j.max_tokens) for j in jobs]
        done = [False] * len(jobs)
        for step in self.answer_batch(jobs):
            out: list[Optional[Delta]] = []
            for i, tok in enumerate(step):
                d = None if done[i] else answers[i].token(tok) if tok is not None else answers[i].end()
                if d is not None and d.finish:
                    done[i] = jobs[i].cancelled = True
                out.append(d)
            yield out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
