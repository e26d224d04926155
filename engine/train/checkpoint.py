"""Checkpoints: the resumable state under OUT/checkpoint/, the checks a resume passes, the final model.

OUT/checkpoint/step_N.pt holds full (unsharded) state dicts, the step and every rank's RNG
states, as tensors and plain values only, so it loads with weights_only=True: a checkpoint
cannot run code. Writes are atomic (a crash leaves the previous checkpoint), and a truncated or
corrupt newest one is skipped for the one before.

A resumed run must be the run that saved the checkpoint: the same settings that shape the data
and the model (RESUME_FIELDS), the same world size (the global batch and each rank's RNG state
come from it), the same data files and the same tokenizer; anything else is refused with a
ValueError naming what differs.

At the end OUT itself becomes an HF-format model directory (save_final).
"""
from __future__ import annotations

import functools
import hashlib
import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from ..atomic import atomic_write, remove_stale_temps
from ..models.config import ModelConfig
from ..models.gpt import GPT
from ..models.save import save_model
from . import lora
from .config import TrainConfig
from .distributed import Dist
from .metrics import LOG_FILE, PLOT_FILE, plot_loss

if TYPE_CHECKING:
    from .model import Modules

# what a resumed run must share with the run that saved the checkpoint
RESUME_FIELDS = ("model", "init", "data", "vocab_size", "corpus_mb")
# a LoRA run's adapters: equal or both unset (a resume without --lora-rank is not this run)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_base_dtype")


# --- RNG states --------------------------------------------------------------------------

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


# --- files under OUT/checkpoint ------------------------------------------------------------

def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoint"


def checkpoints(out: str | Path) -> list[Path]:
    """OUT's checkpoints, oldest first (the zero-padded step sorts by name)."""
    return sorted(checkpoint_dir(out).glob("step_*.pt"))


def latest_checkpoint(out: Path) -> Path | None:
    cks = checkpoints(out)
    return cks[-1] if cks else None


# --- resume checks -----------------------------------------------------------------------

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
    for name in LORA_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--resume: {flag} is {getattr(cfg, name)!r} but the checkpoint {path} was trained "
                             f"with {saved[name]!r}; use the same LoRA settings or another --out")
    if "init_fingerprint" in ckpt and ckpt["init_fingerprint"] != data_fingerprint(cfg.init):
        raise ValueError(f"--resume: the base model at {cfg.init} changed since the checkpoint {path} (holding "
                         "LoRA adapters only) was saved; resume on the same base or use another --out")
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


# --- load, restore, save -------------------------------------------------------------------

def load_checkpoint(out: Path, dd: Dist, cfg: TrainConfig | None = None) -> dict:
    """The newest readable checkpoint (weights_only: a checkpoint cannot run code); a truncated
    or corrupt newer one is skipped with a warning. With cfg, refuses one from another run."""
    paths = checkpoints(out)[::-1]
    if not paths:
        raise FileNotFoundError(f"--resume: no checkpoint under {checkpoint_dir(out)}")
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
    raise RuntimeError(f"--resume: no readable checkpoint under {checkpoint_dir(out)} "
                       f"({len(paths)} found, all unreadable)")


def restore(m: Modules, ckpt: dict, dd: Dist) -> int:
    """Load the checkpoint's weights, optimizer and this rank's RNG states; returns its step."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    # a LoRA checkpoint holds the adapters only: the frozen base came from --init
    full = StateDictOptions(full_state_dict=True, strict=not ckpt.get("adapters_only"))
    set_model_state_dict(m.lm, ckpt["model"], options=full)
    set_optimizer_state_dict(m.lm, m.opt, ckpt["optimizer"], options=full)
    # a checkpoint older than its recorded world size may come from fewer ranks: the extra ones take
    # the last rank's state
    _set_rng_states(ckpt["rng"][min(dd.rank, len(ckpt["rng"]) - 1)])
    return ckpt["step"]


def save_checkpoint(step: int, m: Modules, mcfg: ModelConfig, cfg: TrainConfig, dd: Dist,
                    tok_fp: dict | None = None) -> None:
    """OUT/checkpoint/step_N.pt (full state dicts, every rank's RNG); keeps the last cfg.keep."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(m.lm, options=opts)  # collectives under FSDP: every rank calls
    if cfg.lora_rank:  # the adapters only: the frozen base is --init's
        msd = {k: v for k, v in msd.items() if lora.is_adapter(k)}
    osd = get_optimizer_state_dict(m.lm, m.opt, options=opts)
    rng = [None] * dd.world
    if dd.world > 1:
        dist.all_gather_object(rng, _rng_states())
    else:
        rng = [_rng_states()]
    if dd.master:
        d = checkpoint_dir(cfg.out)
        d.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(d)
        state = dict(model=msd, optimizer=osd, step=step, rng=rng, model_config=mcfg.to_dict(),
                     train_config=asdict(cfg), world=dd.world, data_fingerprint=data_fingerprint(cfg.data),
                     tokenizer_fingerprint=tok_fp)
        if cfg.lora_rank:
            state.update(adapters_only=True, init_fingerprint=data_fingerprint(cfg.init))
        atomic_write(d / f"step_{step:08d}.pt", functools.partial(torch.save, state))
        for old in checkpoints(cfg.out)[:-cfg.keep]:
            old.unlink()
    dd.barrier()


def save_final(m: Modules, mcfg: ModelConfig, tokenizer, cfg: TrainConfig, dd: Dist) -> None:
    """OUT as an HF model directory (a LoRA run: a PEFT adapter directory, or with --merge the merged model),
    and the loss curve beside it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    msd = get_model_state_dict(m.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dd.master:
        out = Path(cfg.out)
        remove_stale_temps(out)  # of an export a kill interrupted
        if cfg.lora_rank:
            save_lora(msd, mcfg, tokenizer, cfg)
        else:
            final = GPT(mcfg)
            final.load_state_dict({k.removeprefix("gpt."): v for k, v in msd.items()})
            save_model(final, out, tokenizer)
        plot_loss(out / LOG_FILE, out / PLOT_FILE)
        kind = "a PEFT LoRA adapter" if cfg.lora_rank and not cfg.merge else "HF format"
        dd.log(f"saved {out} ({kind}) and {out / PLOT_FILE}")
    dd.barrier()


def save_lora(msd: dict, mcfg: ModelConfig, tokenizer, cfg: TrainConfig) -> None:
    """A LoRA run's OUT: the PEFT adapter directory (and the tokenizer), or with --merge the float32 --init model
    with the adapters merged in."""
    from ..models.loader import load_model
    t = lora.targets(mcfg, lora.parse_targets(cfg.lora_targets))
    out = Path(cfg.out)
    if cfg.merge:
        base = load_model(cfg.init, dtype=torch.float32)
        base.config = mcfg
        save_model(lora.merge(base, msd, t, cfg.lora_rank, cfg.lora_alpha, prefix="gpt."), out, tokenizer)
        return
    lora.save_adapter(out, msd, t, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, str(cfg.init), prefix="gpt.")
    tokenizer.save(out)
