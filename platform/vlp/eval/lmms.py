"""An lmms-eval model adapter: ``lmms-eval --model vlp --model_args pretrained=EXPORT --tasks ...``.

lmms-eval (an optional extra, ``pip install -e ".[lmms]"``) finds this model through the ``lmms_eval.models``
entry point vlp's package declares (:func:`manifest`); this module imports lmms_eval at its top and is imported by
lmms-eval only, never by ``import vlp``.

Every request is answered one conversation at a time on :class:`vlp.chat.ChatSession`, so media are decoded,
sampled, preprocessed and encoded exactly as ``vlp chat`` does (the export's sampling, preprocessing and vision
tower). A task's ``doc_to_visual`` gives PIL images (each encoded as an image item, through a lossless PNG) and/or
paths of video or image files (the media type is sniffed from the contents); the items go in front of the context
as ``<image>``/``<video>`` placeholders unless the context already holds them (``ChatSession.place``).

- ``generate_until``: the context is the user's first (only) turn; the answer is decoded greedily, or sampled when
  ``temperature`` > 0 (with ``top_p``), for at most ``max_new_tokens`` tokens (gen_kwargs, else the model_args
  default); it stops at the tokenizer's EOS or at the first of the ``until`` strings, which is cut off, and comes
  back stripped of surrounding whitespace.
- ``loglikelihood``: the continuation is the start of the assistant's answer after the context, in the export's
  conversation template. Its leading whitespace (lmms-eval's ``target_delimiter``) is dropped: the template puts
  its own separator before the answer. The result is the summed log-probability of the continuation's tokens only
  (not the template's end-of-turn token, which ``vlp eval --task mcq`` also scores) and whether each of them is
  the model's argmax. The continuations of one context and document are scored in one batch.

Not supported: ``generate_until_multi_round`` (NotImplementedError), beam search (``num_beams`` > 1), several
processes (one rank). ``batch_size`` / ``max_batch_size`` are accepted and unused.

lmms-eval 0.7.3 itself (docs/inference.md, "lmms-eval"): its evaluator turns every loglikelihood response into its
``str()`` (``unwrap_generation_output``), so ``multiple_choice`` tasks fail for every model there; and its
multiple-choice scoring takes the *lowest* value as the choice (its llava adapter returns a loss), whereas this
adapter returns what lmms's docstring asks for, a log-probability (higher is likelier).
"""

from __future__ import annotations

import io
import itertools
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from ..chat import ChatItem, ChatSession
from ..data.conversation import IGNORE_INDEX, TEMPLATES, tokenize_conversation

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "vlp"
Visual = Union[Image.Image, str, os.PathLike]


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point (pyproject.toml): lmms-eval's registry resolves ``--model vlp`` here."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VlpLMM")


def image_bytes(img: Image.Image) -> bytes:
    """A PIL image as lossless PNG bytes (RGB), what ChatSession decodes like an image file."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def flat_visuals(visuals: Any) -> list:
    """``doc_to_visual``'s result as a flat list: None -> [], one visual -> [it], nested lists flattened."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for x in visuals for v in flat_visuals(x)]


def encode_visuals(session: ChatSession, visuals: Sequence[Visual], name: str) -> list[ChatItem]:
    """Each visual as a ChatItem: a PIL image encoded as an image, a path as the file it names (``vlp chat``'s
    ``--image`` / ``--video``). TypeError for anything else (audio, dicts)."""
    items = []
    for k, v in enumerate(visuals):
        if isinstance(v, Image.Image):
            items.append(session.encode_bytes(image_bytes(v), "png", f"{name} image {k}"))
        elif isinstance(v, (str, os.PathLike)):
            items.append(session.encode(os.fspath(v)))
        else:
            raise TypeError(f"{name}: visual {k} is a {type(v).__name__}; vlp takes PIL images and paths of "
                            "video/image files")
    return items


def answer_token_count(tok: Any, template: str, answer: str) -> int:
    """How many tokens the answer text itself has in its assistant turn (the template's first labelled segment;
    its end-of-turn segments not counted). Segments are tokenised one by one, as ``encode_conversation`` does."""
    segs = TEMPLATES.get(template).render([{"from": "human", "value": ""}, {"from": "gpt", "value": answer}],
                                          tok.eos_token or "")
    first = next(s for s in segs if s.train)
    return len(tok(first.text, add_special_tokens=False).input_ids)


