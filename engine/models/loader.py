"""Checkpoints with HF tensor names: what we save HF loads, what HF (and the hub) saves we load.

load_model reads a directory as the hub serves it: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (sharded too, pytorch_model.bin.index.json); weight_files
reads them. GPT-2 and GPT-Neo tensors may carry the `transformer.` prefix or not (the hub's layout, with the
attention's bias / masked_bias mask buffers). The model is built on the meta device and its parameters
allocated once; shards are read one at a time and each tensor lands straight in its slot of the parameters,
so peak memory is the model plus a few MB. One table per family (_plan) maps HF tensor names to ours, for
loading here and for saving (to_hf, used by save.save_model).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from . import weight_files
from .config import ModelConfig
from .gpt import GPT


# Each family's tensor names: HF name (without its `transformer.` / `model.` prefix) -> (our parameter, the rows
# it fills or None for all, stored transposed as GPT-2's Conv1D stores its weights). Loading and saving both
# read this one table.
_Target = tuple[str, "tuple[int, int] | None", bool]


def _prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.rotary else "transformer."


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def _split(plan: dict, names, ours: str, sizes, kinds=("weight",)) -> None:
    """HF's separate tensors `names` (e.g. q/k/v) filling consecutive row ranges of our fused parameter."""
    for kind in kinds:
        start = 0
        for name, n in zip(names, sizes):
            plan[f"{name}.{kind}"] = (f"{ours}.{kind}", (start, start + n), False)
            start += n


def _plan(cfg: ModelConfig) -> tuple[dict[str, _Target], re.Pattern]:
    """checkpoint tensor name (HF prefix stripped) -> where it goes; and the names to skip (buffers)."""
    plan: dict[str, _Target] = {}

    def whole(theirs, ours, kinds=("weight", "bias"), transposed=False):
        for kind in kinds:
            plan[f"{theirs}.{kind}"] = (f"{ours}.{kind}", None, transposed and kind == "weight")

    if not cfg.rotary:  # gpt2, gpt_neo
        whole("wte", "tok_emb", ("weight",))
        whole("wpe", "pos_emb", ("weight",))
        whole("ln_f", "norm_f")
        conv1d = cfg.model_type == "gpt2"
        for i in range(cfg.n_layer):
            h, p = f"h.{i}.", f"layers.{i}."
            whole(h + "ln_1", p + "norm1")
            whole(h + "ln_2", p + "norm2")
            whole(h + "mlp.c_fc", p + "mlp.fc", transposed=conv1d)
            whole(h + "mlp.c_proj", p + "mlp.proj", transposed=conv1d)
            if conv1d:
                whole(h + "attn.c_attn", p + "attn.qkv", transposed=True)
                whole(h + "attn.c_proj", p + "attn.proj", transposed=True)
            else:
                _split(plan, [h + f"attn.attention.{x}_proj" for x in "qkv"], p + "attn.qkv", _qkv_sizes(cfg))
                whole(h + "attn.attention.out_proj", p + "attn.proj")
        skip = r"h\.\d+\.attn\.(attention\.)?(bias|masked_bias)"  # causal-mask buffers of older checkpoints
    else:
        whole("embed_tokens", "tok_emb", ("weight",))
        whole("norm", "norm_f", ("weight",))
        qkv_kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        for i in range(cfg.n_layer):
            h, p = f"layers.{i}.", f"layers.{i}."
            whole(h + "input_layernorm", p + "norm1", ("weight",))
            whole(h + "post_attention_layernorm", p + "norm2", ("weight",))
            _split(plan, [h + f"self_attn.{x}_proj" for x in "qkv"], p + "attn.qkv", _qkv_sizes(cfg), qkv_kinds)
            whole(h + "self_attn.o_proj", p + "attn.proj", ("weight",))
            _split(plan, [h + "mlp.gate_proj", h + "mlp.up_proj"], p + "mlp.fc", [cfg.d_ff, cfg.d_ff])
            whole(h + "mlp.down_proj", p + "mlp.proj", ("weight",))
        skip = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    if cfg.tie_embeddings:
        skip += r"|lm_head\.weight"
    else:
        plan["lm_head.weight"] = ("lm_head.weight", None, False)
    return plan, re.compile(skip)


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters under their HF names and layouts."""
    cfg, sd = model.config, model.state_dict()
    plan, _ = _plan(cfg)
    unmapped = set(sd) - {pname for pname, _, _ in plan.values()}
    assert not unmapped, unmapped  # the table names every parameter
    out = {}
    for name, (pname, rows, transposed) in plan.items():
        t = sd[pname] if rows is None else sd[pname][rows[0]:rows[1]]
        out[name if name.startswith("lm_head.") else _prefix(cfg) + name] = t.t() if transposed else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def _strip(cfg: ModelConfig, name: str) -> str:
    return name.removeprefix(_prefix(cfg))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF-format model directory (see the module docstring for the layouts); dtype None keeps the
    checkpoint's."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    cfg = ModelConfig.load(d)  # validated before anything large is allocated
    files = weight_files.checkpoint_files(d)
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
                raise ValueError(f"{f.name}: unexpected tensor {raw!r} for a {cfg.model_type} model "
                                 f"({cfg.n_layer} layers)")
            if name in seen:
                raise ValueError(f"tensor {raw!r} appears twice in the checkpoint")
            pname, rows, transposed = plan[name]
            out = dest[pname] if rows is None else dest[pname][rows[0]:rows[1]]
            want = tuple(out.shape)[::-1] if transposed else tuple(out.shape)
            if tuple(src.shape) != want:
                raise ValueError(f"tensor {raw!r} has shape {tuple(src.shape)}, expected {want}")
            if src.dtype is None or not src.dtype.is_floating_point:
                raise ValueError(f"tensor {raw!r} has dtype {getattr(src, 'st_dtype', src.dtype)}, "
                                 "expected a floating type")
            src.copy_to(out, transposed)
            seen.add(name)
    missing = [n for n in plan if n not in seen]
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(dest, strict=True, assign=True)
    # buffers (rotary tables) are not in the checkpoint: rebuild them off the meta device
    for mod in model.modules():
        if hasattr(mod, "cos") and mod.cos.is_meta:
            fresh = type(mod)(cfg)
            mod.cos, mod.sin = fresh.cos, fresh.sin
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def from_hf(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors (either GPT-2 layout) -> our state dict; raises ValueError naming any missing tensor."""
    plan, _ = _plan(cfg)
    got = {_strip(cfg, k): v for k, v in t.items()}
    missing = [n for n in plan if n not in got]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r}")
    parts: dict[str, list] = {}
    for name, (pname, rows, transposed) in plan.items():
        parts.setdefault(pname, []).append((rows[0] if rows else 0, got[name].t() if transposed else got[name]))
    return {k: torch.cat([x for _, x in sorted(v, key=lambda r: r[0])]).contiguous() for k, v in parts.items()}
