"""Checkpoints with HF tensor names: what we save HF loads, what HF (and the hub) saves we load.

load_model reads a directory as the hub serves it: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (sharded too, pytorch_model.bin.index.json) read with
torch.load(weights_only=True). GPT-2 tensors may carry the `transformer.` prefix or not (the hub's layout, with
its attn.bias / attn.masked_bias mask buffers). Shards are read one at a time, each tensor copied straight into
its slot of the preallocated parameters, so peak memory is the model plus one tensor (safetensors are mmapped).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import GPT


def _hf_layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """our name -> HF name for layer i (GPT-2's fused c_attn/c_fc match our fused linears)."""
    if cfg.model_type == "gpt2":
        p = f"transformer.h.{i}."
        return {"norm1": p + "ln_1", "attn.qkv": p + "attn.c_attn", "attn.proj": p + "attn.c_proj",
                "norm2": p + "ln_2", "mlp.fc": p + "mlp.c_fc", "mlp.proj": p + "mlp.c_proj"}
    p = f"model.layers.{i}."
    return {"norm1": p + "input_layernorm", "norm2": p + "post_attention_layernorm",
            "attn.proj": p + "self_attn.o_proj", "mlp.proj": p + "mlp.down_proj"}


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    gpt2 = cfg.model_type == "gpt2"
    out = {"transformer.wte.weight" if gpt2 else "model.embed_tokens.weight": sd["tok_emb.weight"]}
    if gpt2:
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in _hf_layer_names(cfg, i).items():
            for kind in ("weight", "bias"):
                t = sd.get(f"layers.{i}.{ours}.{kind}")
                if t is not None:  # GPT-2's Conv1D stores linear weights as (in, out)
                    out[f"{theirs}.{kind}"] = t.t() if gpt2 and kind == "weight" and "norm" not in ours else t
        if not gpt2:
            p = f"model.layers.{i}."
            for kind in ("weight", "bias"):
                t = sd.get(f"layers.{i}.attn.qkv.{kind}")
                if t is not None:
                    for x, part in zip("qkv", t.split(_qkv_sizes(cfg))):
                        out[p + f"self_attn.{x}_proj.{kind}"] = part
            gate, up = sd[f"layers.{i}.mlp.fc.weight"].chunk(2)
            out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
    prefix = "transformer.ln_f" if gpt2 else "model.norm"
    out[prefix + ".weight"] = sd["norm_f.weight"]
    if gpt2:
        out[prefix + ".bias"] = sd["norm_f.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


# --- reading ------------------------------------------------------------------------------
# (our parameter, rows it fills or None for all, stored transposed (GPT-2 Conv1D))
_Target = tuple[str, "tuple[int, int] | None", bool]


def _plan(cfg: ModelConfig) -> tuple[dict[str, _Target], re.Pattern]:
    """checkpoint tensor name (HF prefix stripped) -> where it goes; and the names to skip (buffers)."""
    plan: dict[str, _Target] = {}
    if cfg.model_type == "gpt2":
        plan["wte.weight"], plan["wpe.weight"] = ("tok_emb.weight", None, False), ("pos_emb.weight", None, False)
        for i in range(cfg.n_layer):
            for ours, theirs in _hf_layer_names(cfg, i).items():
                theirs = theirs.removeprefix("transformer.")
                plan[theirs + ".weight"] = (f"layers.{i}.{ours}.weight", None, "norm" not in ours)
                plan[theirs + ".bias"] = (f"layers.{i}.{ours}.bias", None, False)
        plan["ln_f.weight"], plan["ln_f.bias"] = ("norm_f.weight", None, False), ("norm_f.bias", None, False)
        skip = r"h\.\d+\.attn\.(bias|masked_bias)"
    else:
        plan["embed_tokens.weight"] = ("tok_emb.weight", None, False)
        sizes, f = _qkv_sizes(cfg), cfg.d_ff
        for i in range(cfg.n_layer):
            for ours, theirs in _hf_layer_names(cfg, i).items():
                plan[theirs.removeprefix("model.") + ".weight"] = (f"layers.{i}.{ours}.weight", None, False)
            p, start = f"layers.{i}.", 0
            for x, n in zip("qkv", sizes):
                plan[p + f"self_attn.{x}_proj.weight"] = (f"layers.{i}.attn.qkv.weight", (start, start + n), False)
                if cfg.qkv_bias:
                    plan[p + f"self_attn.{x}_proj.bias"] = (f"layers.{i}.attn.qkv.bias", (start, start + n), False)
                start += n
            plan[p + "mlp.gate_proj.weight"] = (f"layers.{i}.mlp.fc.weight", (0, f), False)
            plan[p + "mlp.up_proj.weight"] = (f"layers.{i}.mlp.fc.weight", (f, 2 * f), False)
        plan["norm.weight"] = ("norm_f.weight", None, False)
        skip = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    if cfg.tie_embeddings:
        skip += r"|lm_head\.weight"
    else:
        plan["lm_head.weight"] = ("lm_head.weight", None, False)
    return plan, re.compile(skip)


def _checkpoint_files(d: Path) -> list[Path]:
    """The weight files of a model directory, in the order to read them."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            try:
                weight_map = json.loads((d / index).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{d / index} is not a valid shard index: {e!r}") from None
            for name in files:
                if not isinstance(name, str) or Path(name).name != name:
                    raise ValueError(f"{d / index}: bad shard file name {name!r}")
                if not (d / name).is_file():
                    raise FileNotFoundError(f"{d / index} names {name}, which is missing")
            return [d / n for n in files]
    raise FileNotFoundError(f"{d} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            "or pytorch_model.bin.index.json")


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, one tensor at a time where the format allows."""
    if path.name.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
        return
    try:  # never unpickle code; mmap keeps a .bin shard out of memory until read
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialization cannot be mmapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    while sd:
        k, t = sd.popitem()
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor")
        yield k, t


def _first_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a weight file (cheap for safetensors)."""
    tensors = _iter_tensors(path)
    try:
        for _, t in tensors:
            if t.is_floating_point():
                return t.dtype
        return torch.float32
    finally:
        tensors.close()


def _strip(cfg: ModelConfig, name: str) -> str:
    prefix = "transformer." if cfg.model_type == "gpt2" else "model."
    return name.removeprefix(prefix)


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF-format model directory (see the module docstring for the layouts); dtype None keeps the
    checkpoint's."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    cfg = ModelConfig.load(d)  # validated before anything large is allocated
    files = _checkpoint_files(d)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dtype = dtype or _first_dtype(files[0])
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
        for raw, t in _iter_tensors(f):
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
            src = t.t() if transposed else t
            if tuple(src.shape) != tuple(out.shape):
                want = tuple(out.shape)[::-1] if transposed else tuple(out.shape)
                raise ValueError(f"tensor {raw!r} has shape {tuple(t.shape)}, expected {want}")
            if not t.is_floating_point():
                raise ValueError(f"tensor {raw!r} has dtype {t.dtype}, expected a floating type")
            out.copy_(src)
            seen.add(name)
            del t, src
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


# --- writing ------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path, so a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: GPT, directory: str | Path, tokenizer=None) -> None:
    """Write an HF-format directory: config.json, model.safetensors [, tokenizer.json]."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu") for k, v in to_hf(model).items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = json.dumps(model.config.to_hf(), indent=2)
    atomic_write(d / "config.json", lambda p: Path(p).write_text(config))
    if tokenizer is not None:
        tokenizer.save(d)
