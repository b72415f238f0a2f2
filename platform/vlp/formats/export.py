"""The export format: a trained VideoLLM (HF LLM + connector safetensors + tokenizer) and ``vlp_model.json``, its
typed :class:`ExportInfo`; writer and loader. May import: config, errors, storage, data, models, formats.

Layout of an export folder::

    llm/                    save_pretrained of the causal LM (LoRA merged)
    connector.safetensors   the connector's weights
    tower/                  the vision tower, when the model runs one (``model.tower``: trained on pixel rows),
                            save_pretrained with its preprocessor config (precompute can encode with it)
    tokenizer/              save_pretrained of the tokenizer
    vlp_model.json          ExportInfo: format, model config, template, and the feature set's encoder, sampling and
                            preprocess (what chat and infer reproduce)

``vlp_model.json`` carries ``"format": "vlp-export/1"`` (:data:`EXPORT_FORMAT`); an export without it (written
before formats were versioned) loads as that layout, a newer or unknown one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from ..errors import NotAnExport, not_an_export  # noqa: F401  (NotAnExport: part of this API)
from ..models.videollm import ModelConfig, VideoLLM
from ..storage import get_fs, join, localize, read_bytes, write_atomic
from .featureset import AudioEncoderInfo, EncoderInfo, Fingerprint, PreprocessInfo
from .records import Record, RecordError, format_problem, parse_json

if TYPE_CHECKING:
    from ..data.media import SamplingConfig

MODEL_CONFIG = "vlp_model.json"
EXPORT_FORMAT = "vlp-export/1"


class ExportFormatError(RecordError):
    """An export written in a format this vlp does not read, or one that lacks what a command needs."""


class ExportInfo(Record):
    """``vlp_model.json``. ``model`` is the ModelConfig (paths pointing into the export); the rest is copied from
    the first feature set's fingerprint at training time (:meth:`from_fingerprint`)."""

    format: Optional[str] = None  # absent: written before formats were versioned (the vlp-export/1 layout)
    model: Optional[dict[str, Any]] = None
    template: Optional[str] = None  # the conversation template; chat, infer and eval need it
    feature_mode: Optional[str] = None
    encoder: Optional[EncoderInfo] = None
    audio: Optional[AudioEncoderInfo] = None  # the audio tower and cuts audio items need (absent: no audio)
    sampling: Optional[dict[str, Any]] = None
    preprocess: Optional[PreprocessInfo] = None
    run: Optional[str] = None

    @classmethod
    def from_fingerprint(cls, fp: Fingerprint, template: str, run: Optional[str] = None,
                         audio: Optional[AudioEncoderInfo] = None) -> "ExportInfo":
        """What training records of its features: the first set's encoder, sampling and preprocess, and the
        audio tower of the first set that had one."""
        return cls(template=template, feature_mode=fp.mode, encoder=fp.encoder, sampling=fp.sampling,
                   preprocess=fp.preprocess, run=run, **({"audio": audio} if audio else {}))

    @classmethod
    def read(cls, path: str | Path) -> "ExportInfo":
        """The info of the export at ``path`` (local or a URL). Raises NotAnExport (missing folder, no
        vlp_model.json) or ExportFormatError (newer/unknown format, invalid file)."""
        path = str(path)
        source = join(path, MODEL_CONFIG)
        data = read_bytes(source)
        if data is None:
            fs, root = get_fs(path)
            raise not_an_export(path, fs.exists(root))
        obj = parse_json(data, source)
        problem = format_problem(obj.get("format") if isinstance(obj, dict) else None, EXPORT_FORMAT)
        if problem:
            raise ExportFormatError(f"export {path}: {problem}; load it with the vlp version that wrote it "
                                    "(or a newer one), or train and export it again with this one")
        return cls.from_json(obj, source)

    def write(self, out: str | Path) -> None:
        """Write ``out/vlp_model.json`` atomically, stamped with the current format."""
        write_atomic(join(str(out), MODEL_CONFIG), self.model_copy(update={"format": EXPORT_FORMAT}).to_bytes())

    def model_cfg(self, source: str, folder: Optional[Path] = None) -> ModelConfig:
        """The model config; with ``folder`` (the export's own folder), its weights read from there and not from the
        paths it was written at: an export moved, copied or uploaded from a temporary folder loads as well."""
        from ..config import validate

        if self.model is None:
            raise ExportFormatError(f"{source} records no model config")
        m = json.loads(json.dumps(self.model))
        if folder is not None:
            m["llm"] = {**m.get("llm", {}), "path": str(folder / "llm"), "tokenizer": str(folder / "tokenizer"),
                        "init_from": None}
            m["connector"] = {**m.get("connector", {}), "init_from": str(folder / "connector.safetensors")}
            if m.get("tower") and (folder / "tower").is_dir():
                m["tower"] = {**m["tower"], "path": str(folder / "tower"), "init_from": None}
        return validate(ModelConfig, m, source)

    def prompt_template(self, source: str = "the export") -> str:
        if self.template is None:
            raise ExportFormatError(f"{source} records no conversation template (not written by `vlp train`)")
        return self.template

    def media(self, source: str = "the export") -> tuple[EncoderInfo, SamplingConfig]:
        """(encoder, sampling) chat and infer decode and encode media with; ExportFormatError when not recorded
        (an export not written by ``vlp train``)."""
        from ..data.media import SamplingConfig

        if self.encoder is None or self.sampling is None:
            raise ExportFormatError(f"{source} records no encoder/sampling of its features (not written by "
                                    "`vlp train`); chat and infer need them")
        return self.encoder, SamplingConfig(**self.sampling)

    def geometry(self, image_size: int, tower_mean, tower_std):
        """data.preprocess.Geometry: crop size, padding and mean/std the features were made with (the tower's
        own ``image_size``/``tower_*`` fill what the export does not record)."""
        from ..data.preprocess import model_geometry

        pp = {"preprocess": self.preprocess.to_json() if self.preprocess is not None else None}
        return model_geometry(pp, image_size, tower_mean, tower_std)


