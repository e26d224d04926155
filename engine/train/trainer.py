"""The training loop: pretraining from scratch or fine-tuning an HF directory, one process or many.

    gpt-engine train --out runs/tiny                               # the default model on the default corpus
    gpt-engine train --out runs/ft --init runs/tiny --data pairs.jsonl --steps 200
    torchrun --nproc-per-node 8 -m gpt_engine train --out runs/gpt2 --model gpt2 [--fsdp]

train() is a short loop over named steps: setup (settings, model config, checkpoint),
load_data, build (train/model.py), then train_step, evaluate and sample, with checkpoints
(train/checkpoint.py) and the meter (train/metrics.py) along the way.

Data is a pure function of (seed, step): every step samples the windows of the whole global
batch from np.random.default_rng([seed, step]) and each rank takes its own slice, so a run
is the same for any world size x batch size x grad accumulation with the same product, and
resuming needs no data-loader state beyond the step.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.config import ModelConfig
from . import lora
from .checkpoint import (check_resume_tokenizer, checkpoint_dir, load_checkpoint, restore, save_checkpoint,
                         save_final, tokenizer_fingerprint)
from .config import TrainConfig, global_batch, lr_at, resolve_defaults
from .data import IGNORE_INDEX, Split, build_dataset, example_batch, example_windows, sample_starts, windows
from .distributed import Dist
from .metrics import Meter, flops_per_token
from .model import Modules, build, model_config


@dataclass
class Data:
    tokenizer: object  # gpt_engine.tokenizer.Tokenizer
    train: Split
    val: Split


TRAIN, VAL = 0, 1  # the data streams: the last word of a batch's rng seed


def train(cfg: TrainConfig) -> Path:
    """Train as cfg says; returns the output directory (an HF-format model directory)."""
    dd = Dist(cfg.device)
    cfg, mcfg, tokenizer, ckpt = setup(cfg, dd)
    data = load_data(cfg, dd, mcfg, tokenizer)
    if ckpt is not None:
        check_resume_tokenizer(ckpt, data.tokenizer, checkpoint_dir(cfg.out))
    tok_fp = tokenizer_fingerprint(data.tokenizer)
    m = build(cfg, dd, mcfg, fine_tune=bool(cfg.init) and ckpt is None)
    start = restore(m, ckpt, dd) if ckpt is not None else 0
    del ckpt  # its copy of the weights and optimizer state is not needed any more
    dd.log(describe(cfg, dd, mcfg, m, data, start))
    n_adapter = sum(p.numel() for p in m.params) if cfg.lora_rank else None
    meter = Meter(cfg, dd, start, flops_per_token(mcfg, m.n_params, cfg.seq_len, n_adapter))
    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    for step in range(start, end):
        lr, losses, count = train_step(step, m, data.train, cfg, dd)
        meter.add(losses, count)
        done = step + 1
        if done % cfg.log_every == 0 or done == end:
            meter.log_train(done, lr)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            meter.log_eval(done, evaluate(m, data.val, cfg, dd), *sample(m, data, mcfg, cfg, dd))
        if done % cfg.save_every == 0 or done == end:
            save_checkpoint(done, m, mcfg, cfg, dd, tok_fp)
            meter.restart_clock()
    meter.close()
    if end == cfg.steps or start >= cfg.steps:
        save_final(m, mcfg, data.tokenizer, cfg, dd)
    dd.close()
    return Path(cfg.out)


def setup(cfg: TrainConfig, dd: Dist):
    """cfg with its defaults filled in, the model config, the tokenizer (None: train one on the
    data) and the checkpoint to resume from (None: a fresh run)."""
    ckpt = load_checkpoint(Path(cfg.out), dd, cfg) if cfg.resume else None
    mcfg, tokenizer = model_config(cfg, ckpt)
    seq_auto = cfg.seq_len is None
    cfg = resolve_defaults(cfg, dd.device.type == "cuda")
    if seq_auto:
        cfg.seq_len = min(cfg.seq_len, mcfg.max_seq_len)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")
    if cfg.lora_rank:  # a target the family lacks fails here, before any data work
        lora.targets(mcfg, lora.parse_targets(cfg.lora_targets))
    return cfg, mcfg, tokenizer, ckpt


def load_data(cfg: TrainConfig, dd: Dist, mcfg: ModelConfig, tokenizer) -> Data:
    """Rank 0 tokenizes into OUT/data first, so the other ranks only read its cache."""
    for turn in ((0,) if dd.world == 1 else (0, 1)):
        if (turn == 0) == dd.master:
            tokenizer, train_split, val_split = build_dataset(
                cfg.data, Path(cfg.out) / "data", tokenizer, mcfg.vocab_size, cfg.corpus_mb,
                tokenizer_vocab=cfg.vocab_size, log=dd.log)
        dd.barrier()
    if tokenizer.eos_token_id is not None and mcfg.eos_token_id is None:
        mcfg.eos_token_id = mcfg.bos_token_id = tokenizer.eos_token_id
    for split in (train_split, val_split):
        if split.bounds is not None:  # jsonl examples: batch rows never cross an example's boundary
            split.windows = example_windows(split.bounds, split.mask, cfg.seq_len)
    return Data(tokenizer, train_split, val_split)


def describe(cfg: TrainConfig, dd: Dist, mcfg: ModelConfig, m: Modules, data: Data, start: int) -> str:
    return (f"model {mcfg.model_type} {m.n_params / 1e6:.1f}M params, vocab {mcfg.vocab_size} "
            f"(tokenizer {data.tokenizer.vocab_size}); data {len(data.train.tokens):,} train / "
            f"{len(data.val.tokens):,} val tokens; {dd.world} x {cfg.device or dd.device.type} {cfg.dtype}; "
            f"global batch {global_batch(cfg, dd.world)} x {cfg.seq_len} tokens; "
            f"steps {start}..{cfg.steps}" + (lora_line(cfg, mcfg, m) if cfg.lora_rank else ""))


def lora_line(cfg: TrainConfig, mcfg: ModelConfig, m: Modules) -> str:
    t = lora.targets(mcfg, lora.parse_targets(cfg.lora_targets))
    return (f"; LoRA rank {cfg.lora_rank} on {', '.join(lora.target_modules(t))} (base {cfg.lora_base_dtype}, "
            f"frozen): {sum(p.numel() for p in m.params):,} trainable parameters")


# --- batches -----------------------------------------------------------------------------

def get_batch(split: Split, stream: int, index: int, rows: int, cfg: TrainConfig, dd: Dist):
    """This rank's share (x, y (rows / world, T) on the device) of a global batch of `rows`
    windows drawn for (seed, index, stream), and the loss tokens in the whole global batch."""
    rng = np.random.default_rng([cfg.seed, index, stream])
    if split.windows is not None:
        x, y, count = _example_batch(split, rng.integers(0, len(split.windows), size=rows), dd)
    else:
        x, y, count = _window_batch(split, rng, rows, cfg.seq_len, dd)
    return (torch.from_numpy(x).to(dd.device, non_blocking=True),
            torch.from_numpy(y).to(dd.device, non_blocking=True), max(count, 1))


def _window_batch(split: Split, rng: np.random.Generator, rows: int, T: int, dd: Dist):
    """get_batch over a token stream: `rows` windows of T tokens anywhere in it."""
    starts = sample_starts(len(split.tokens), rows, T, rng)
    per_rank = len(starts) // dd.world
    x, y = windows(split.tokens, starts[dd.rank * per_rank:(dd.rank + 1) * per_rank], T, split.mask)
    if split.mask is None:
        count = len(starts) * T
    else:  # counted over the global batch, so every rank scales its gradient alike
        count = int(sum(split.mask[s + 1:s + 1 + T].sum() for s in starts))
    return x, y, count


def _example_batch(split: Split, picks: np.ndarray, dd: Dist):
    """get_batch over jsonl examples: one example range (Split.windows) a row, padded to the
    longest row of this rank's share."""
    wins = split.windows[picks]
    per_rank = len(wins) // dd.world
    x, y = example_batch(split.tokens, split.mask, wins[dd.rank * per_rank:(dd.rank + 1) * per_rank])
    count = int(sum(split.mask[s + 1:e].sum() for s, e in wins.tolist()))
    return x, y, count