@torch.no_grad()
def score_continuations(session: ChatSession, context: str, items: Sequence[ChatItem],
                        continuations: Sequence[str]) -> list[tuple[float, bool]]:
    """(summed log-probability, is greedy) of each continuation as the start of the assistant's answer to
    ``context`` about ``items`` (placed as in a first question). One forward pass for all of them."""
    question, order = session.place(context, items)
    placed = [items[i] for i in order]
    answers = [c.lstrip() for c in continuations]
    todo = [i for i, a in enumerate(answers) if a]
    out = [(0.0, True)] * len(answers)  # an empty continuation: log 1, trivially greedy
    if not todo:
        return out
    model, tok, tpl = session.model, session.tok, session.template
    enc = [tokenize_conversation([{"from": "human", "value": question}, {"from": "gpt", "value": answers[i]}],
                                 tok, tpl) for i in todo]
    visuals = model.sample_visuals([it.feats for it in placed] or None, "frames", [it.num_frames for it in placed],
                                   modalities=[it.modality for it in placed])
    embeds, mask, labels = model.build_inputs([torch.tensor(ids) for ids, _ in enc],
                                              [torch.tensor(lab) for _, lab in enc], [visuals] * len(todo))
    logp = torch.log_softmax(model.llm(inputs_embeds=embeds, attention_mask=mask).logits.float()[:, :-1], -1)
    tgt = labels[:, 1:]  # position t predicts token t + 1
    for row, i in enumerate(todo):
        pos = (tgt[row] != IGNORE_INDEX).nonzero().squeeze(-1)[:answer_token_count(tok, tpl, answers[i])]
        want = tgt[row, pos]
        picked = logp[row, pos].gather(-1, want.unsqueeze(-1)).squeeze(-1)
        out[i] = (float(picked.sum()), bool((logp[row, pos].argmax(-1) == want).all()))
    return out


def stop_at(text: str, until: Sequence[str]) -> Optional[int]:
    """Where the first of the ``until`` strings starts in ``text`` (the earliest one); None when none occurs."""
    found = [text.find(u) for u in until if u]
    found = [i for i in found if i >= 0]
    return min(found) if found else None


def until_list(gen_kwargs: dict) -> list[str]:
    """gen_kwargs' ``until`` as a list (a string or a list of strings; absent: [], stop at EOS only)."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"gen_kwargs['until'] must be a string or a list of strings, not {until!r}")
    return list(until)


def generate(session: ChatSession, context: str, items: Sequence[ChatItem], gen_kwargs: dict,
             default_max_new_tokens: int) -> str:
    """The answer to ``context`` about ``items``, cut at the first ``until`` string, stripped (module docstring)."""
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        raise ValueError("vlp decodes greedily or by sampling; num_beams > 1 (beam search) is not supported")
    until = until_list(gen_kwargs)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    question, order = session.place(context, items)
    text = ""
    for piece in session.stream([{"from": "human", "value": question}], [items[i] for i in order],
                                max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
                                do_sample=temperature > 0, temperature=temperature or 1.0,
                                top_p=float(gen_kwargs.get("top_p") or 1.0)):
        text += piece
        cut = stop_at(text, until)
        if cut is not None:
            text = text[:cut]
            break
    return text.strip()


def group_key(args: tuple) -> tuple:
    """Loglikelihood requests with equal keys share a context and a document (a multiple-choice question's
    options): (context, (doc_id, task, split) or None for a text-only request)."""
    return args[0], (tuple(args[3:6]) if len(args) >= 6 else None)


@register_model(MODEL_ID)
class VlpLMM(lmms):
    """A vlp export as an lmms-eval model (module docstring). model_args: ``pretrained`` (the export folder),
    ``device`` (``cpu``; ``--device`` sets it too), ``max_new_tokens`` (64: when a task's gen_kwargs set none)."""

    is_simple = True

    def __init__(self, pretrained: str, device: Optional[str] = None, max_new_tokens: Union[int, str] = 64,
                 batch_size: Union[int, str, None] = 1, max_batch_size: Union[int, str, None] = None) -> None:
        super().__init__()
        self.device = torch.device(device or "cpu")
        self.session = ChatSession(str(pretrained), str(self.device))
        self.max_new_tokens = int(max_new_tokens)
        self.cached: tuple[Optional[tuple], list[ChatItem]] = (None, [])

    def items_of(self, args: tuple) -> list[ChatItem]:
        """The encoded visuals of a request's document (args[2:6]: doc_to_visual, doc_id, task, split); [] for a
        request without them. The last document's items are reused."""
        if len(args) < 6 or args[2] is None:
            return []
        doc_to_visual, doc_id, task, split = args[2:6]
        key = (task, split, doc_id)
        if self.cached[0] != key:
            visuals = flat_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
            self.cached = (None, [])
            self.cached = (key, encode_visuals(self.session, visuals, f"{task}/{split} doc {doc_id}"))
        return self.cached[1]

    def continuation(self, args: tuple) -> str:
        """A loglikelihood request's continuation: a string, or ``doc_to_target`` called on the document."""
        target = args[1]
        if isinstance(target, str) or len(args) < 6:
            return str(target)
        doc_id, task, split = args[3:6]
        return str(target(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One answer per request: args (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        return [generate(self.session, r.args[0], self.items_of(r.args), dict(r.args[1] or {}), self.max_new_tokens)
                for r in requests]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is greedy) per request: args (context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split), or (context, continuation) for a text-only one. Consecutive requests
        with the same context and document are scored in one batch."""
        out: list[tuple[float, bool]] = []
        for (context, _), group in itertools.groupby(requests, key=lambda r: group_key(r.args)):
            group = list(group)
            out += score_continuations(self.session, context, self.items_of(group[0].args),
                                       [self.continuation(r.args) for r in group])
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported: vlp's adapter answers one-turn requests only."""
        raise NotImplementedError("vlp's lmms-eval adapter does not implement generate_until_multi_round "
                                  "(multi-round tasks); run single-turn generate_until / loglikelihood tasks")
