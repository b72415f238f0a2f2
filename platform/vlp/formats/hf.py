"""Hugging Face exports of a vlp export: ``vlp export --format llava-hf|hf``.

``llava-hf``: where the vlp model maps exactly onto transformers' ``LlavaForConditionalGeneration`` (a CLIP tower at the
configured hidden layer, its patch tokens without CLS, a ``linear`` or ``mlp2x_gelu`` projector, no audio), the export
is that class's checkpoint: its config (``vision_feature_layer``, ``image_token_index`` of the ``<image>`` token,
``vision_feature_select_strategy: default``), the weights under transformers' own names (the model is built by
transformers and each part's state dict loaded into it), the vision tower, a ``LlavaProcessor`` with the features'
preprocessing (crop, padding to a square with the mean colour, mean/std) and the conversation template as a chat
template, checked to give vlp's token ids with this tokenizer.

Exact mapping details: a ``linear`` projector becomes LLaVA's two-layer projector with an identity activation and an
identity second layer (exact in floating point: multiplying by 1 and adding 0); a tokenizer without ``<image>`` gets it
added, with the new embedding and output rows set to the mean of the others, so its logit is the mean of the
others' and greedy decoding never picks it (the original LLaVA conversion script initialises them near the mean too).

May import: torch, transformers, vlp.data, vlp.errors, vlp.formats, vlp.models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data.conversation import TEMPLATES, chat_template_problems
from ..errors import UserError
from ..models.videollm import ModelConfig, VideoLLM
from .export import MODEL_CONFIG, ExportInfo, load_model

IMAGE_TOKEN = "<image>"
FORMATS = ("llava-hf", "vlp-hf", "hf")
LLAVA_POOLERS = ("none", "patch_mean")  # patch tokens of an image (T = 1), CLS dropped, in patch order
LLAVA_PROJECTORS = {"linear": "linear", "mlp2x_gelu": "gelu"}  # connector type -> LLaVA's projector_hidden_act


class HfExportError(UserError):
    """The model cannot be written in the asked Hugging Face format (the line lists why)."""


def export_source(path: str) -> str:
    """A run folder (holding ``export/``) or an export folder -> the export folder."""
    p = Path(path)
    if not (p / MODEL_CONFIG).exists() and (p / "export" / MODEL_CONFIG).exists():
        return str(p / "export")
    return str(p)


def llava_hf_problems(cfg: ModelConfig, info: ExportInfo) -> list[str]:
    """Why the model does not map exactly onto ``LlavaForConditionalGeneration``; [] when it does."""
    out = []
    if cfg.pooler.type not in LLAVA_POOLERS:
        out.append(f"model.pooler.type={cfg.pooler.type} (LLaVA takes an image's patch tokens: pooler none or "
                   "patch_mean)")
    if cfg.connector.type not in LLAVA_PROJECTORS:
        out.append(f"model.connector.type={cfg.connector.type} (LLaVA's projector is linear or mlp2x_gelu)")
    if cfg.audio_hidden_size or info.audio is not None:
        out.append("the model takes audio (LLaVA takes images)")
    if cfg.frame_times != "none":
        out.append(f"model.frame_times={cfg.frame_times}")
    if cfg.tower is not None and cfg.tower.type != "clip":
        out.append(f"model.tower.type={cfg.tower.type} (LLaVA's vision tower here is CLIP)")
    if cfg.tower is None and (info.encoder is None or info.encoder.type != "clip"):
        out.append("the features' encoder is " + (info.encoder.type if info.encoder else "not recorded") +
                   " (LLaVA's vision tower here is CLIP)")
    if info.template is None or TEMPLATES.get(info.template).chat_template is None:
        out.append(f"conversation template {info.template} has no chat template")
    return out


def vision_tower(model: VideoLLM, info: ExportInfo):
    """(CLIPVisionModel, layer, mean, std, crop size, pad_to_square) the model's features come from: its own trained
    tower (``model.tower``) or the feature sets' frozen one."""
    from transformers import CLIPVisionModel

    from ..models.presets import resolve_model_path
    from ..models.towers import tower_mean_std

    if model.tower is not None:
        clip, layer, (mean, std) = model.tower.encoder, model.cfg.tower.layer, (model.tower.mean, model.tower.std)
    else:
        enc, _ = info.media()
        clip = CLIPVisionModel.from_pretrained(resolve_model_path(enc.path), dtype=torch.float32)
        layer, (mean, std) = enc.layer, tower_mean_std(resolve_model_path(enc.path))
    g = info.geometry(clip.config.image_size, mean, std)
    if g.size != clip.config.image_size:
        raise HfExportError(f"the features were cropped to {g.size} px but the tower takes {clip.config.image_size}")
    return clip, layer, g


