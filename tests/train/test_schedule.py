"""The learning-rate schedule is transformers' get_scheduler with the warmup the Hugging Face Trainer counts, so
LLaVA's settings (``--learning_rate 2e-5 --warmup_ratio 0.03 --lr_scheduler_type cosine``) give LLaVA's rates."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.train.recipe import lr_scheduler, warmup_steps


def rates(total: int, lr: float, warmup_ratio: float, schedule: str) -> list[float]:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_scheduler(opt, total, warmup_ratio, schedule)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_llava_stage2_settings_give_llava_rates():
    """LLaVA-1.5's stage 2: 665K conversations at 128 per step = 5198 steps, lr 2e-5, warmup 0.03, cosine. The rates
    written out as transformers' Trainer computed them when LLaVA was trained (ceil warmup from 0, then a half
    cosine to 0)."""
    total, lr = 5198, 2e-5
    warm = math.ceil(total * 0.03)
    assert warmup_steps(total, 0.03) == warm == 156
    want = [lr * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
            for s in range(total)]
    got = rates(total, lr, 0.03, "cosine")
    assert got[0] == 0.0 and got[warm] == pytest.approx(lr)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_the_trainer_counts_warmup_the_same_way(tmp_path):
    from transformers import TrainingArguments

    for total in (1, 7, 100, 5198):
        args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.03, report_to=[])
        assert warmup_steps(total, 0.03) == args.get_warmup_steps(total)


@pytest.mark.parametrize("schedule, last", [("linear", 1e-3 / 90), ("constant", 1e-3)])
def test_linear_and_constant_after_warmup(schedule, last):
    got = rates(100, 1e-3, 0.1, schedule)
    assert got[:10] == pytest.approx([1e-3 * s / 10 for s in range(10)])
    assert got[10] == pytest.approx(1e-3) and got[-1] == pytest.approx(last)
