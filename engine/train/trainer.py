"""The trainer: pretraining from scratch or fine-tuning an HF directory, one process or many.

    gpt-engine train --out runs/tiny                               # gpt2-tiny on the default corpus
    gpt-engine train --out runs/ft --init runs/tiny --data pairs.jsonl --steps 200
    torchrun --nproc-per-node 8 -m gpt_engine train --out runs/gpt2 --model gpt2 [--fsdp]

TrainConfig is the one source of the training settings: each field's default, help text and
CPU/GPU default live on the field, and `gpt-engine train`'s flags are generated from it.

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

import functools
import hashlib
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..models.config import ModelConfig, resolve_config
from .data import IGNORE_INDEX, Split, build_dataset, example_batch, example_windows, sample_starts, windows
from .losses import chunked_cross_entropy
from ..models.gpt import GPT, Block
from ..models.loader import atomic_write, save_model

# dense bf16 tensor-core peak per GPU (vendor specs), for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
               "A10": 125.0, "4090": 165.0}


def setting(default=MISSING, help="", cpu=None, gpu=None, choices=None, hidden=False):
    """A TrainConfig field. help: its flag's help text; cpu/gpu: what a None default becomes on
    that device; choices: the allowed values; hidden: a flag left out of --help."""
    return field(default=default, metadata=dict(help=help, cpu=cpu, gpu=gpu, choices=choices, hidden=hidden))


@dataclass
class TrainConfig:
    out: str = setting(help="output directory (ends up an HF model directory)")
    data: str | None = setting(None, 'text file, folder of text files, or .jsonl of {"text"}, {"prompt","completion"} '
                                     'or {"messages"} (chat fine-tuning) lines (default: the default corpus)')
    model: str = setting("gpt2-tiny", "preset name or config.json (ignored with --init)")
    init: str | None = setting(None, "HF model directory to fine-tune from")
    steps: int | None = setting(None, "optimizer steps", cpu=300, gpu=1500)
    batch_size: int | None = setting(None, "sequences per rank and micro-step", cpu=16, gpu=32)
    seq_len: int | None = setting(None, "tokens per sequence; the default is capped at the model's max_seq_len",
                                  cpu=128, gpu=256)
    grad_accum: int = setting(1, "micro-steps per optimizer step")
    lr: float | None = setting(None, "peak learning rate (default: 2e-3 from scratch, 1e-4 fine-tuning)")
    min_lr_ratio: float = setting(0.1, "the cosine schedule ends at this fraction of the peak learning rate")
    warmup: int | None = setting(None, "linear warmup steps (default: min(100, steps / 10))")
    weight_decay: float = setting(0.1, "AdamW weight decay of the matrices (biases and norms get none)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0: no clipping")
    seed: int = setting(0, "seed of the initial weights and of the data order")
    save_every: int | None = setting(None, "steps between checkpoints (default: the evaluation interval)")
    keep: int = setting(2, "checkpoints kept under OUT/checkpoint")
    resume: bool = setting(False, "continue from the latest checkpoint under OUT")
    eval_every: int | None = setting(None, "steps between evaluations (default: steps / 5)")
    eval_iters: int = setting(4, "validation batches per evaluation")
    log_every: int | None = setting(None, "steps between log lines", cpu=1, gpu=10)
    device: str | None = setting(None, "torch device (default: cuda when available, else cpu)")
    dtype: str | None = setting(None, "compute dtype over fp32 master weights", cpu="fp32", gpu="bf16",
                                choices=("fp32", "bf16"))
    compile: bool = setting(False, "torch.compile the model")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward")
    fsdp: bool = setting(False, "FSDP2 (fully_shard) instead of DDP")
    vocab_size: int | None = setting(None, "tokenizer vocabulary for a new model (default: the model config's); "
                                           "the embedding pads it to a multiple of 64")
    # the GPU default is above the corpus' size: a GPU run takes all of it
    corpus_mb: float | None = setting(None, "cap on the default corpus, in MB", cpu=8.0, gpu=64.0)
    peak_tflops: float | None = setting(None, "per-device peak TFLOP/s for MFU (default: known GPUs; none on CPU)")
    sample_tokens: int = setting(24, "tokens sampled greedily at each evaluation")
    stop_after: int | None = setting(None, "stop (with a checkpoint) after this step, as if preempted", hidden=True)
    progress: bool = setting(True, "the progress bar")


def resolve_defaults(cfg: TrainConfig, cuda: bool) -> TrainConfig:
    """Fill cfg's None settings in place: the device's values from the fields, then those derived
    from other settings; check what no flag type can."""
    for f in fields(cfg):
        value = f.metadata["gpu" if cuda else "cpu"]
        if value is not None and getattr(cfg, f.name) is None:
            setattr(cfg, f.name, value)
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.init else 2e-3
    if cfg.warmup is None:
        cfg.warmup = min(100, cfg.steps // 10)
    if cfg.eval_every is None:
        cfg.eval_every = max(1, cfg.steps // 5)
    if cfg.save_every is None:
        cfg.save_every = cfg.eval_every
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

    def log(self, *args) -> None:
        if self.master:
            print(*args)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def _rng_states():
    """Every RNG's state as tensors and plain numbers, so a checkpoint loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    s = dict(torch=torch.get_rng_state(),
             numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                        has_gauss=int(has_gauss), gauss=float(gauss)),
             python=dict(version=version, internal=torch.tensor(internal, dtype=torch.int64), gauss=py_gauss))
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_states(s):
    torch.set_rng_state(s["torch"])
    n, p = s["numpy"], s["python"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoint").glob("step_*.pt"))
    return cks[-1] if cks else None


def remove_stale_temps(d: Path) -> None:
    """Temp files of writes a crash interrupted (atomic_write's .NAME.*.tmp)."""
    for tmp in d.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# what a resumed run must share with the run that saved the checkpoint
RESUME_FIELDS = ("model", "init", "data", "vocab_size", "corpus_mb")


def data_fingerprint(data: str | None) -> list | None:
    """(relative path, size, mtime) of the data's files: changed data under the same name shows."""
    if data is None:
        return None
    p = Path(data)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    return [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def check_resume(cfg: TrainConfig, ckpt: dict, path: Path, world: int | None = None) -> None:
    """ValueError naming the first setting where this run (of `world` processes) differs from the
    checkpoint's."""
    saved = ckpt.get("train_config") or {}
    for name in RESUME_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name) and getattr(cfg, name) is not None:
            raise ValueError(f"--resume: {name} is {getattr(cfg, name)!r} but the checkpoint {path} was trained with "
                             f"{saved[name]!r}; use the same settings or another --out")
    # the global batch and each rank's RNG state come from the world size: another one is another run
    if world is not None and "world" in ckpt and ckpt["world"] != world:
        raise ValueError(f"--resume: the world size is {world} but the checkpoint {path} was trained with "
                         f"{ckpt['world']}; resume with {ckpt['world']} processes or use another --out")
    if "data_fingerprint" in ckpt and ckpt["data_fingerprint"] != data_fingerprint(cfg.data):
        raise ValueError(f"--resume: the data at {cfg.data} changed since the checkpoint {path} was saved "
                         "(files, sizes or times differ); use another --out for new data")


def tokenizer_fingerprint(tokenizer) -> dict:
    """What a resumed run checks of the tokenizer: the sha256 of its tokenizer.json (vocabulary,
    merges, normalization, special tokens) and, to say how it differs, its size. The same text maps
    to the same ids only under the same tokenizer, so the saved token shards and weights need it."""
    text = tokenizer._tok.to_str()
    return dict(sha256=hashlib.sha256(text.encode()).hexdigest(), vocab_size=tokenizer.vocab_size)


def check_resume_tokenizer(ckpt: dict, tokenizer, path: Path) -> None:
    """ValueError saying how this run's tokenizer differs from the one the checkpoint was trained with."""
    saved = ckpt.get("tokenizer_fingerprint")
    if not saved:
        return
    now = tokenizer_fingerprint(tokenizer)
    if now["sha256"] == saved.get("sha256"):
        return
    how = (f"{now['vocab_size']} tokens, the checkpoint's {saved.get('vocab_size')}"
           if now["vocab_size"] != saved.get("vocab_size") else
           f"same size ({now['vocab_size']} tokens) but other vocabulary, merges or special tokens")
    raise ValueError(f"--resume: the tokenizer differs from the one the checkpoint {path} was trained with "
                     f"({how}; tokenizer.json sha256 {now['sha256'][:12]} vs {str(saved.get('sha256'))[:12]}); "
                     "use the same tokenizer (--init / OUT/data/tokenizer.json) or another --out")


# --- the trainer ---------------------------------------------------------------------

@dataclass
class Data:
    tokenizer: object  # gpt_engine.tokenizer.Tokenizer
    train: Split
    val: Split


@dataclass
class Modules:
    lm: LMLoss            # holds the parameters: state dicts and the optimizer work on it
    model: nn.Module      # what a training step calls: lm under the cast, DDP or FSDP, and compile
    infer: nn.Module      # eval and sampling: no DDP (no gradients to sync), no compile (shapes change)
    opt: torch.optim.Optimizer
    params: list
    n_params: int         # without the position embedding, for FLOPs per token


TRAIN, VAL = 0, 1  # the data streams: the last word of a batch's rng seed


def train(cfg: TrainConfig) -> Path:
    """Train as cfg says; returns the output directory (an HF-format model directory)."""
    dd = Dist(cfg.device)
    cfg, mcfg, tokenizer, ckpt = setup(cfg, dd)
    data = load_data(cfg, dd, mcfg, tokenizer)
    if ckpt is not None:
        check_resume_tokenizer(ckpt, data.tokenizer, Path(cfg.out) / "checkpoint")
    tok_fp = tokenizer_fingerprint(data.tokenizer)
    m = build(cfg, dd, mcfg, fine_tune=bool(cfg.init) and ckpt is None)
    start = restore(m, ckpt, dd) if ckpt is not None else 0
    del ckpt  # its copy of the weights and optimizer state is not needed any more
    dd.log(describe(cfg, dd, mcfg, m, data, start))
    meter = Meter(cfg, dd, start, flops_per_token(mcfg, m.n_params, cfg.seq_len))
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
    if dist.is_initialized() and dd.world == 1:
        dist.destroy_process_group()
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
    return cfg, mcfg, tokenizer, ckpt


def load_checkpoint(out: Path, dd: Dist, cfg: TrainConfig | None = None) -> dict:
    """The newest readable checkpoint (weights_only: a checkpoint cannot run code); a truncated
    or corrupt newer one is skipped with a warning. With cfg, refuses one from another run."""
    d = out / "checkpoint"
    paths = sorted(d.glob("step_*.pt"), reverse=True)
    if not paths:
        raise FileNotFoundError(f"--resume: no checkpoint under {d}")
    for path in paths:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or "step" not in ckpt or "model" not in ckpt:
                raise ValueError("not a trainer checkpoint")
        except Exception as e:
            msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); trying the previous one"
            warnings.warn(msg, stacklevel=2)
            dd.log("warning: " + msg)
            continue
        if cfg is not None:
            check_resume(cfg, ckpt, path, dd.world)
        dd.log(f"resuming from {path} (step {ckpt['step']})")
        return ckpt
    raise RuntimeError(f"--resume: no readable checkpoint under {d} ({len(paths)} found, all unreadable)")