def with_token(llm, tok, token: str) -> int:
    """The tokenizer's id of ``token``, adding it (and mean-initialised embedding and output rows) if needed."""
    if token in tok.get_vocab():
        return tok.convert_tokens_to_ids(token)
    tok.add_tokens([token], special_tokens=True)
    old = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for w in {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}.values():
            w[old:] = w[:old].mean(0)  # (V_new - V, d) rows = the mean row
    return tok.convert_tokens_to_ids(token)


def projector_state(model: VideoLLM) -> dict[str, torch.Tensor]:
    """The connector's weights under LLaVA's projector names (linear_1, linear_2)."""
    sd = {k: v.detach() for k, v in model.connector.state_dict().items()}
    if model.cfg.connector.type == "mlp2x_gelu":  # Sequential(Linear, GELU, Linear)
        return {"linear_1.weight": sd["0.weight"], "linear_1.bias": sd["0.bias"],
                "linear_2.weight": sd["2.weight"], "linear_2.bias": sd["2.bias"]}
    d = sd["weight"].shape[0]  # (d_model, D)
    return {"linear_1.weight": sd["weight"], "linear_1.bias": sd["bias"],
            "linear_2.weight": torch.eye(d, dtype=sd["weight"].dtype), "linear_2.bias": sd["bias"].new_zeros(d)}


def build_llava(model: VideoLLM, clip, layer: int, image_token: int):
    """A ``LlavaForConditionalGeneration`` holding the vlp model's weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    llm = model.llm
    grid = clip.config.image_size // clip.config.patch_size
    cfg = LlavaConfig(vision_config=clip.config.to_dict(), text_config=llm.config.to_dict(),
                      image_token_index=image_token, image_seq_length=grid * grid, vision_feature_layer=layer,
                      vision_feature_select_strategy="default", multimodal_projector_bias=True,
                      projector_hidden_act=LLAVA_PROJECTORS[model.cfg.connector.type],
                      tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)))
    hf = LlavaForConditionalGeneration(cfg).to(llm.dtype)
    for part, state in ((hf.model.vision_tower, clip.state_dict()), (hf.model.language_model,
                                                                     llm.get_decoder().state_dict()),
                        (hf.lm_head, llm.get_output_embeddings().state_dict()),
                        (hf.model.multi_modal_projector, projector_state(model))):
        part.load_state_dict(state, strict=True)
    return hf.eval()


def processor(tok, clip, geometry, template: str):
    """A ``LlavaProcessor``: the features' preprocessing (PIL image processor), the tokenizer, the chat template."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    s = geometry.size
    images = LlavaImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                    do_pad=geometry.pad_to_square, image_mean=list(geometry.mean),
                                    image_std=list(geometry.std))
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=clip.config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=TEMPLATES.get(template).chat_template)


def export_llava_hf(source: str, out: str, log=print) -> dict[str, Any]:
    """Write the ``llava-hf`` export of the vlp export (or run folder) ``source`` to ``out``. HfExportError (one line)
    when the model does not map exactly or the chat template would tokenise differently."""
    src = export_source(source)
    model, tok, info = load_model(src)
    problems = llava_hf_problems(model.cfg, info)
    if problems:
        raise HfExportError(f"{src} does not map exactly onto LlavaForConditionalGeneration: " + "; ".join(problems) +
                            " (--format vlp-hf or hf writes it with vlp's own modeling code)")
    clip, layer, geom = vision_tower(model, info)
    image_token = with_token(model.llm, tok, IMAGE_TOKEN)
    bad = chat_template_problems(tok, info.prompt_template(src), {image_token})
    if bad:
        raise HfExportError("the chat template would not reproduce vlp's prompts with this tokenizer: " +
                            "; ".join(bad))
    hf = build_llava(model, clip, layer, image_token)
    Path(out).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    proc = processor(tok, clip, geom, info.prompt_template(src))
    proc.save_pretrained(out)
    proc.image_processor.save_pretrained(out)  # preprocessor_config.json too, for readers of transformers 4
    summary = {"format": "llava-hf", "source": src, "out": str(out), "image_token_index": image_token,
               "vision_feature_layer": layer, "image_seq_length": hf.config.image_seq_length,
               "template": info.template}
    log(f"[vlp] export: llava-hf -> {out} (LlavaForConditionalGeneration, {hf.config.image_seq_length} image tokens, "
        f"vision layer {layer}, template {info.template})")
    return summary