def export_model(model: VideoLLM, tokenizer, out: str | Path,
                 extra: Union[ExportInfo, dict, None] = None) -> Path:
    """Write ``out/llm`` (save_pretrained, LoRA merged), ``out/connector.safetensors``, ``out/tokenizer``,
    ``out/tower`` (a model with ``model.tower``) and ``out/vlp_model.json``: ``extra`` (an ExportInfo or its JSON: template, feature mode, encoder...) with the
    model config and the format version filled in."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    llm = model.llm
    if hasattr(llm, "merge_and_unload") and type(llm).__module__.startswith("peft"):
        llm = llm.merge_and_unload()
    llm.save_pretrained(out / "llm", safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.connector.state_dict().items()},
              str(out / "connector.safetensors"))
    tokenizer.save_pretrained(out / "tokenizer")
    cfg = model.cfg.model_copy(deep=True)
    if model.tower is not None:
        model.tower.save(str(out / "tower"))
        cfg.tower = cfg.tower.model_copy(update={"path": str(out / "tower"), "init_from": None, "trainable": False,
                                                 "mean": model.tower.mean, "std": model.tower.std})
    cfg.llm.path = str(out / "llm")
    cfg.llm.tokenizer = str(out / "tokenizer")
    cfg.llm.init_from = None
    cfg.llm.trainable = False
    cfg.connector.init_from = str(out / "connector.safetensors")
    info = extra if isinstance(extra, ExportInfo) else ExportInfo.from_json(extra or {}, "export_model(extra=...)")
    info.model_copy(update={"model": cfg.model_dump(mode="json")}).write(out)
    return out


def connector_weights_path(path: str) -> Path:
    """``model.connector.init_from`` -> its connector.safetensors (an export folder holds one); on S3 that file alone
    is fetched into the node's cache (StorageError when it is not there)."""
    if "://" in path:
        return Path(localize(path if path.endswith(".safetensors") else join(path, "connector.safetensors")))
    p = Path(path)
    return p / "connector.safetensors" if p.is_dir() else p


