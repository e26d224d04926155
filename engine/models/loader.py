"""Checkpoints with HF tensor names: what we save HF loads, what HF (and the hub) saves we load.

load_model reads a directory as the hub serves it: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (sharded too, pytorch_model.bin.index.json); weight_files
reads them. GPT-2 and GPT-Neo tensors may carry the `transformer.` prefix or not (the hub's layout, with the
attention's bias / masked_bias mask buffers). The model is built on the meta device and its parameters
allocated once; shards are read one at a time and each tensor lands straight in its slot of the parameters,
so peak memory is the model plus a few MB. Each family's file (families/) holds its table from HF tensor names
to ours (plan), read for loading here and for saving (to_hf, used by save.save_model).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from . import weight_files
from .config import ModelConfig
from .families import FAMILIES
from .families.base import Plan
from .gpt import GPT


def _prefix(cfg: ModelConfig) -> str:
    return FAMILIES[cfg.model_type].PREFIX


def _head(cfg: ModelConfig) -> str:
    return getattr(FAMILIES[cfg.model_type], "HEAD", "lm_head")


def _plan(cfg: ModelConfig) -> tuple[Plan, re.Pattern]:
    """checkpoint tensor name (HF prefix stripped) -> where it goes (the family's table); and the names to skip
    (buffers, and a tied head that some checkpoints store anyway)."""
    plan, skip = FAMILIES[cfg.model_type].plan(cfg)
    if cfg.tie_embeddings:
        skip += rf"|{_head(cfg)}\.weight"
    else:
        plan.whole(_head(cfg), "lm_head", ("weight", "bias") if cfg.head_bias else ("weight",))
    return plan, re.compile(skip)


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters under their HF names and layouts."""
    cfg, sd = model.config, model.state_dict()
    plan, _ = _plan(cfg)
    unmapped = set(sd) - {target[0] for target in plan.values()}
    assert not unmapped, unmapped  # the table names every parameter
    out = {}
    for name, (pname, rows, transposed, order) in plan.items():
        t = sd[pname] if rows is None else sd[pname][rows[0]:rows[1]]
        t = t if order is None else t[order.to(t.device)]
        out[name if name.startswith(_head(cfg) + ".") else _prefix(cfg) + name] = t.t() if transposed else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def _strip(cfg: ModelConfig, name: str) -> str:
    return name if name.startswith(_head(cfg) + ".") else name.removeprefix(_prefix(cfg))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF-format model directory (see the module docstring for the layouts); dtype None keeps the
    checkpoint's."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    cfg = ModelConfig.load(d)  # validated before anything large is allocated
    files = weight_files.checkpoint_files(d)
    # a config.json whose sizes the weight files cannot hold is refused before the model is built: its lie
    # would otherwise size the allocation (or the module construction, for absurd layer counts)
    if cfg.n_params > weight_files.stored_bytes(files):
        raise ValueError(f"{d / 'config.json'} describes a model of {cfg.n_params:,} parameters but its weight files "
                         f"hold {weight_files.stored_bytes(files):,} bytes (vocab_size {cfg.vocab_size}, n_layer "
                         f"{cfg.n_layer}, d_model {cfg.d_model}, d_ff {cfg.d_ff}): the config does not match them")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dtype = dtype or weight_files.first_dtype(files[0])
    device = torch.device(device)
    with torch.device("meta"):
        model = GPT(cfg)
    params = dict(model.named_parameters())
    plan, skip = _plan(cfg)
    unknown = [n for n in plan if plan[n][0] not in params]
    assert not unknown, unknown  # the plan only names parameters the model has
    # parameters allocated once, in the target dtype on the target device; each tensor lands in its rows
    dest = {n: torch.empty(p.shape, dtype=dtype, device=device) for n, p in params.items()}
    seen: set[str] = set()
    for f in files:
        for raw, src in weight_files.iter_tensors(f):
            name = _strip(cfg, raw)
            if name not in plan:
                if skip.fullmatch(name):
                    continue
                raise ValueError(f"{f}: unexpected tensor {raw!r} for a {cfg.model_type} model "
                                 f"({cfg.n_layer} layers)")
            if name in seen:
                raise ValueError(f"{f}: tensor {raw!r} appears twice in the checkpoint")
            pname, rows, transposed, order = plan[name]
            out = dest[pname] if rows is None else dest[pname][rows[0]:rows[1]]
            want = tuple(out.shape)[::-1] if transposed else tuple(out.shape)
            if tuple(src.shape) != want:
                raise ValueError(f"{f}: tensor {raw!r} has shape {tuple(src.shape)}, expected {want} "
                                 "for its config.json")
            if src.dtype is None or not src.dtype.is_floating_point:
                raise ValueError(f"{f}: tensor {raw!r} has dtype {getattr(src, 'st_dtype', src.dtype)}, "
                                 "expected a floating type")
            src.copy_to(out, transposed, order)
            seen.add(name)
    missing = [n for n in plan if n not in seen]
    if missing:
        raise ValueError(f"{d}: the weight files ({', '.join(f.name for f in files)}) are missing tensor(s) "
                         f"{missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(dest, strict=True, assign=True)
    # buffers (rotary tables) are not in the checkpoint: rebuild them off the meta device
    for mod in model.modules():
        if hasattr(mod, "cos") and mod.cos.is_meta:
            fresh = type(mod)(cfg)
            mod.cos, mod.sin = fresh.cos, fresh.sin
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