def vlp_hf_problems(cfg: ModelConfig, info: ExportInfo) -> list[str]:
    """Why the model cannot be written as a ``vlp-hf`` export (yet); [] when it can."""
    out = []
    if cfg.audio_hidden_size or info.audio is not None:
        out.append("the model takes audio (the vlp-hf export carries a vision tower only, for now)")
    if cfg.tower is not None and cfg.tower.type != "clip":
        out.append(f"model.tower.type={cfg.tower.type} (the vlp-hf export carries a CLIP tower)")
    if cfg.tower is None and (info.encoder is None or info.encoder.type != "clip"):
        out.append("the features' encoder is " + (info.encoder.type if info.encoder else "not recorded"))
    if info.template is None or TEMPLATES.get(info.template).chat_template is None:
        out.append(f"conversation template {info.template} has no chat template")
    return out


def remote_config(model: VideoLLM, info: ExportInfo, clip, layer: int, geom, ids: dict[str, int]):
    """The export's VlpConfig: the model config without paths, the media info with the resolved preprocessing."""
    from .. import __version__
    from .hf_modeling import VlpConfig

    m = model.cfg.model_dump(mode="json")
    m["llm"] = {**m["llm"], "path": "vlp/exported-llm", "tokenizer": None, "init_from": None}  # weights are inline
    m["connector"] = {**m["connector"], "init_from": None}
    media = {"template": info.template, "sampling": info.sampling, "vlp_version": __version__,
             "preprocess": {"size": geom.size, "pad_to_square": geom.pad_to_square, "mean": list(geom.mean),
                            "std": list(geom.std)}}
    return VlpConfig(vlp_model=m, vlp_info=media, llm_config=model.llm.config.to_dict(),
                     tower_config=clip.config.to_dict(), placeholder_ids=ids, vision_layer=layer,
                     architectures=["VlpForCausalLM"])


def export_vlp_hf(source: str, out: str, log=print) -> dict[str, Any]:
    """Write the ``vlp-hf`` export (remote code, vlp's parts) of ``source`` to ``out``."""
    from .hf_modeling import VlpConfig, VlpForCausalLM

    src = export_source(source)
    model, tok, info = load_model(src)
    problems = vlp_hf_problems(model.cfg, info)
    if problems:
        raise HfExportError(f"{src} cannot be written as a vlp-hf export: " + "; ".join(problems))
    clip, layer, geom = vision_tower(model, info)
    ids = {m: with_token(model.llm, tok, f"<{m}>") for m in ("image", "video")}
    bad = chat_template_problems(tok, info.prompt_template(src), set(ids.values()))
    if bad:
        raise HfExportError("the chat template would not reproduce vlp's prompts with this tokenizer: " +
                            "; ".join(bad))
    hf = VlpForCausalLM(remote_config(model, info, clip, layer, geom, ids))
    for part, state in ((hf.vlp.llm, model.llm.state_dict()), (hf.vlp.connector, model.connector.state_dict()),
                        (hf.vision_tower, clip.state_dict())):
        part.load_state_dict(state, strict=True)
    VlpConfig.register_for_auto_class()
    VlpForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    Path(out).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)  # + the modeling file, named in auto_map
    tok.chat_template = TEMPLATES.get(info.prompt_template(src)).chat_template
    tok.save_pretrained(out)
    log(f"[vlp] export: vlp-hf -> {out} (AutoModelForCausalLM with trust_remote_code; pooler {model.cfg.pooler.type}, "
        f"connector {model.cfg.connector.type}, template {info.template})")
    return {"format": "vlp-hf", "source": src, "out": str(out), "placeholder_ids": ids, "template": info.template}


def export_hf(source: str, out: str, fmt: str = "hf", log=print) -> dict[str, Any]:
    """``--format llava-hf``, ``vlp-hf`` or ``hf``: llava-hf where the model maps exactly onto LLaVA, else vlp-hf."""
    if fmt not in FORMATS:
        raise HfExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "hf":
        info = ExportInfo.read(export_source(source))
        fmt = "vlp-hf" if llava_hf_problems(info.model_cfg(source), info) else "llava-hf"
    return export_llava_hf(source, out, log) if fmt == "llava-hf" else export_vlp_hf(source, out, log)
