"""RefCOCO / RefCOCO+ / RefCOCOg referring expressions (Yu et al. 2016; the refer toolkit's layout): the refs
(``refs(unc).p``, ``refs(umd).p``... as JSON or JSON Lines: records ``{ref_id, ann_id, image_id, split,
sentences: [{sent, ...}]}``; the release is a pickle, which vlp never unpickles: convert it once with
``python -c "import pickle, json; json.dump(pickle.load(open('refs(unc).p', 'rb')), open('refs_unc.json', 'w'))"``
on a machine you trust it on) and COCO's ``instances.json`` of the same folder (``images``: id, file_name, width,
height; ``annotations``: id, image_id, bbox ``[x, y, w, h]`` in pixels), named by ``instances``.

Each ref becomes one sample: its COCO image (``image_pattern``, default ``{file_name}`` of the instances image,
e.g. ``COCO_train2014_000000581857.jpg``), one question per sentence (``question`` with the sentence) answered by
the box as text (``[x1, y1, x2, y2]`` normalised to the image padded to a square, 3 decimals:
:func:`vlp.data.grounding.box_to_text`), and in the shard's json the truth for scoring:
``grounding = {task: referring, box: [x1, y1, x2, y2] (pixels), width, height, query}`` (the first sentence, which
evaluation asks). ``split`` keeps one split (``train``, ``val``, ``testA``, ``testB``, ``test``); the others are
counted in the pack manifest's ``filtered``.

Errors (one per ref): missing fields, no sentence, an ann_id or image_id the instances do not hold, a bbox that is
not 4 numbers with positive size, a box outside its image.

``instances`` is read once (streamed with ijson: only the images' and annotations' ids, names, sizes and boxes are
kept).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from ...data.grounding import box_to_text, xywh_to_xyxy
from ...storage import StorageError, describe_storage_error, get_fs
from .base import ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackItem, PackRecord, check_path, fill, kind_of


def read_instances(uri: str) -> tuple[dict[int, tuple[str, int, int]], dict[int, tuple[int, list]]]:
    """(image id -> (file_name, width, height), annotation id -> (image id, bbox)) of a COCO instances file."""
    import ijson

    fs, path = get_fs(uri)
    images: dict[int, tuple[str, int, int]] = {}
    anns: dict[int, tuple[int, list]] = {}
    try:
        with fs.open(path, "rb") as f:
            for im in ijson.items(f, "images.item", use_float=True):
                if isinstance(im, dict) and {"id", "file_name", "width", "height"} <= set(im):
                    images[int(im["id"])] = (str(im["file_name"]), int(im["width"]), int(im["height"]))
        with fs.open(path, "rb") as f:
            for a in ijson.items(f, "annotations.item", use_float=True):
                if isinstance(a, dict) and {"id", "image_id", "bbox"} <= set(a):
                    anns[int(a["id"])] = (int(a["image_id"]), a["bbox"])
    except OSError as e:
        raise StorageError(describe_storage_error(uri, e)) from e
    return images, anns


def int_field(raw: dict, key: str) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not str(v).lstrip("-").isdigit():
        raise ValueError(f"{key!r} must be an integer id, got {kind_of(v)}")
    return int(v)


def sentences_of(raw: dict) -> list[str]:
    sents = raw.get("sentences")
    if not isinstance(sents, list):
        raise ValueError(f"'sentences' must be a list, got {kind_of(sents)}")
    out = [s.get("sent") if isinstance(s, dict) else s for s in sents]
    out = [s.strip() for s in out if isinstance(s, str) and s.strip()]
    if not out:
        raise ValueError("no sentence (each of 'sentences' needs a non-empty 'sent')")
    return out


def pixel_box(bbox: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2) clipped to the image; ValueError when malformed or outside it."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise ValueError(f"bbox must be 4 numbers [x, y, w, h], got {str(bbox)[:60]}")
    if bbox[2] <= 0 or bbox[3] <= 0:
        raise ValueError(f"bbox {bbox} has no area")
    x1, y1, x2, y2 = xywh_to_xyxy(bbox)
    x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox {bbox} lies outside its {width}x{height} image")
    return x1, y1, x2, y2


@ANNOTATION_FORMATS.register
class RefCOCOFormat(AnnotationFormat):
    """RefCOCO refs + COCO instances (see the module doc)."""

    class Cfg(FormatCfg):
        type: Literal["refcoco"] = "refcoco"
        instances: str = Field(..., description="COCO instances.json of the refs' folder (images + annotations)")
        split: Optional[str] = Field(None, description="keep only refs of this split (train, val, testA, testB, "
                                     "test); None: every ref")
        question: str = Field('Where is "{sentence}" in the image?', description="a human turn per sentence; the "
                              "first follows the <image> placeholder")
        image_pattern: str = Field("{file_name}", description="the image's path from the instances image's "
                                   "{file_name} (and {image_id})")

    cfg: Cfg

    def __init__(self, cfg):
        super().__init__(cfg)
        self._instances: Optional[tuple[dict, dict]] = None

    def instances(self) -> tuple[dict, dict]:
        if self._instances is None:
            self._instances = read_instances(self.cfg.instances)
        return self._instances

    def record_id(self, raw: dict):
        v = raw.get("ref_id")
        return str(v) if isinstance(v, (int, str)) and not isinstance(v, bool) else None

    def select(self, raw: dict) -> Optional[str]:
        split = raw.get("split")
        return None if self.cfg.split is None or split == self.cfg.split else f"split {split}"

    def convert(self, index: int, raw: dict) -> PackRecord:
        images, anns = self.instances()
        ann_id, sents = int_field(raw, "ann_id"), sentences_of(raw)
        if ann_id not in anns:
            raise ValueError(f"ann_id {ann_id} is not in the instances ({self.cfg.instances})")
        image_id, bbox = anns[ann_id]
        if image_id not in images:
            raise ValueError(f"image_id {image_id} is not in the instances ({self.cfg.instances})")
        file_name, w, h = images[image_id]
        box = pixel_box(bbox, w, h)
        answer = box_to_text(box, w, h)
        conv = []
        for i, sent in enumerate(sents):
            q = self.cfg.question.format(sentence=sent)
            conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": answer}]
        path = check_path(fill(self.cfg.image_pattern, {"file_name": file_name, "image_id": image_id}), "image path")
        truth = {"task": "referring", "box": list(box), "width": w, "height": h, "query": sents[0]}
        return PackRecord(index=index, items=[PackItem("image", path)], conversations=conv, caption=None,
                          source=raw, id=self.record_id(raw), extra={"grounding": truth})
