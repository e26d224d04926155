"""model.safetensors with HF tensor names: what we save HF loads, what HF saves we load."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

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
            q, k, v = sd[f"layers.{i}.attn.qkv.weight"].split(
                [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim])
            gate, up = sd[f"layers.{i}.mlp.fc.weight"].chunk(2)
            out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                        p + "self_attn.v_proj.weight": v, p + "mlp.gate_proj.weight": gate,
                        p + "mlp.up_proj.weight": up})
    prefix = "transformer.ln_f" if gpt2 else "model.norm"
    out[prefix + ".weight"] = sd["norm_f.weight"]
    if gpt2:
        out[prefix + ".bias"] = sd["norm_f.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict; raises ValueError naming any missing tensor."""
    def get(name):
        if name not in t:
            raise ValueError(f"checkpoint is missing tensor {name!r}")
        return t[name]

    gpt2 = cfg.model_type == "gpt2"
    sd = {"tok_emb.weight": get("transformer.wte.weight" if gpt2 else "model.embed_tokens.weight")}
    if gpt2:
        sd["pos_emb.weight"] = get("transformer.wpe.weight")
    for i in range(cfg.n_layer):
        for ours, theirs in _hf_layer_names(cfg, i).items():
            sd[f"layers.{i}.{ours}.weight"] = get(theirs + ".weight")
            if gpt2:
                sd[f"layers.{i}.{ours}.bias"] = get(theirs + ".bias")
                if "norm" not in ours:
                    sd[f"layers.{i}.{ours}.weight"] = sd[f"layers.{i}.{ours}.weight"].t().contiguous()
        if not gpt2:
            p = f"model.layers.{i}."
            sd[f"layers.{i}.attn.qkv.weight"] = torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            sd[f"layers.{i}.mlp.fc.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
    prefix = "transformer.ln_f" if gpt2 else "model.norm"
    sd["norm_f.weight"] = get(prefix + ".weight")
    if gpt2:
        sd["norm_f.bias"] = get(prefix + ".bias")
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    return sd


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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF-format directory (config.json + model.safetensors) of a gpt2 or llama model."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    cfg = ModelConfig.load(d)
    st = d / "model.safetensors"
    if not st.is_file():
        raise FileNotFoundError(f"{d} has no model.safetensors")
    with safe_open(st, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = GPT(cfg)
    sd = from_hf(cfg, tensors)
    model.load_state_dict(sd, strict=False, assign=True)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint did not fill {missing[:5]}")
    # buffers (rotary tables) are not in the checkpoint: rebuild them off the meta device
    for mod in model.modules():
        if hasattr(mod, "cos") and mod.cos.is_meta:
            fresh = type(mod)(cfg)
            mod.cos, mod.sin = fresh.cos, fresh.sin
    dtype = dtype or next(iter(tensors.values())).dtype
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
