"""GPT-2 124M training step: our trainer's step against a plain PyTorch (nanoGPT-style) baseline.

Same batch (B=16, T=1024, vocab 50304, bf16), random tokens, ~20 timed steps after warm-up.
Ours: the model on our kernels, bf16 casts over fp32 master weights, chunked linear+CE,
fused AdamW, grad clipping (exactly engine/train.py's step), eager and torch.compile'd.
Baseline: nanoGPT's model (nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention),
autocast bf16, full-logits F.cross_entropy, fused AdamW, torch.compile.
Each variant's top CUDA kernels over 3 more steps go to train_profile_<variant>.txt.

    python -m benchmarks.gpu_suite --only train
"""
from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import device_peaks, md_table, save_rows

B, T, WARMUP, STEPS = 16, 1024, 5, 20


# --- the baseline: nanoGPT's model, trimmed -------------------------------------------

class _Attn(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h, self.c_attn, self.c_proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d), _Attn(d, h), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=50304, n_layer=12, n_head=12, d=768, max_t=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_t, d)
        self.h = nn.ModuleList(_Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.apply(lambda m: nn.init.normal_(m.weight, std=0.02) if isinstance(m, (nn.Linear, nn.Embedding)) else None)

    def forward(self, x, y):
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.wte(x) + self.wpe(pos)
        for blk in self.h:
            h = blk(h)
        logits = F.linear(self.ln_f(h), self.wte.weight)  # tied head: the full (B, T, V) logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")


# --- variants ----------------------------------------------------------------------------

def _ours(compile_: bool):
    from gpt_engine.models.presets import resolve_config
    from gpt_engine.models.gpt import GPT
    from gpt_engine.train.distributed import CastParams
    from gpt_engine.train.model import LMLoss
    lm = LMLoss(GPT(resolve_config("gpt2"))).cuda()
    model = CastParams(lm, torch.bfloat16)
    return lm, (torch.compile(model) if compile_ else model), None


def _baseline(compile_: bool):
    m = NanoGPT().cuda()
    return m, (torch.compile(m) if compile_ else m), torch.autocast("cuda", torch.bfloat16)


def _profile(step, path: Path) -> None:
    """The top CUDA kernels of 3 steps by their own time, to path: where a variant's step goes,
    from the same run that times it (a GPU session has ~30 minutes; no second run to dig)."""
    from torch.profiler import ProfilerActivity, profile
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        avg = prof.key_averages()
        for key in ("self_device_time_total", "self_cuda_time_total"):  # the name moved across torch versions
            try:
                path.write_text(avg.table(sort_by=key, row_limit=30, max_name_column_width=90))
                return
            except (AttributeError, KeyError, ValueError):
                continue
    except Exception as e:  # a profile is a diagnostic: never the reason a suite fails
        path.write_text(f"profiling failed: {type(e).__name__}: {e}\n")


def _measure(name, build, compile_, outdir=None):
    from contextlib import nullcontext
    from gpt_engine.train.metrics import flops_per_token
    from gpt_engine.models.presets import resolve_config
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    module, model, amp = build(compile_)
    params = [p for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x = torch.randint(0, 50257, (B, T), device="cuda")
    y = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        with amp or nullcontext():
            loss = model(x, y)
        (loss / (B * T)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    for _ in range(WARMUP):
        loss = step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(STEPS):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / STEPS
    if outdir is not None:
        _profile(step, Path(outdir) / f"train_profile_{name.replace(' + ', '_').replace(' ', '_')}.txt")
    n = sum(p.numel() for p in params) - 1024 * 768  # without position embeddings, as nanoGPT counts
    tok_s = B * T / (ms / 1e3)
    mfu = tok_s * flops_per_token(resolve_config("gpt2"), n, T) / device_peaks()[1]
    row = dict(variant=name, step_ms=ms, tokens_per_s=tok_s, mfu_pct=100 * mfu,
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30, warmup_s=warm_s,
               loss=float(loss) / (B * T))
    del module, model, opt
    return row


def main(outdir) -> str:
    outdir = Path(outdir)
    variants = [("baseline nanoGPT + compile", _baseline, True), ("baseline nanoGPT eager", _baseline, False),
                ("ours eager", _ours, False), ("ours + compile", _ours, True)]
    rows, errors = [], []
    for name, build, c in variants:
        try:
            rows.append(_measure(name, build, c, outdir))
            print(f"   {rows[-1]}", flush=True)
        except Exception:
            traceback.print_exc()
            errors.append(f"{name}:\n{traceback.format_exc()[-1500:]}")
        torch.cuda.empty_cache()
    save_rows(outdir, "train", rows)
    base = next((r for r in rows if r["variant"] == "baseline nanoGPT + compile"), None)
    for r in rows:
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"] if base else math.nan
    best = max((r for r in rows if r["variant"].startswith("ours")), key=lambda r: r["tokens_per_s"], default=None)
    lines = [f"## GPT-2 124M training step (B={B}, T={T}, bf16, fused AdamW, {STEPS} timed steps)\n",
             md_table(rows, ["variant", "step_ms", "tokens_per_s", "mfu_pct", "peak_mem_gb", "vs_baseline",
                             "warmup_s", "loss"])]
    if best and base:
        lines.append(f"\nbest ours ({best['variant']}): {best['vs_baseline']:.2f}x the compiled baseline "
                     f"(goal >= 1.1x), MFU {best['mfu_pct']:.1f}% (goal >= 50%)")
    if errors:
        lines.append("\nFAILED variants:\n```\n" + "\n\n".join(errors) + "\n```")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("benchmarks/results/train")))
