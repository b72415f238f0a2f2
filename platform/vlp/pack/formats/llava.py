"""LLaVA's annotation files: ``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``.

Read: blip_laion_cc_sbu_558k.json (pretraining captions as a one-turn conversation), llava_instruct_150k.json,
llava_v1_5_mix665k.json (with its text-only rows, which have no ``image``). ``image`` is a path relative to the
image folder (``coco/train2017/000000033471.jpg``, ``00453/004539375.jpg``); a list of paths is read too (later
multi-image derivatives). ``id`` is kept as written: it repeats in places and may hold characters a tar key
cannot, so the shard key comes from the running index.

Checked (search corpus ``code``): haotian-liu/LLaVA ``llava/train/train.py`` (``LazySupervisedDataset``: a record
has media iff ``'image' in sources[0]``, opened as ``os.path.join(image_folder, image_file)``; otherwise a
text-only sample; ``preprocess_multimodal`` moves ``<image>`` to the front of the turn) and ``docs/Data.md``
(the released file names, CC-3M names like ``GCC_train_000000000.jpg``).

Errors: missing/ill-typed ``conversations`` or ``image``, turns that do not alternate human/gpt from a human
turn, placeholder/item count mismatch (e.g. ``<image>`` in a row without ``image``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import (ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackRecord, conversation_record, item_for,
                   path_list, record_turns)


@ANNOTATION_FORMATS.register
class LlavaFormat(AnnotationFormat):
    """LLaVA pretraining / instruction JSON (see the module doc)."""

    class Cfg(FormatCfg):
        type: Literal["llava"] = "llava"
        image_key: str = Field("image", description="the record's field naming its image(s)")

    cfg: Cfg

    def convert(self, index: int, raw: dict) -> PackRecord:
        conv = record_turns(raw)
        items = [item_for(p, "image") for p in path_list(raw, self.cfg.image_key, self.cfg.max_items)]
        return conversation_record(index, raw, self.record_id(raw), conv, items)
