"""Hugging Face remote code of ``vlp export --format vlp-hf``: a vlp model (any pooler and connector vlp has, images and
videos) as ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

``vlp export`` writes this file into the export folder (``save_pretrained`` copies it and names it in ``auto_map``).
The model's parts are vlp's own code, so loading needs the ``vlp`` package installed (the version that wrote the
export or a newer one); the weights (vision tower, connector, LLM) are all in the folder. Inputs: the chat template's
text, whose ``<image>``/``<video>`` tokens each stand for one media item, and per sample a list of items, each
``(T, 3, S, S)`` pixels normalised as the features were (``VlpForCausalLM.pixels`` reads a file the way vlp's
precompute did: the recorded frame sampling, crop, padding and mean/std).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutputWithPast

Items = Optional[Sequence[Optional[Sequence[torch.Tensor]]]]  # per sample: None or a list of (T, 3, S, S)


class VlpConfig(PretrainedConfig):
    """``vlp_model``: vlp's ModelConfig (its JSON); ``vlp_info``: the export's media info (encoder, sampling,
    preprocess, template); ``llm_config``/``tower_config``: the LLM's and the CLIP tower's configs;
    ``placeholder_ids``: modality -> the tokenizer's id of its placeholder token."""

    model_type = "vlp_videollm"

    def __init__(self, vlp_model: Optional[dict] = None, vlp_info: Optional[dict] = None,
                 llm_config: Optional[dict] = None, tower_config: Optional[dict] = None,
                 placeholder_ids: Optional[dict] = None, vision_layer: int = -2, **kwargs):
        self.vlp_model, self.vlp_info = vlp_model or {}, vlp_info or {}
        self.llm_config, self.tower_config = llm_config or {}, tower_config or {}
        self.placeholder_ids, self.vision_layer = placeholder_ids or {}, vision_layer
        super().__init__(**kwargs)


class VlpForCausalLM(PreTrainedModel):
    config_class = VlpConfig
    base_model_prefix = "vlp"

    def __init__(self, config: VlpConfig):
        super().__init__(config)
        try:
            from vlp.models.videollm import ModelConfig, VideoLLM
        except ImportError as e:
            raise ImportError("this export's parts are vlp's code: pip install vlp (the version that wrote it, "
                              f"{config.vlp_info.get('vlp_version', 'unknown')}, or newer)") from e
        text = dict(config.llm_config)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
        self.vision_tower = CLIPVisionModel(CLIPVisionConfig(**config.tower_config))
        cfg = ModelConfig.model_validate({**config.vlp_model, "tower": None})
        if cfg.frame_times != "none":  # the frame-time marks are tokenised with the export's own tokenizer
            cfg.llm.tokenizer = config.name_or_path
        self.vlp = VideoLLM(cfg, llm=llm)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint
        pass

    def get_input_embeddings(self):
        return self.vlp.llm.get_input_embeddings()

    def item_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) normalised pixels -> (T, 1 + P, D) the tower's hidden state the model was trained on."""
        w = next(self.vision_tower.parameters())
        out = self.vision_tower(pixel_values=pixels.to(w.device, w.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.vision_layer].float()

    def spliced(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], items: Items):
        """Each sample's ids (its mask's ones) with each placeholder token replaced by its item's tokens -> the
        embeddings, one (L_i, d) tensor per sample."""
        from vlp.data.conversation import VISUAL_TOKEN_INDEX

        marks = {int(i): m for m, i in self.config.placeholder_ids.items()}
        out = []
        for b, row in enumerate(input_ids):
            ids = row[attention_mask[b].bool()] if attention_mask is not None else row  # (L_b,)
            mods = [marks[int(t)] for t in ids if int(t) in marks]
            ids = torch.tensor([VISUAL_TOKEN_INDEX if int(t) in marks else int(t) for t in ids], device=row.device)
            its = list(items[b] or []) if items is not None else []
            feats = [self.item_features(x) for x in its]  # each (T, 1 + P, D)
            vis = self.vlp.sample_visuals(feats or None, "frames", [int(f.shape[0]) for f in feats], b, mods or None)
            embeds, _, _ = self.vlp.build_inputs([ids], None, [vis])  # (1, L_b', d)
            out.append(embeds[0])
        return out

    def padded(self, seqs: list[torch.Tensor], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_i, d) sequences -> (B, L, d) embeddings and (B, L) mask, padded on the left (generation) or right."""
        L = max(s.shape[0] for s in seqs)
        embeds = seqs[0].new_zeros(len(seqs), L, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=seqs[0].device)
        for i, s in enumerate(seqs):
            sl = slice(L - s.shape[0], L) if left else slice(0, s.shape[0])
            embeds[i, sl], mask[i, sl] = s, 1
        return embeds, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Items = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of right-padded samples: (B, L', V), L' the longest sample after its items' tokens are spliced."""
        embeds, mask = self.padded(self.spliced(input_ids, attention_mask, pixel_values), left=False)
        return self.vlp.llm(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Items = None, **kwargs) -> torch.Tensor:
        """The LLM's own ``generate`` on the left-padded spliced embeddings: (B, new tokens)."""
        embeds, mask = self.padded(self.spliced(input_ids, attention_mask, pixel_values), left=True)
        return self.vlp.llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def pixels(self, path: str) -> tuple[str, torch.Tensor]:
        """A video or image file -> (its modality, (T, 3, S, S) normalised pixels), sampled, resized, padded and
        normalised as the model's features were."""
        from vlp.data.media import DecodeConfig, SamplingConfig, decode_media
        from vlp.data.preprocess import normalize, resize_crop

        info, pp = self.config.vlp_info, self.config.vlp_info.get("preprocess") or {}
        with open(path, "rb") as f:
            kind, dec = decode_media(f.read(), path.rsplit(".", 1)[-1], SamplingConfig(**info["sampling"]),
                                     DecodeConfig())
        x = resize_crop(dec.frames, pp["size"], pp["pad_to_square"], tuple(pp["mean"]))  # (T, 3, S, S) uint8
        return kind, normalize(x, tuple(pp["mean"]), tuple(pp["std"]))
