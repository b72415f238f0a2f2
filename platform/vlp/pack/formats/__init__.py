"""Annotation formats of ``vlp pack``: one module per format, registered by ``type`` in
:data:`ANNOTATION_FORMATS` (``llava``, ``valley``, ``videochatgpt``, ``sharegpt``, ``captions``, ``charades_sta``,
``refcoco``); ``base`` holds
the common record (:class:`PackRecord`, :class:`PackItem`, :class:`PackError`) and the checks formats share,
``reader`` the streaming bounded file readers, :func:`read_annotations` and :func:`expand_annotations`.
A config field annotated ``ANNOTATION_FORMATS.field`` validates ``{type: NAME, ...}`` against that format's
``Cfg``. See docs/pack_formats.md.
May import: config, errors, registry, storage, data, models.parts. Never Ray, torch, precompute, train, cli.
"""

from . import captions, charades_sta, llava, refcoco, sharegpt, valley, videochatgpt  # noqa: F401  (registered)
from .base import ANNOTATION_FORMATS, AnnotationFormat, FormatCfg, PackError, PackItem, PackRecord
from .reader import (AnnotationFileError, AnnotationsNotFound, expand_annotations, file_kind, raw_records,
                     read_annotations)

__all__ = ["ANNOTATION_FORMATS", "AnnotationFormat", "FormatCfg", "PackError", "PackItem", "PackRecord",
           "AnnotationFileError", "AnnotationsNotFound", "expand_annotations", "file_kind", "raw_records",
           "read_annotations"]
