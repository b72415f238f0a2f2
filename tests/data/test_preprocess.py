"""Batched CLIP preprocessing matches transformers' CLIPImageProcessor within a stated tolerance.

Tolerance (normalised units, where one uint8 level is ~0.0146): mean |diff| <= 0.01 and 99.5% of
values within 0.03 (~2 levels), and on CPU (torch's uint8 resampler, which works like PIL's: two
separable fixed-point passes) no value more than 2 levels off. The float path (used on devices without
a uint8 kernel) differs more on sharp edges: it is checked against the same mean/p99.5 bounds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED_MEDIA
from vlp.data.preprocess import clip_preprocess, resize_output_size

MEAN_TOL, P995_TOL = 0.01, 0.03
MAX_TOL = 2 * 0.0146 / 0.2613 + 1e-4  # two uint8 levels in the smallest-std channel


def _processor():
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})


def _photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A made image with photo-like statistics: smooth gradients, edges, texture and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 100 * np.sin(6 * xx + 2 * yy), 90 + 80 * np.cos(9 * yy), 60 + 150 * xx * yy], -1)
    img[h // 3: h // 2, w // 4: w // 2] = (230, 40, 30)  # a sharp-edged object
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _compare(img: np.ndarray, pad: bool = False):
    proc = _processor()
    pil = Image.fromarray(img)
    if pad:  # LLaVA-1.5's expand2square with the mean colour
        w, h = pil.size
        s = max(w, h)
        bg = Image.new("RGB", (s, s), tuple(int(x * 255) for x in proc.image_mean))
        bg.paste(pil, ((s - w) // 2, (s - h) // 2))
        pil = bg
    ref = proc(images=pil, return_tensors="np")["pixel_values"][0]
    ours = clip_preprocess(img[None], 224, pad_square=pad)[0].numpy()
    assert ours.shape == ref.shape == (3, 224, 224)
    d = np.abs(ref - ours)
    assert d.max() <= MAX_TOL, f"max |diff| {d.max():.4f} > {MAX_TOL:.4f} (more than 2 uint8 levels)"
    return float(d.mean()), float(np.quantile(d, 0.995))


@pytest.mark.parametrize("h,w", [(480, 640), (336, 596), (150, 260), (97, 65), (224, 224), (1000, 300)])
def test_matches_clip_image_processor_on_made_images(h, w):
    mean, p995 = _compare(_photo_like(h, w, seed=h + w))
    assert mean <= MEAN_TOL and p995 <= P995_TOL, (mean, p995)


def test_matches_clip_image_processor_on_sharp_edges():
    """Black/white stripes and text-like strokes: where bicubic overshoot makes resamplers differ most."""
    img = np.zeros((300, 533, 3), np.uint8)
    img[:, ::7] = 255
    img[100:140, 50:480:3] = (255, 255, 0)
    mean, p995 = _compare(img)
    assert mean <= MEAN_TOL and p995 <= P995_TOL, (mean, p995)


def test_pad_to_square_matches_llava_expand2square():
    mean, p995 = _compare(_photo_like(300, 500), pad=True)
    assert mean <= MEAN_TOL and p995 <= P995_TOL, (mean, p995)


@pytest.mark.skipif(not SHARED_MEDIA.exists(), reason="../shared/media not present (optional realism check)")
@pytest.mark.parametrize("name", ["1.jpg", "2.jpg", "3.jpg"])
def test_matches_clip_image_processor_on_real_photos(name):
    img = np.asarray(Image.open(SHARED_MEDIA / name).convert("RGB"))
    mean, p995 = _compare(img)
    assert mean <= MEAN_TOL and p995 <= P995_TOL, (mean, p995)
    mean, p995 = _compare(img, pad=True)
    assert mean <= MEAN_TOL and p995 <= P995_TOL, (mean, p995)


def test_float_path_stays_close_to_the_uint8_path():
    """Devices without a uint8 resampler take the float path; it must agree with the CPU one."""
    from vlp.data.preprocess import _resize_bicubic_aa

    x = torch.from_numpy(_photo_like(336, 596, seed=3)[None]).permute(0, 3, 1, 2)  # (1, 3, H, W) uint8
    u8 = _resize_bicubic_aa(x, 224, 397).int()
    f = _resize_bicubic_aa(x.float(), 224, 397).int()  # float input -> float path
    d = (u8 - f).abs().float()
    assert u8.shape == f.shape == (1, 3, 224, 397)
    assert d.mean() <= 0.5 and torch.quantile(d.flatten(), 0.995) <= 2, (d.mean(), d.max())


def test_batched_equals_per_frame():
    frames = np.stack([_photo_like(200, 300, s) for s in range(4)])
    batched = clip_preprocess(frames, 224)
    single = torch.cat([clip_preprocess(f[None], 224) for f in frames])
    assert torch.equal(batched, single)


def test_resize_rule_matches_transformers():
    from transformers.image_transforms import get_resize_output_image_size

    for h, w in [(480, 640), (640, 480), (97, 65), (224, 1000), (225, 224)]:
        ref = get_resize_output_image_size(np.zeros((h, w, 3)), size=224, default_to_square=False)
        assert resize_output_size(h, w, 224) == tuple(ref)


def test_bad_frame_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        clip_preprocess(np.zeros((2, 3, 64, 64), np.uint8))


def test_normalize_equals_the_plain_formula_and_leaves_its_input_alone():
    """normalize works in place on one float copy: same values as ((x / 255 - mean) / std), bit for bit, for
    uint8 and float input, and never writes into the caller's tensor (x.float() of a float tensor is x)."""
    from vlp.data.preprocess import normalize

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    for x in (u8, u8.float()):
        before = x.clone()
        got = normalize(x, mean, std)
        assert got.dtype == torch.float32
        assert torch.equal(got, (x.float() / 255.0 - m) / s)
        assert torch.equal(x, before)
    assert normalize(u8, mean, std, torch.bfloat16).dtype == torch.bfloat16