def connector_fit_problems(connector: torch.nn.Module, path: str) -> list[str]:
    """Why the weights at ``path`` (init_from) do not fit ``connector`` (a meta-device build is enough: only names
    and shapes are compared, read from the safetensors header without loading): e.g. a stage-1 perceiver made
    without audio features, whose audio input projection has the vision width. [] when they fit."""
    from safetensors import safe_open

    p = connector_weights_path(path)
    if not p.is_file():
        return [f"model.connector.init_from: no connector weights at {p}"]
    with safe_open(str(p), "pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = {k: tuple(v.shape) for k, v in connector.state_dict().items()}
    bad = [f"{k} {have[k]} vs {want[k]}" for k in want if k in have and have[k] != want[k]]
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if not (bad or missing or unexpected):
        return []
    return [f"model.connector.init_from: the weights at {p} do not fit this connector (" + "; ".join(filter(None, [
        bad and "other shapes: " + ", ".join(bad[:4]), missing and f"missing: {missing[:4]}",
        unexpected and f"unexpected: {unexpected[:4]}"])) + "); check model.connector, the feature widths "
        "(vision/audio_hidden_size) and the modalities the earlier stage was trained with"]


def load_connector(connector: torch.nn.Module, path: str) -> None:
    """Load connector weights from a safetensors file or an export folder (stage 1 -> stage 2)."""
    from safetensors.torch import load_file

    p = connector_weights_path(path)
    if not p.exists():
        raise FileNotFoundError(f"connector weights not found at {p} (point model.connector.init_from at a stage-1 "
                                "export folder or its connector.safetensors)")
    state = load_file(str(p))
    missing, unexpected = connector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"connector weights at {p} do not fit this connector (missing {missing}, unexpected "
                         f"{unexpected}); check model.connector.type and vision_hidden_size")


def load_model(path: str | Path, device: str = "cpu") -> tuple[VideoLLM, Any, ExportInfo]:
    """-> (VideoLLM in eval mode, tokenizer, ExportInfo) from an export folder. Raises NotAnExport /
    ExportFormatError (UserErrors) for a missing folder, a folder that is no export, or a newer format."""
    from transformers import AutoTokenizer

    if "://" in str(path) and read_bytes(join(str(path), MODEL_CONFIG)) is None:
        ExportInfo.read(path)  # NotAnExport, before anything is fetched
    path = Path(localize(str(path)))  # an export on S3: fetched once into the node's cache
    info = ExportInfo.read(path)
    cfg = info.model_cfg(str(path / MODEL_CONFIG), folder=path)
    model = VideoLLM(cfg)
    load_connector(model.connector, cfg.connector.init_from)
    tok = AutoTokenizer.from_pretrained(cfg.llm.tokenizer_source())
    return model.to(device).eval(), tok, info


def probe_logits(model: VideoLLM, probe: dict) -> torch.Tensor:
    """Logits at the last position for a fixed probe: ``probe["input_ids"]`` (a tokenised training row) with
    features drawn from a seeded generator, one block per item of ``probe["shape"]`` (a list of shapes, one per
    item, [] for a text-only row; a probe written before samples had several items holds one shape) with
    ``num_frames`` (a list, or one number for such an old probe), ``modalities`` (a list; absent from probes
    written before connectors were told them: each item's from its T) and mode. Eval mode, no grad; the model's
    train/eval state is restored. Under ZeRO-3 every rank must call this (the forward gathers weights). Used to
    check that an export reloads to the model that was trained (train_summary.json ``probe``)."""
    was_training = model.training
    model.eval()
    try:
        w = next(model.connector.parameters())
        g = torch.Generator().manual_seed(int(probe.get("seed", 0)))
        shapes, nfs = probe["shape"], probe["num_frames"]
        if shapes and not isinstance(shapes[0], (list, tuple)):  # an old probe: one item
            shapes, nfs = [shapes], [nfs]
        if probe["mode"] == "pixels":  # (T, 3, S, S) frames, 0..255
            feats = [torch.randint(0, 256, tuple(s), generator=g).to(w.device, w.dtype) for s in shapes]
        else:
            feats = [torch.randn(tuple(s), generator=g).to(w.device, w.dtype) for s in shapes]  # (T+P, D), (T, P+1, D)
        ids = torch.as_tensor(probe["input_ids"], dtype=torch.long)
        with torch.no_grad():
            out = model([ids], None, [feats or None], [probe["mode"]], [[int(t) for t in nfs]],
                        [probe.get("modalities")])
        return out.logits[0, -1, :1024].float().cpu()  # (V,) capped
    finally:
        model.train(was_training)