def model_config(cfg: TrainConfig, ckpt: dict | None):
    """(ModelConfig, tokenizer or None): from --init, from the checkpoint, or new from --model."""
    from ..tokenizer import Tokenizer
    if cfg.init:
        init = Path(cfg.init)
        if not init.is_dir():
            raise FileNotFoundError(f"--init {init} is not a model directory")
        return ModelConfig.load(init), Tokenizer.load(init)
    if ckpt is not None:
        # the size the tokenizer was trained to (the model's is padded): a tokenizer retrained
        # for the resumed run (its data cache gone) then comes out the same
        cfg.vocab_size = cfg.vocab_size or (ckpt.get("train_config") or {}).get("vocab_size")
        return ModelConfig(**ckpt["model_config"]), None
    mcfg = resolve_config(cfg.model, **({"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}))
    # the tokenizer gets the requested size; the embedding rounds up for aligned GEMMs
    cfg.vocab_size = cfg.vocab_size or mcfg.vocab_size
    mcfg.vocab_size = pad_vocab(mcfg.vocab_size)
    return mcfg, None


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


def build(cfg: TrainConfig, dd: Dist, mcfg: ModelConfig, fine_tune: bool) -> Modules:
    """The model (new, or loaded from --init), wrapped for this run, and its optimizer."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if fine_tune:
        from ..models.loader import load_model
        gpt = load_model(cfg.init, device="cpu", dtype=torch.float32).requires_grad_(True)
        gpt.config = mcfg
    else:
        gpt = GPT(mcfg)
    gpt.to(dd.device).train()
    n_params = sum(p.numel() for p in gpt.parameters()) - (gpt.pos_emb.weight.numel() if gpt.pos_emb else 0)
    lm = LMLoss(gpt)
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(gpt, check_fn=_is_block)
    model, infer = wrap(lm, cfg, dd)
    opt, params = make_optimizer(lm, cfg, dd)
    return Modules(lm, model, infer, opt, params, n_params)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


def wrap(lm: LMLoss, cfg: TrainConfig, dd: Dist) -> tuple[nn.Module, nn.Module]:
    """(model for the training step, module for eval and sampling)."""
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    if cfg.fsdp:
        shard(lm, dtype, cfg, dd)
        model = infer = lm
    else:
        model = infer = lm if dtype == torch.float32 else CastParams(lm, dtype)
        if dd.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            model = DDP(model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model, infer


def shard(lm: LMLoss, dtype: torch.dtype, cfg: TrainConfig, dd: Dist) -> None:
    """FSDP2 in place: each block, then the rest; params gathered in dtype, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if dd.world == 1 and not dist.is_initialized():  # FSDP2 needs a process group even for one rank
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + cfg.seed % 1000))
        dist.init_process_group("nccl" if dd.device.type == "cuda" else "gloo", rank=0, world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in lm.gpt.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(lm, mp_policy=mp)


def make_optimizer(lm: LMLoss, cfg: TrainConfig, dd: Dist):
    """AdamW with weight decay on the matrices only; (optimizer, the parameters it steps)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=dd.device.type == "cuda")
    return opt, params


def restore(m: Modules, ckpt: dict, dd: Dist) -> int:
    """Load the checkpoint's weights, optimizer and this rank's RNG states; returns its step."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(m.lm, ckpt["model"], options=full)
    set_optimizer_state_dict(m.lm, m.opt, ckpt["optimizer"], options=full)
    # a checkpoint older than its recorded world size may come from fewer ranks: the extra ones take
    # the last rank's state
    _set_rng_states(ckpt["rng"][min(dd.rank, len(ckpt["rng"]) - 1)])
    return ckpt["step"]


def get_batch(split: Split, stream: int, index: int, rows: int, cfg: TrainConfig, dd: Dist):
    """This rank's share (x, y (rows / world, T) on the device) of a global batch of `rows`
    windows drawn for (seed, index, stream), and the loss tokens in the whole global batch."""
    T = cfg.seq_len
    rng = np.random.default_rng([cfg.seed, index, stream])
    if split.windows is not None:
        return _example_batch(split, rng.integers(0, len(split.windows), size=rows), dd)
    starts = sample_starts(len(split.tokens), rows, T, rng)
    per_rank = len(starts) // dd.world
    x, y = windows(split.tokens, starts[dd.rank * per_rank:(dd.rank + 1) * per_rank], T, split.mask)
    if split.mask is None:
        count = len(starts) * T
    else:  # counted over the global batch, so every rank scales its gradient alike
        count = int(sum(split.mask[s + 1:s + 1 + T].sum() for s in starts))
    return (torch.from_numpy(x).to(dd.device, non_blocking=True),
            torch.from_numpy(y).to(dd.device, non_blocking=True), max(count, 1))


def _example_batch(split: Split, picks: np.ndarray, dd: Dist):
    """get_batch over jsonl examples: one example range (Split.windows) a row, padded to the
    longest row of this rank's share."""
    wins = split.windows[picks]
    per_rank = len(wins) // dd.world
    x, y = example_batch(split.tokens, split.mask, wins[dd.rank * per_rank:(dd.rank + 1) * per_rank])
    count = int(sum(split.mask[s + 1:e].sum() for s, e in wins.tolist()))
    return (torch.from_numpy(x).to(dd.device, non_blocking=True),
            torch.from_numpy(y).to(dd.device, non_blocking=True), max(count, 1))


def train_step(step: int, m: Modules, split: Split, cfg: TrainConfig, dd: Dist):
    """One optimizer step over grad_accum micro-steps; (lr, each micro-step's summed loss, loss tokens)."""
    lr = lr_at(step, cfg)
    for g in m.opt.param_groups:
        g["lr"] = lr
    B, A = cfg.batch_size, cfg.grad_accum
    x, y, count = get_batch(split, TRAIN, step, B * A * dd.world, cfg, dd)
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


def save_checkpoint(step: int, m: Modules, mcfg: ModelConfig, cfg: TrainConfig, dd: Dist,
                    tok_fp: dict | None = None) -> None:
    """OUT/checkpoint/step_N.pt (full state dicts, every rank's RNG); keeps the last cfg.keep."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(m.lm, options=opts)  # collectives under FSDP: every rank calls
    osd = get_optimizer_state_dict(m.lm, m.opt, options=opts)
    rng = [None] * dd.world
    if dd.world > 1:
        dist.all_gather_object(rng, _rng_states())
    else:
        rng = [_rng_states()]
    if dd.master:
        d = Path(cfg.out) / "checkpoint"
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(d)
        state = dict(model=msd, optimizer=osd, step=step, rng=rng, model_config=mcfg.to_dict(),
                     train_config=asdict(cfg), world=dd.world, data_fingerprint=data_fingerprint(cfg.data),
                     tokenizer_fingerprint=tok_fp)
        atomic_write(d / f"step_{step:08d}.pt", functools.partial(torch.save, state))
        for old in sorted(d.glob("step_*.pt"))[:-cfg.keep]:
            old.unlink()
    dd.barrier()


def save_final(m: Modules, mcfg: ModelConfig, tokenizer, cfg: TrainConfig, dd: Dist) -> None:
    """OUT as an HF model directory, and the loss curve beside it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    msd = get_model_state_dict(m.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dd.master:
        out = Path(cfg.out)
        final = GPT(mcfg)
        final.load_state_dict({k.removeprefix("gpt."): v for k, v in msd.items()})
        save_model(final, out, tokenizer)
        plot_loss(out / "log.jsonl", out / "loss.png")
        dd.log(f"saved {out} (HF format) and {out / 'loss.png'}")
    dd.barrier()


def describe(cfg: TrainConfig, dd: Dist, mcfg: ModelConfig, m: Modules, data: Data, start: int) -> str:
    return (f"model {mcfg.model_type} {m.n_params / 1e6:.1f}M params, vocab {mcfg.vocab_size} "
            f"(tokenizer {data.tokenizer.vocab_size}); data {len(data.train.tokens):,} train / "
            f"{len(data.val.tokens):,} val tokens; {dd.world} x {cfg.device or dd.device.type} {cfg.dtype}; "
            f"global batch {cfg.batch_size * cfg.grad_accum * dd.world} x {cfg.seq_len} tokens; "
            f"steps {start}..{cfg.steps}")


class Meter:
    """The progress bar and OUT/log.jsonl: train loss, tokens/s and MFU since the last log line."""

    def __init__(self, cfg: TrainConfig, dd: Dist, start: int, flops_per_tok: float):
        from tqdm import tqdm
        self.dd = dd
        self.path = Path(cfg.out) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if dd.master and start == 0:
            self.path.write_text("")
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * dd.world * cfg.seq_len
        self.flops_per_tok, self.peak = flops_per_tok, peak_flops(cfg, dd.device)
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not (dd.master and cfg.progress), dynamic_ncols=True)
        self.loss = torch.zeros((), dtype=torch.float64, device=dd.device)
        self.count, self.t, self.step, self.train_loss = 0, time.time(), start, float("nan")

    def add(self, losses: list[torch.Tensor], count: int) -> None:
        for loss in losses:
            self.loss += loss
        self.count += count
        self.bar.update(1)

    def log_train(self, done: int, lr: float) -> None:
        self.train_loss = self.dd.sum(self.loss).item() / self.count  # .item() syncs: the time is honest
        tok_s = (done - self.step) * self.tokens_per_step / (time.time() - self.t)
        mfu = tok_s * self.flops_per_tok / (self.peak * self.dd.world) if self.peak else None
        self.bar.set_postfix_str(f"loss {self.train_loss:.3f} lr {lr:.1e} tok/s {tok_s:,.0f} "
                                 f"mfu {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}")
        self.write(dict(step=done, loss=self.train_loss, lr=lr, tok_s=tok_s, mfu=mfu, time=time.time()))
        self.loss.zero_()
        self.count, self.t, self.step = 0, time.time(), done

    def log_eval(self, done: int, val: float, prompt: str, text: str) -> None:
        if self.dd.master:
            self.bar.write(f"step {done}: train loss {self.train_loss:.3f}, val loss {val:.3f} | "
                           f"{prompt!r} -> {text!r}")
        self.write(dict(step=done, val_loss=val, sample=prompt + text))
        self.restart_clock()

    def restart_clock(self) -> None:
        """Evaluation and checkpoint time is not training throughput."""
        self.t = time.time()

    def write(self, rec: dict) -> None:
        if self.dd.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.bar.close()


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
