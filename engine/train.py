"""The trainer: pretraining from scratch or fine-tuning an HF directory, one process or many.

    gpt-engine train --out runs/tiny                               # gpt2-tiny on the default corpus
    gpt-engine train --out runs/ft --init runs/tiny --data pairs.jsonl --steps 200
    torchrun --nproc-per-node 8 -m gpt_engine train --out runs/gpt2 --model gpt2 [--fsdp]

Mixed precision is bf16 compute over fp32 master weights: the parameters are cast to bf16
inside the forward (so the gradients flow back into fp32 through the cast) under single
process and DDP, and by FSDP2's MixedPrecisionPolicy under --fsdp. The loss goes through a
chunked linear+cross-entropy (engine/losses.py) that never holds the full logits.

Data is a pure function of (seed, step): every step samples the windows of the whole global
batch from np.random.default_rng([seed, step]) and each rank takes its own slice, so a run
is the same for any world size x batch size x grad accumulation with the same product, and
resuming needs no data-loader state beyond the step.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ModelConfig, resolve_config
from .data import IGNORE_INDEX, build_dataset, sample_starts, windows
from .losses import chunked_cross_entropy
from .model import GPT, Block
from .weights import atomic_write, save_model

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0}


@dataclass
class TrainConfig:
    out: str
    data: str | None = None           # text file | folder | .jsonl of {"prompt","completion"}; None: default corpus
    model: str = "gpt2-tiny"          # preset or config.json (ignored with init)
    init: str | None = None           # HF directory to fine-tune from
    steps: int | None = None          # None: a device-dependent default (see _defaults)
    batch_size: int | None = None     # per rank, per micro-step
    seq_len: int | None = None
    grad_accum: int = 1
    lr: float | None = None           # None: 2e-3 from scratch, 1e-4 fine-tuning
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int | None = None     # None: at every eval
    keep: int = 2                     # checkpoints kept under out/checkpoint
    resume: bool = False
    eval_every: int | None = None
    eval_iters: int = 4
    log_every: int | None = None
    device: str | None = None
    dtype: str | None = None          # fp32 | bf16; None: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False
    vocab_size: int | None = None     # tokenizer size for a new model (model vocab: padded to 64)
    corpus_mb: float | None = None    # cap on the default corpus; None: 8 MB on CPU, all of it on GPU
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs, n/a on CPU
    sample_tokens: int = 24
    stop_after: int | None = None     # stop (with a checkpoint) after this step, as if preempted
    progress: bool = True


def _defaults(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """Sizes for a few minutes of gpt2-tiny: on a 2-core CPU, or much more on a GPU."""
    # the whole default corpus is ~12 MB (~3.5M tokens): the GPU default sees it ~3 times
    d = dict(steps=1500, batch_size=32, seq_len=256, corpus_mb=64.0) if cuda else \
        dict(steps=300, batch_size=16, seq_len=128, corpus_mb=8.0)
    for k, v in d.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.init else 2e-3
    if cfg.warmup is None:
        cfg.warmup = min(100, cfg.steps // 10)
    if cfg.eval_every is None:
        cfg.eval_every = max(1, cfg.steps // 5)
    if cfg.save_every is None:
        cfg.save_every = cfg.eval_every
    if cfg.log_every is None:
        cfg.log_every = 10 if cuda else 1
    if cfg.dtype is None:
        cfg.dtype = "bf16" if cuda else "fp32"
    if cfg.dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {cfg.dtype!r}")
    for k in ("steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(cfg, k) <= 0:
            raise ValueError(f"{k} must be positive, got {getattr(cfg, k)}")
    return cfg


# --- the module that DDP / FSDP / compile wrap ---------------------------------------

class LMLoss(nn.Module):
    """(x, y) -> summed token loss through the chunked head; (x,) -> last-position logits."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y=None):
        # x, y (B, T) int64
        pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
        h = self.gpt.hidden(x, pos)                                   # (B, T, C)
        if y is None:
            return self.gpt.logits(h[:, -1]).float()                  # (B, V)
        return chunked_cross_entropy(h, self.gpt.head_weight, y)


