"""A tiny AST that has *heard* tones: the synthetic world's stand-in for a pretrained audio tower.

A real AST (AudioSet-trained) arrives knowing what sounds are; a randomly initialised tiny one mixes its
fbank patches through random layers, and the demo's connector then has to dig the pitch out of noise (one run:
the word a clip's tone names 0.56 with its audio, chance 0.25). ``preset:tiny-ast-synth`` therefore trains the
tiny tower for ``steps`` steps (~15 s on 2 CPU cores) on 768 random pure tones: a linear head on the CLS token of
the layer the features are taken from regresses the tone's pitch (log2 Hz, anywhere in 150-5000 Hz). It never
hears a clip, a word or a held-out sample; the tower is frozen afterwards like any audio encoder.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from .shards import SOUND_RATE

LOW, HIGH = math.log2(150.0), math.log2(5000.0)


def random_tones(rng: np.random.Generator, n: int, seconds: float) -> tuple[list[np.ndarray], np.ndarray]:
    """n tones of random pitch (log-uniform in 150-5000 Hz), amplitude, length and phase -> (waves, log2 Hz)."""
    pitch = rng.uniform(LOW, HIGH, n)
    waves = []
    for p in pitch:
        t = np.arange(int(SOUND_RATE * rng.uniform(0.4, 1.0) * seconds)) / SOUND_RATE
        waves.append((rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * 2 ** p * t + rng.uniform(0, 6.3)))
                     .astype(np.float32))
    return waves, pitch


def pretrain_on_tones(model, extractor, layer: int = -1, steps: int = 300, batch: int = 32, lr: float = 2e-3,
                      pool: int = 768, seed: int = 0, log=None) -> dict:
    """Train a transformers ``ASTModel`` in place on ``extractor``'s fbanks of ``pool`` random tones (made once:
    the fbank is the slow part), batches drawn from them; returns the last-window mean absolute pitch error
    (octaves). Objective: MSE of a linear head on ``hidden_states[layer][:, 0]``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    waves, pitches = random_tones(rng, pool, extractor.max_length / 100)  # 10 ms frames
    fbanks = torch.from_numpy(np.asarray(extractor(waves, sampling_rate=SOUND_RATE, return_tensors="np")
                                         ["input_values"], np.float32))  # (pool, frames, mel_bins)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0, window = time.time(), []
    for step in range(steps):
        pick = rng.integers(pool, size=batch)
        x, pitch = fbanks[pick], pitches[pick]  # (B, frames, mel_bins), (B,)
        cls = model(input_values=x, output_hidden_states=True).hidden_states[layer][:, 0]  # (B, D)
        y = torch.as_tensor((pitch - LOW) / (HIGH - LOW), dtype=torch.float32)  # pitch in [0, 1]
        pred = head(cls).squeeze(1)  # (B,)
        loss = F.mse_loss(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window = [*window[-49:], float((pred.detach() - y).abs().mean()) * (HIGH - LOW)]
        if log is not None and (step + 1) % 100 == 0:
            log(f"[vlp] tiny-ast-synth step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval()
    return {"steps": steps, "seconds": round(time.time() - t0, 1), "pitch_abs_err_octaves": round(np.mean(window), 3)}
