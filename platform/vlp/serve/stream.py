"""Token ids -> answer text as it streams: incremental detokenisation (:class:`TextStream`) and ``stop`` strings
(:class:`StopCutter`). Pure Python (the tokenizer's ``decode`` is passed in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class TextStream:
    """The text of the tokens so far, handed out in new pieces: after each token the whole answer is decoded
    again (as ``vlp chat`` does) and what extends the text already handed out is the new piece. A decoded text
    ending in U+FFFD (the first bytes of a multi-byte character) is held back until the next token completes it
    (or the answer ends)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode, self.ids, self.shown = decode, [], ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        full = self.decode(self.ids)
        if full.endswith(REPLACEMENT):
            return ""
        return self.take(full)

    def finish(self) -> str:
        """What is left at the end of the answer (a held-back U+FFFD included)."""
        return self.take(self.decode(self.ids)) if self.ids else ""

    def take(self, full: str) -> str:
        if len(full) <= len(self.shown):
            return ""
        piece, self.shown = full[len(self.shown):], full
        return piece


class StopCutter:
    """Cuts the answer at the first ``stop`` string (not included). Text that could be the start of a stop string
    is held back until it is known not to be one; :attr:`stopped` turns true when one was found."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        """The text that may be sent after ``piece`` arrived ('' once stopped)."""
        if self.stopped or not piece:
            return ""
        self.text += piece
        if not self.stops:
            return self.emit(len(self.text))
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self.emit(min(hits))
        return self.emit(len(self.text) - self.held())

    def held(self) -> int:
        """Length of the longest end of the text that is a proper start of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of the answer: the held-back text (it did not become a stop string)."""
        return "" if self.stopped else self.emit(len(self.text))

    def emit(self, end: int) -> str:
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class Delta:
    """One answer's share of a decoding step: its new text; the last one also says why it ended (``stop``: EOS
    or a stop string; ``length``: max_tokens) and how many tokens were generated."""

    text: str
    finish: Optional[str] = None
    completion_tokens: int = 0


class AnswerText:
    """One answer as its token ids arrive: detokenised (:class:`TextStream`), cut at ``stop`` strings
    (:class:`StopCutter`), ending with a finish reason."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str], max_tokens: int):
        self.text, self.cut, self.max_tokens, self.tokens = TextStream(decode), StopCutter(stops), max_tokens, 0

    def token(self, tok: int) -> Delta:
        """A new token; the Delta is final (finish ``stop``) when it completed a stop string."""
        self.tokens += 1
        piece = self.cut.feed(self.text.add(tok))
        return Delta(piece, "stop", self.tokens) if self.cut.stopped else Delta(piece)

    def end(self) -> Delta:
        """The generator stopped (EOS, or max_tokens reached): the rest of the text and the finish reason."""
        piece = self.cut.feed(self.text.finish())
        piece += self.cut.flush()
        reason = "length" if self.tokens >= self.max_tokens and not self.cut.stopped else "stop"
        return Delta(piece, reason, self.tokens)
