"""Training benchmark 6, activation memory: the preflight's activation estimate against measured peak memory.

    .venv/bin/python bench/train_activation_memory.py [--quick]

One process, CPU. The LM is preset:tiny-llama's config made wider so that activations dominate (4 layers,
hidden 256, MLP 688 (LLaMA's 11008 / 4096 ratio), 4 heads, its 531-token vocabulary; random weights). Each case
runs one forward + backward of a micro-batch of 2 samples x seq_len tokens through ``inputs_embeds`` that take a
gradient (as the connector's output does in vlp), with the loss on every token, as vlp's training step does:

- trained LM (every weight takes a gradient) or frozen LM (stage 1: only the inputs do);
- gradient checkpointing off / on (transformers' ``activation_checkpointing_enable``, non-reentrant, what
  ``model.llm.gradient_checkpointing`` turns on);
- attention sdpa / eager; fp32 and, for some cases, bf16 (weights and activations; CPU bf16 kernels);
- seq_len 128, 256, 512, 1024 (--quick: 128, 512).

Measured: every tensor storage an ATen op creates in the forward + backward is counted from its allocation until
its storage is freed (a TorchDispatchMode + a weakref finalizer per storage: real tensor bytes, not allocator
or RSS noise); storages that existed before (weights, buffers, the input embeddings) are not. The peak of the
live bytes less the parameter gradients live at that moment (they are model states, counted apart by the
preflight) is the measured activation peak. As a check on the meter, the bytes autograd saved for the backward
(saved-tensor hooks) are compared with the live bytes at the end of the forward pass.

Estimate: ``vlp.train.memory.activation_bytes`` for the same shape, micro-batch, length, precision, trained /
frozen, checkpointing and attention kernel. Writes bench/results/activation_memory(.quick).json.
"""

from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import loadavg, write_json  # noqa: E402

import torch  # noqa: E402
# PyTorch's documented hook into every ATen op (forward and backward); it has no public alias
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

MICRO = 2
SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4, "head_dim": 64}


def tensors_in(out):
    """The tensors of an op's output (a tensor, or a tuple / list of them and other values)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for x in out:
            yield from tensors_in(x)


class TensorMeter(TorchDispatchMode):
    """Live bytes of the tensor storages ATen ops create while active, and the peak of (live - parameter
    gradients). Storages in ``old`` (weights, buffers, inputs) are not counted."""

    def __init__(self, old: set[int]):
        super().__init__()
        self.old, self.live, self.grads, self.peak, self.keys = old, 0, 0, 0, {}

    def _freed(self, key: int) -> None:
        n, is_grad = self.keys.pop(key)
        self.live -= n
        self.grads -= n if is_grad else 0

    def mark_grad(self, p: torch.Tensor) -> None:
        """A post-accumulate-grad hook: this parameter's .grad storage is a model state, not an activation."""
        key = p.grad.untyped_storage().data_ptr()
        if key in self.keys and not self.keys[key][1]:
            self.keys[key] = (self.keys[key][0], True)
            self.grads += self.keys[key][0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            if t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key in self.keys or key in self.old or not st.nbytes():
                continue
            self.keys[key] = (st.nbytes(), False)
            self.live += st.nbytes()
            weakref.finalize(st, self._freed, key)
        self.peak = max(self.peak, self.live - self.grads)
        return out


def build_lm(attn: str, dtype: torch.dtype, trained: bool, ckpt: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlp.models.presets import resolve_model_path

    cfg = AutoConfig.from_pretrained(resolve_model_path("preset:tiny-llama"), **SHAPE)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).to(dtype).train()
    lm.requires_grad_(trained)
    if ckpt:
        lm.activation_checkpointing_enable()
        lm.config.use_cache = False
    return lm


def measure(lm, seq_len: int, dtype: torch.dtype) -> dict:
    """One forward + backward; -> measured activation peak, saved-tensor bytes and live bytes after forward."""
    g = torch.Generator().manual_seed(seq_len)
    emb = torch.randn(MICRO, seq_len, lm.config.hidden_size, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, lm.config.vocab_size, (MICRO, seq_len), generator=g)
    old = {t.untyped_storage().data_ptr() for t in [*lm.parameters(), *lm.buffers(), emb, labels]}
    meter, saved = TensorMeter(old), {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in old:
            saved[st.data_ptr()] = st.nbytes()
        return t

    hooks = [p.register_post_accumulate_grad_hook(meter.mark_grad) for p in lm.parameters() if p.requires_grad]
    with meter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lm(inputs_embeds=emb, labels=labels)
        after_forward = meter.live
        out.loss.backward()
        del out
    for h in hooks:
        h.remove()
    lm.zero_grad(set_to_none=True)
    return {"measured_peak": meter.peak, "saved_by_autograd": sum(saved.values()), "live_after_forward": after_forward}


def cases(quick: bool) -> list[dict]:
    lens = [128, 512] if quick else [128, 256, 512, 1024]
    out = []
    for trained, ckpt, attn, prec in [(True, False, "sdpa", "fp32"), (True, True, "sdpa", "fp32"),
                                      (False, False, "sdpa", "fp32"), (True, False, "eager", "fp32"),
                                      (True, True, "eager", "fp32"), (True, False, "sdpa", "bf16"),
                                      (True, True, "sdpa", "bf16")]:
        for s in (lens if prec == "fp32" else lens[:2]):
            out.append({"trained": trained, "checkpointing": ckpt, "attn": attn, "precision": prec, "seq_len": s})
    return out


def run_case(c: dict) -> dict:
    from vlp.train.memory import LMShape, activation_bytes

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["precision"]]
    lm = build_lm(c["attn"], dtype, c["trained"], c["checkpointing"])
    m = measure(lm, c["seq_len"], dtype)
    est = activation_bytes(LMShape.of(lm.config), MICRO, c["seq_len"], c["precision"], c["trained"],
                           c["checkpointing"], c["attn"])
    return {**c, **m, "estimate": est, "ratio_estimate_to_measured": round(est / m["measured_peak"], 3)}


def table(rows: list[dict]) -> str:
    head = "| LM | checkpointing | attention | precision | seq_len | measured peak MB | estimate MB | estimate / measured |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'trained' if r['trained'] else 'frozen'} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['attn']} | {r['precision']} | {r['seq_len']} | {r['measured_peak'] / 1e6:.2f} | "
                     f"{r['estimate'] / 1e6:.2f} | {r['ratio_estimate_to_measured']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 sequence lengths instead of 4")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), loadavg()
    rows = [run_case(c) for c in cases(a.quick)]
    ratios = [r["ratio_estimate_to_measured"] for r in rows]
    meter_check = [round(r["live_after_forward"] / r["saved_by_autograd"], 3) for r in rows if not r["checkpointing"]]
    summary = {"ratio_min": min(ratios), "ratio_max": max(ratios),
               "live_after_forward_over_saved_by_autograd": [min(meter_check), max(meter_check)],
               "micro_batch": MICRO, "lm": SHAPE}
    path = write_json("activation_memory", a.quick, {
        "what": "bench/train_activation_memory.py's docstring", "summary": summary, "rows": rows,
        "loadavg_start": load0, "loadavg_end": loadavg(), "total_s": round(time.perf_counter() - t0, 1)})
    print(table(rows))
    print(f"estimate / measured: {summary['ratio_min']:.3f} .. {summary['ratio_max']:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
