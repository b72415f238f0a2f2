"""Tiny, locally built models: the same load path as real checkpoints, no downloads.

``preset:tiny-clip`` / ``preset:tiny-clip-synth`` / ``preset:tiny-llama`` / ``preset:tiny-tokenizer`` /
``preset:tiny-ast`` / ``preset:tiny-ast-synth`` resolve to
folders under the vlp cache (``$VLP_CACHE``, default ``~/.cache/vlp``), built deterministically on first use with
``save_pretrained`` and then always loaded through ``from_pretrained``, exactly like
``openai/clip-vit-large-patch14`` or a Vicuna checkpoint would be.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from ..registry import Registry
from ..storage import cache_dir as storage_cache_dir

PRESETS: Registry[Callable[[Path], None]] = Registry("model preset")

CHAT_SPECIAL_TOKENS = ["<image>", "<video>", "<|im_start|>", "<|im_end|>"]
# Bump a preset's version whenever its builder can produce different weights: the cache folder is named
# after it, so an old build is never reused for a new recipe.
PRESET_VERSIONS = {"tiny-clip-synth": 2, "tiny-ast-synth": 2}  # 2: built on one thread (one_thread)


def cache_dir() -> Path:
    return Path(storage_cache_dir())


def looks_local(path: str) -> bool:
    """The rule for model paths: local (so it must exist) when absolute, starting with ./ ../ or ~, or holding
    more than one '/'; a hub id is exactly ``org/name`` (one '/'), ``preset:NAME`` and URLs are not local."""
    if path.startswith("preset:") or "://" in path:
        return False
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..") or path.count("/") > 1


def check_model_path(path: Optional[str]) -> Optional[str]:
    """Validator: a local model path (:func:`looks_local`) must exist, so a typo fails with the config, before
    Ray starts, instead of as a hub download error inside every training worker."""
    if path is not None and looks_local(path) and not os.path.exists(os.path.expanduser(path)):
        raise ValueError(f"no such folder: {path} (a local path: absolute, ./, ../, ~ or more than one '/'; "
                         "hub ids are org/name, presets preset:NAME)")
    return path


def resolve_model_path(path: str) -> str:
    """``preset:NAME`` -> a local folder (built if missing); anything else is returned unchanged."""
    if not path.startswith("preset:"):
        return path
    name = path.split(":", 1)[1]
    builder = PRESETS.get(name)
    version = PRESET_VERSIONS.get(name)
    target = cache_dir() / "presets" / (name if version is None else f"{name}.v{version}")
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        one_thread(builder, tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / ".complete").exists():  # a half-built folder from a killed process
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def one_thread(build: Callable[[Path], None], out: Path) -> None:
    """``build(out)`` with torch on one intra-op thread, then the caller's count back: the synthetic towers train
    for a few hundred steps, and float sums split over another number of threads round differently, so a preset
    built in a 1-thread process (a Ray worker, a decode process) would not be the one built in a 2-thread one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(out)
    finally:
        torch.set_num_threads(before)


def _corpus() -> list[str]:
    from ..synth.shards import vocabulary_corpus

    return vocabulary_corpus()


@PRESETS.register("tiny-tokenizer")
def build_tiny_tokenizer(out: Path) -> None:
    """Byte-level BPE trained on the synthetic captions/Q&A vocabulary, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, min_frequency=1,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", *CHAT_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=CHAT_SPECIAL_TOKENS)
    fast.save_pretrained(out)


@PRESETS.register("tiny-clip")
def build_tiny_clip(out: Path, image_size: int = 224) -> None:
    """CLIP ViT with the real geometry (224 px, patch 14 -> 256 patches + CLS) but 2 layers of width 64."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=14, projection_dim=64)
    CLIPVisionModel(cfg).save_pretrained(out)
    _write_preprocessor_config(out, image_size)


@PRESETS.register("tiny-clip-synth")
def build_tiny_clip_synth(out: Path) -> None:
    """``tiny-clip`` at 112 px (patch 14 -> 64 patches + CLS, so T + 64 Valley tokens) trained ~20-40 s on single
    synthetic frames so that its CLS tokens know colour, shape and position: the demo's stand-in for a
    pretrained CLIP (see vlp.synth.tower). The smaller grid makes the demo's sequences ~3x shorter, which
    is what lets stage 2 run enough steps in the demo's budget. Build stats in pretraining.json."""
    import json

    from transformers import CLIPVisionModel

    from ..synth.tower import pretrain_on_stills

    build_tiny_clip(out, image_size=112)
    model = CLIPVisionModel.from_pretrained(out)
    stats = pretrain_on_stills(model, log=print)
    model.save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps(stats, indent=2))


@PRESETS.register("tiny-llama")
def build_tiny_llama(out: Path) -> None:
    """LLaMA-family causal LM, 2 layers of width 64, sized to the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_path("preset:tiny-tokenizer"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


@PRESETS.register("tiny-ast")
def build_tiny_ast(out: Path) -> None:
    """Audio Spectrogram Transformer with AST's input geometry (128 mel bins x 1024 frames of 10 ms, patch 16,
    strides 10 -> 12 x 101 patches + CLS + distillation token) but 2 layers of width 64, and the AST feature
    extractor (Kaldi fbank, AudioSet mean/std): the audio tower's local stand-in (vlp.data.audio makes its
    inputs)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_mel_bins=128, max_length=1024, patch_size=16, frequency_stride=10, time_stride=10)
    ASTModel(cfg).save_pretrained(out)
    import warnings

    with warnings.catch_warnings():  # AST's 128 mel bins over a 400-sample window leave one filter empty, by design
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        ASTFeatureExtractor(num_mel_bins=128, max_length=1024).save_pretrained(out)


@PRESETS.register("tiny-ast-synth")
def build_tiny_ast_synth(out: Path) -> None:
    """``tiny-ast`` cut to the synthetic world's short sounds (64 mel bins x 128 frames: 1.28 s, so
    ``data.audio.segment_seconds: 1.28``; 5 x 12 patches + 2 = 62 tokens per segment), trained ~15 s on random
    tones so that its CLS token knows pitch (vlp.synth.sound_tower): the demo's stand-in for a pretrained audio
    tower. Build stats in pretraining.json."""
    import json
    import warnings

    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    from ..synth.sound_tower import pretrain_on_tones

    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                    num_mel_bins=64, max_length=128, patch_size=16, frequency_stride=10, time_stride=10)
    model = ASTModel(cfg)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        extractor = ASTFeatureExtractor(num_mel_bins=64, max_length=128)
    stats = pretrain_on_tones(model, extractor, log=print)
    model.save_pretrained(out)
    extractor.save_pretrained(out)
    (out / "pretraining.json").write_text(json.dumps(stats, indent=2))


def _write_preprocessor_config(out: Path, size: int) -> None:
    import json

    from ..data.preprocess import CLIP_MEAN, CLIP_STD

    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }, indent=2))
