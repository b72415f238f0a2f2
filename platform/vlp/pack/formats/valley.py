"""Valley's video annotation files (Valley-webvid2M-Pretrain-703K, Valley-Instruct): ``{"id", "video",
"source"?, "conversations": [{"from": "human"|"gpt", "value"}]}``.

``video`` names the clip: WebVid-style ids (``"1021133926"``) or file names (``"1021133926.mp4"``); Valley's
loader appends ``.mp4`` when the name lacks it and looks in ``<video_folder>/<source>/``, ``source`` defaulting
to ``webvid`` (Valley-Instruct mixes ``webvid``, ``VATEX`` and ``jukinmedia`` clips). The item's path is
``<source>/<video>[.mp4]`` under the media root (``default_source: null`` and ``use_source: false`` drop the
folder). Rows with ``image`` instead (Valley's hybrid image data) are LLaVA-style image rows; rows with neither are
text-only. ``id`` is kept as written.

Checked (search corpus ``code``): RupertLuo/Valley ``valley/data/dataset.py`` (``HybridDataset.__getitem__``:
``'image' in sources[0]`` -> image (a str or a list), ``elif 'video' in sources[0]`` -> ``video_file = video if
'.mp4' in video else video + '.mp4'``, folder ``video_folder + '/' + source`` or ``'/webvid'``; conversations from
``e["conversations"]``; the id printed on failure is ``['id']``), ``valley/data_process/preprocess_valley_instruct.py``
(fills ``source = 'webvid'`` where missing in ``Valley_instruct_84k.json``) and
``valley/configs/experiment/valley_stage2.yaml`` (``video_data_path``/``video_folder``). There is no ``v_id`` field.

Errors: missing/ill-typed ``conversations``, ``video`` or ``source``; turns out of order; placeholder/item count
mismatch.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ...data.media import VIDEO_EXTS
from .base import (ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackItem, PackRecord, check_path,
                   conversation_record, item_for, path_list, record_turns)


@ANNOTATION_FORMATS.register
class ValleyFormat(AnnotationFormat):
    """Valley pretraining / instruction JSON (see the module doc)."""

    class Cfg(FormatCfg):
        type: Literal["valley"] = "valley"
        use_source: bool = Field(True, description="put the clip under <source>/ (Valley's layout)")
        default_source: Optional[str] = Field("webvid", description="folder of rows without 'source'; null = none")
        video_ext: str = Field(".mp4", description="appended to a 'video' without a video extension")

    cfg: Cfg

    def convert(self, index: int, raw: dict) -> PackRecord:
        conv = record_turns(raw)
        if "video" in raw:
            items = [self.video_item(raw)]
        else:
            items = [item_for(p, "image") for p in path_list(raw, "image", self.cfg.max_items)]
        return conversation_record(index, raw, self.record_id(raw), conv, items)

    def video_item(self, raw: dict) -> PackItem:
        name = check_path(raw["video"], "'video'")
        if name.rsplit("/", 1)[-1].rpartition(".")[2].lower() not in VIDEO_EXTS:
            name += self.cfg.video_ext
        source = raw.get("source", self.cfg.default_source) if self.cfg.use_source else None
        if source is not None:
            source = check_path(source, "'source'").strip("/")
        return PackItem(modality="video", path=f"{source}/{name}" if source else name)