# --- steps -------------------------------------------------------------------------------

def train_step(step: int, m: Modules, split: Split, cfg: TrainConfig, dd: Dist):
    """One optimizer step over grad_accum micro-steps; (lr, each micro-step's summed loss, loss tokens)."""
    lr = lr_at(step, cfg)
    for g in m.opt.param_groups:
        g["lr"] = lr
    B, A = cfg.batch_size, cfg.grad_accum
    x, y, count = get_batch(split, TRAIN, step, global_batch(cfg, dd.world), cfg, dd)
    scale = dd.world / count  # DDP/FSDP average over ranks: this makes it the global token mean
    losses = []
    for i in range(A):
        losses.append(micro_step(m, x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], scale, i == A - 1, cfg.fsdp))
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(m.params, cfg.grad_clip)
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    return lr, losses, count


def micro_step(m: Modules, x, y, scale: float, last: bool, fsdp: bool) -> torch.Tensor:
    """Forward and backward of one micro-batch; gradients are synced across ranks on the last only."""
    if fsdp:
        m.lm.set_requires_gradient_sync(last)
    ddp = hasattr(m.model, "no_sync")
    with m.model.no_sync() if ddp and not last else nullcontext():
        loss = m.model(x, y)
        (loss * scale).backward()
    return loss.detach()


@torch.no_grad()
def evaluate(m: Modules, split: Split, cfg: TrainConfig, dd: Dist) -> float:
    """Validation loss per loss token over eval_iters fixed batches."""
    m.model.eval()
    tot = torch.zeros(2, dtype=torch.float64, device=dd.device)
    for i in range(cfg.eval_iters):
        x, y, _ = get_batch(split, VAL, i, cfg.batch_size * dd.world, cfg, dd)
        tot[0] += m.infer(x, y).double()
        tot[1] += (y != IGNORE_INDEX).sum()
    dd.sum(tot)
    m.model.train()
    return (tot[0] / tot[1].clamp(min=1)).item()


@torch.no_grad()
def sample(m: Modules, data: Data, mcfg: ModelConfig, cfg: TrainConfig, dd: Dist) -> tuple[str, str]:
    """(prompt, greedy continuation): the first validation tokens and sample_tokens more."""
    m.model.eval()
    ids = torch.from_numpy(np.asarray(data.val.tokens[:8], dtype=np.int64))[None].to(dd.device)
    prompt_len = ids.shape[1]
    for _ in range(cfg.sample_tokens):
        nxt = m.infer(ids[:, -mcfg.max_seq_len:]).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    m.model.train()
    ids = ids[0].tolist()
    return data.tokenizer.decode(ids[:prompt_len]), data.tokenizer.decode(ids[prompt_len:])
