"""Export a trained VideoLLM (HF LLM + connector safetensors + tokenizer + vlp config) and load it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..models.videollm import ModelConfig, VideoLLM

MODEL_CONFIG = "vlp_model.json"


def export_model(model: VideoLLM, tokenizer, out: str | Path, extra: Optional[dict] = None) -> Path:
    """Write ``out/llm`` (save_pretrained, LoRA merged), ``out/connector.safetensors``, ``out/tokenizer``
    and ``out/vlp_model.json`` (the model config plus what inference needs: template, feature mode...)."""
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
    cfg.llm.path = str(out / "llm")
    cfg.llm.tokenizer = str(out / "tokenizer")
    cfg.llm.trainable = False
    cfg.connector.init_from = str(out / "connector.safetensors")
    (out / MODEL_CONFIG).write_text(json.dumps({"model": cfg.model_dump(mode="json"), **(extra or {})}, indent=2))
    return out


def load_connector(connector: torch.nn.Module, path: str) -> None:
    """Load connector weights from a safetensors file or an export folder (stage 1 -> stage 2)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "connector.safetensors"
    if not p.exists():
        raise FileNotFoundError(f"connector weights not found at {p} (point model.connector.init_from at a stage-1 "
                                "export folder or its connector.safetensors)")
    state = load_file(str(p))
    missing, unexpected = connector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"connector weights at {p} do not fit this connector (missing {missing}, unexpected "
                         f"{unexpected}); check model.connector.type and vision_hidden_size")


def load_model(path: str | Path, device: str = "cpu"):
    """-> (VideoLLM in eval mode, tokenizer, info dict) from an export folder."""
    from transformers import AutoTokenizer

    from ..config import validate
    from ..errors import not_an_export

    path = Path(path)
    if not (path / MODEL_CONFIG).is_file():
        raise not_an_export(str(path), path.exists())
    info = json.loads((path / MODEL_CONFIG).read_text())
    cfg = validate(ModelConfig, info["model"], str(path / MODEL_CONFIG))
    model = VideoLLM(cfg)
    load_connector(model.connector, cfg.connector.init_from)
    tok = AutoTokenizer.from_pretrained(cfg.llm.tokenizer)
    return model.to(device).eval(), tok, info


def probe_logits(model: VideoLLM, probe: dict) -> torch.Tensor:
    """Logits at the last position for a fixed probe: ``probe["input_ids"]`` (a tokenised training row) with
    features drawn from a seeded generator of ``probe["shape"]`` (+ mode, num_frames). Eval mode, no grad; the
    model's train/eval state is restored. Under ZeRO-3 every rank must call this (the forward gathers weights).
    Used to check that an export reloads to the model that was trained (train_summary.json ``probe``)."""
    was_training = model.training
    model.eval()
    try:
        w = next(model.connector.parameters())
        g = torch.Generator().manual_seed(int(probe.get("seed", 0)))
        feats = torch.randn(tuple(probe["shape"]), generator=g).to(w.device, w.dtype)  # (T+P, D) or (T, P+1, D)
        ids = torch.as_tensor(probe["input_ids"], dtype=torch.long)
        with torch.no_grad():
            out = model([ids], None, [feats], [probe["mode"]], [int(probe["num_frames"])])
        return out.logits[0, -1, :1024].float().cpu()  # (V,) capped
    finally:
        model.train(was_training)
