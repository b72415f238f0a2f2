"""A tiny CLIP tower that has *seen* the synthetic world: the demo's stand-in for a pretrained CLIP.

A real CLIP ViT-L/14 arrives knowing colours, shapes and where things are in the picture; a randomly
initialised tiny one knows none of it (its per-frame CLS tokens carry almost no position, so no pooler can
show what Valley's temporal CLS tokens buy). ``preset:tiny-clip-synth`` therefore trains the tiny tower
for 600 steps (~20-40 s on 2 CPU cores) on single synthetic frames: linear heads on the CLS token of
the layer the features are taken from (penultimate) predict the shape's colour, its kind and its (x, y)
position. It never sees a clip, a direction, a caption or a held-out sample; the tower is frozen afterwards
like any CLIP. Position embeddings start as fixed 2-D sin-cos codes (as MAE's), which makes position
learnable in that budget.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocess import clip_preprocess
from .shards import COLORS, SHAPES, render_stills


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position codes, rows in patch order (y major), half for y, half for x."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")

    def enc(v: torch.Tensor, d: int) -> torch.Tensor:  # (grid, grid) -> (grid*grid, d)
        omega = 1.0 / (10000 ** (torch.arange(d // 2, dtype=torch.float32) / (d / 2)))
        a = v.flatten()[:, None] * omega[None]
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([enc(ys, dim // 2), enc(xs, dim // 2)], 1)


def pretrain_on_stills(model, layer: int = -2, steps: int = 600, batch: int = 32, lr: float = 2e-3,
                       height: int = 64, width: int = 96, seed: int = 0, pos_amplitude: float = 0.5,
                       log=None) -> dict:
    """Train a transformers ``CLIPVisionModel`` in place; returns the last-window head accuracies.

    Objective on ``hidden_states[layer][:, 0]`` (the CLS token the features keep): cross-entropy for colour
    and shape plus 10 x MSE for the position in [-1, 1]^2."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    emb = model.embeddings
    grid = model.config.image_size // model.config.patch_size
    dim = model.config.hidden_size
    with torch.no_grad():
        pos = emb.position_embedding.weight  # (1 + P, D), row 0 = CLS
        pos[1:] = sincos_2d(grid, dim) * pos_amplitude
        pos[0] = 0
    n_col, n_shp = len(COLORS), len(SHAPES)
    head = torch.nn.Linear(dim, n_col + n_shp + 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    window: list[tuple[float, float, float]] = []
    for step in range(steps):
        frames, y = render_stills(rng, batch, height, width)
        x = clip_preprocess(frames, model.config.image_size)  # (B, H, W, 3) -> (B, 3, S, S)
        cls = model(pixel_values=x, output_hidden_states=True).hidden_states[layer][:, 0]  # (B, 1 + P, D) -> (B, D)
        out = head(cls)  # (B, D) -> (B, n_col + n_shp + 2)
        col, shp = torch.as_tensor(y["color"]), torch.as_tensor(y["shape"])
        xy = torch.as_tensor(y["xy"], dtype=torch.float32)
        loss = (F.cross_entropy(out[:, :n_col], col) + F.cross_entropy(out[:, n_col:n_col + n_shp], shp)
                + 10 * F.mse_loss(out[:, n_col + n_shp:], xy))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            window.append(((out[:, :n_col].argmax(1) == col).float().mean().item(),
                           (out[:, n_col:n_col + n_shp].argmax(1) == shp).float().mean().item(),
                           (out[:, n_col + n_shp:] - xy).abs().mean().item()))
        window = window[-50:]
        if log is not None and (step + 1) % 100 == 0:
            log(f"[vlp] tiny-clip-synth step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    acc = np.mean(window, axis=0)
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "color_acc": round(float(acc[0]), 3),
            "shape_acc": round(float(acc[1]), 3), "xy_abs_err": round(float(acc[2]), 3)}