class CastParams(nn.Module):
    """Runs module with its parameters cast to dtype; the casts are differentiable, so the
    fp32 parameters (the optimizer's master weights) receive fp32 gradients."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        params = {n: p.to(self.dtype) for n, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, args)


# --- helpers ---------------------------------------------------------------------------

def pad_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine down to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def flops_per_token(mcfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """6N for the matmuls (PaLM appendix B) + 12 L H D T for attention scores and values."""
    return 6 * n_params + 12 * mcfg.n_layer * mcfg.n_head * mcfg.head_dim * seq_len


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


class Dist:
    """This process's place in a torchrun job (world 1 without torchrun)."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda" and self.world > 1:
            dev = f"cuda:{local}"
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _rng_states():
    s = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_states(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoint").glob("step_*.pt"))
    return cks[-1] if cks else None


# --- the trainer ---------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Train as cfg says; returns the output directory (an HF-format model directory)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    from tqdm import tqdm

    from .tokenizer import Tokenizer

    dd = Dist(cfg.device)
    seq_auto = cfg.seq_len is None
    cfg = _defaults(cfg, dd.device.type == "cuda")
    out = Path(cfg.out)
    log = print if dd.master else (lambda *a, **k: None)

    ckpt = None
    if cfg.resume:
        path = latest_checkpoint(out)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {out / 'checkpoint'}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        log(f"resuming from {path} (step {ckpt['step']})")

    # model config and tokenizer: from --init, from the checkpoint, or new
    tokenizer = None
    if cfg.init:
        init = Path(cfg.init)
        if not init.is_dir():
            raise FileNotFoundError(f"--init {init} is not a model directory")
        mcfg = ModelConfig.load(init)
        tokenizer = Tokenizer.load(init)
    elif ckpt is not None:
        mcfg = ModelConfig(**ckpt["model_config"])
    else:
        over = {}
        if cfg.vocab_size:
            over["vocab_size"] = cfg.vocab_size
        mcfg = resolve_config(cfg.model, **over)
        # the tokenizer gets the requested size; the embedding rounds up for aligned GEMMs
        cfg.vocab_size = cfg.vocab_size or mcfg.vocab_size
        mcfg.vocab_size = pad_vocab(mcfg.vocab_size)
    if seq_auto:
        cfg.seq_len = min(cfg.seq_len, mcfg.max_seq_len)
    if cfg.seq_len > mcfg.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {mcfg.max_seq_len}")

    # data: rank 0 tokenizes into out/data, the others then read the cache
    for turn in ((0,) if dd.world == 1 else (0, 1)):
        if (turn == 0) == dd.master:
            tokenizer, train_split, val_split = build_dataset(
                cfg.data, out / "data", tokenizer, mcfg.vocab_size, cfg.corpus_mb,
                tokenizer_vocab=cfg.vocab_size, log=log)
        dd.barrier()
    if tokenizer.eos_token_id is not None and mcfg.eos_token_id is None:
        mcfg.eos_token_id = mcfg.bos_token_id = tokenizer.eos_token_id

    torch.manual_seed(cfg.seed)  # same init on every rank
    if cfg.init and ckpt is None:
        from .weights import load_model
        gpt = load_model(cfg.init, device="cpu", dtype=torch.float32).requires_grad_(True)
        gpt.config = mcfg
    else:
        gpt = GPT(mcfg)
    gpt.to(dd.device).train()
    n_params = sum(p.numel() for p in gpt.parameters()) - (gpt.pos_emb.weight.numel() if gpt.pos_emb else 0)
    lm = LMLoss(gpt)
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(gpt, check_fn=lambda m: isinstance(m, Block))

    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        if dd.world == 1 and not dist.is_initialized():  # FSDP2 needs a process group even for one rank
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + cfg.seed % 1000))
            dist.init_process_group("nccl" if dd.device.type == "cuda" else "gloo", rank=0, world_size=1)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in gpt.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(lm, mp_policy=mp)
        model = infer = lm
    else:
        model = infer = lm if dtype == torch.float32 else CastParams(lm, dtype)
        if dd.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    params = [p for p in lm.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dd.device.type == "cuda")

    sd_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    start = 0
    if ckpt is not None:
        set_model_state_dict(lm, ckpt["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(lm, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        _set_rng_states(ckpt["rng"][min(dd.rank, len(ckpt["rng"]) - 1)])
        start = ckpt["step"]
        del ckpt

    # --- batches: a pure function of (seed, step) ---
    B, T, A = cfg.batch_size, cfg.seq_len, cfg.grad_accum
    rows = B * A                    # this rank's rows per step
    global_rows = rows * dd.world

    def batch(split, key):
        starts = sample_starts(len(split.tokens), global_rows if key[0] == "train" else B * dd.world, T,
                               np.random.default_rng([cfg.seed, *key[1:], 0 if key[0] == "train" else 1]))
        mine = starts[dd.rank * (len(starts) // dd.world):(dd.rank + 1) * (len(starts) // dd.world)]
        x, y = windows(split.tokens, mine, T, split.mask)
        if split.mask is None:
            count = len(starts) * T
        else:  # loss tokens in the whole global batch, so every rank scales its gradient alike
            count = int(sum(split.mask[s + 1:s + 1 + T].sum() for s in starts))
        return (torch.from_numpy(x).to(dd.device, non_blocking=True),
                torch.from_numpy(y).to(dd.device, non_blocking=True), max(count, 1))

    # eval and sampling skip DDP (no gradients to sync) and compile (sampling changes shapes every token)
    @torch.no_grad()
    def evaluate():
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=dd.device)
        for i in range(cfg.eval_iters):
            x, y, _ = batch(val_split, ("val", i))
            tot[0] += infer(x, y).double()
            tot[1] += (y != IGNORE_INDEX).sum()
        dd.sum(tot)
        model.train()
        return (tot[0] / tot[1].clamp(min=1)).item()

    @torch.no_grad()
    def sample():
        model.eval()
        ids = torch.from_numpy(np.asarray(val_split.tokens[:8], dtype=np.int64))[None].to(dd.device)
        prompt_len = ids.shape[1]
        for _ in range(cfg.sample_tokens):
            nxt = infer(ids[:, -mcfg.max_seq_len:]).argmax(-1, keepdim=True)  # greedy
            ids = torch.cat([ids, nxt], dim=1)
        model.train()
        ids = ids[0].tolist()
        return tokenizer.decode(ids[:prompt_len]), tokenizer.decode(ids[prompt_len:])

    def save_checkpoint(step):
        msd = get_model_state_dict(lm, options=sd_opts)      # collectives under FSDP: every rank calls
        osd = get_optimizer_state_dict(lm, opt, options=sd_opts)
        rng = [None] * dd.world
        if dd.world > 1:
            dist.all_gather_object(rng, _rng_states())
        else:
            rng = [_rng_states()]
        if dd.master:
            d = out / "checkpoint"
            d.mkdir(parents=True, exist_ok=True)
            state = dict(model=msd, optimizer=osd, step=step, rng=rng, model_config=mcfg.to_dict(),
                         train_config=asdict(cfg), world=dd.world)
            atomic_write(d / f"step_{step:08d}.pt", lambda p: torch.save(state, p))
            for old in sorted(d.glob("step_*.pt"))[:-cfg.keep]:
                old.unlink()
        dd.barrier()

    fpt = flops_per_token(mcfg, n_params, T)
    peak = peak_flops(cfg, dd.device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if dd.master and start == 0:
        log_path.write_text("")
    log(f"model {mcfg.model_type} {n_params / 1e6:.1f}M params, vocab {mcfg.vocab_size} "
        f"(tokenizer {tokenizer.vocab_size}); data {len(train_split.tokens):,} train / {len(val_split.tokens):,} "
        f"val tokens; {dd.world} x {cfg.device or dd.device.type} {cfg.dtype}; global batch "
        f"{global_rows} x {T} tokens; steps {start}..{cfg.steps}")

    def write_log(rec):
        if dd.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    end = min(cfg.steps, cfg.stop_after or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, disable=not (dd.master and cfg.progress), dynamic_ncols=True)
    ddp = hasattr(model, "no_sync")
    loss_acc = torch.zeros((), dtype=torch.float64, device=dd.device)
    count_acc, t_last, step_last, train_loss = 0, time.time(), start, float("nan")
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, count = batch(train_split, ("train", step))
        scale = dd.world / count  # DDP/FSDP average over ranks: this makes it the global token mean
        for m in range(A):
            last = m == A - 1
            if cfg.fsdp:
                lm.set_requires_gradient_sync(last)
            with model.no_sync() if ddp and not last else nullcontext():
                loss = model(x[m * B:(m + 1) * B], y[m * B:(m + 1) * B])
                (loss * scale).backward()
            loss_acc += loss.detach()
        count_acc += count
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        bar.update(1)

        if done % cfg.log_every == 0 or done == end:
            train_loss = dd.sum(loss_acc).item() / count_acc   # .item() syncs: timing is honest
            dt = time.time() - t_last
            tok_s = (done - step_last) * global_rows * T / dt
            mfu = tok_s * fpt / (peak * dd.world) if peak else None
            bar.set_postfix_str(f"loss {train_loss:.3f} lr {lr:.1e} tok/s {tok_s:,.0f} "
                                f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
            write_log(dict(step=done, loss=train_loss, lr=lr, tok_s=tok_s, mfu=mfu, time=time.time()))
            loss_acc.zero_()
            count_acc, t_last, step_last = 0, time.time(), done
        if done % cfg.eval_every == 0 or done == cfg.steps:
            val = evaluate()
            prompt, text = sample()
            if dd.master:
                bar.write(f"step {done}: train loss {train_loss:.3f}, val loss {val:.3f} | {prompt!r} -> {text!r}")
            write_log(dict(step=done, val_loss=val, sample=prompt + text))
            t_last = time.time()  # evaluation time is not training throughput
        if done % cfg.save_every == 0 or done == end:
            save_checkpoint(done)
            t_last = time.time()
    bar.close()

    if end == cfg.steps or start >= cfg.steps:
        msd = get_model_state_dict(lm, options=sd_opts)
        if dd.master:
            final = GPT(mcfg)
            final.load_state_dict({k.removeprefix("gpt."): v for k, v in msd.items()})
            save_model(final, out, tokenizer)
            plot_loss(log_path, out / "loss.png")
            log(f"saved {out} (HF format) and {out / 'loss.png'}")
        dd.barrier()
    if dist.is_initialized() and dd.world == 1:
        dist.destroy_process_group()
    return out


def plot_loss(log_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --- CLI ---------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (ends up an HF model directory)")
    p.add_argument("--data", help='text file, folder of text files, or .jsonl of {"prompt","completion"}')
    p.add_argument("--model", default="gpt2-tiny", help="preset name or config.json")
    p.add_argument("--init", help="HF model directory to fine-tune from")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per rank and micro-step")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under OUT")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary for a new model")
    p.add_argument("--corpus-mb", type=float, help="cap on the default corpus (default: 8 on CPU, all on GPU)")
    p.add_argument("--peak-tflops", type=float, help="per-device peak for MFU")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(TrainConfig)}
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0
