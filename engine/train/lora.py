"""LoRA training: low-rank adapters on a frozen base, saved as a PEFT adapter directory (or merged).

Targets are short names (q, k, v, o, gate, up, down) over our layers: q/k/v are row ranges of the fused
attn.qkv, o is attn.proj, gate/up the halves of a gated mlp.fc (the whole fc of a plain MLP: up), down is
mlp.proj. PEFT adapts HF modules, so each short name maps onto the HF modules whose rows it touches, read
from the family's tensor plan (families/*.py): llama's q lands on self_attn.q_proj alone, but GPT-2 fuses
q, k and v in one c_attn (a Conv1D), so any of q, k, v adapts the whole c_attn (one A, one B over all its
rows), as PEFT would. One adapter (A (r, d_in), B (rows, r)) per HF module keeps the saved tensors exactly
PEFT's, whatever the fusion on our side.

    delta(x) = dropout(x) @ A^T * alpha / r @ B^T      added to the module's rows before its activation

A LoRALinear replaces each targeted Linear and keeps its parameter names, so state dicts, the HF saver and
the weight formats see the same model. The frozen base may be held in bf16 or int8 (QLoRA-style): the layers'
GEMM weights then live in a weight format (models/formats.py) without a float parameter.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt_engine.kernels.reference import ACTIVATIONS

from ..models.config import ModelConfig
from ..models.families import FAMILIES
from ..models.formats import Dense, Int8, Stored, weight_format
from ..models.gpt import GPT
from ..models.layers import Linear
from ..models.lora import CONFIG as ADAPTER_CONFIG, PEFT_PREFIX, SAFETENSORS as ADAPTER_WEIGHTS, gemm_plan
from ..atomic import atomic_write

SHORT_NAMES = ("q", "k", "v", "o", "gate", "up", "down")
BASE_DTYPES = ("float32", "bfloat16", "int8")


@dataclass
class Piece:
    """One HF module a LoRALinear adapts: rows [start, end) of our fused weight."""
    hf: str                          # its full HF module path, e.g. model.layers.0.self_attn.q_proj
    rows: tuple[int, int]
    order: torch.Tensor | None       # the loader's row order: HF row j is our row start + order[j]
    conv1d: bool                     # a GPT-2 Conv1D (PEFT's fan_in_fan_out)


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in SHORT_NAMES]
    if bad or not names:
        raise ValueError(f"--lora-targets: unknown target(s) {bad or [text]}; use a comma-separated subset of "
                         f"{','.join(SHORT_NAMES)}")
    return names


def _parts(cfg: ModelConfig) -> tuple[dict[str, tuple[str, tuple[int, int]]], dict[str, int]]:
    """(short name -> (our module inside a layer, its rows of that module's weight), module -> its rows)."""
    q, kv, ff, c = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff, cfg.d_model
    gated = cfg.mlp == "gated"
    parts = {"q": ("attn.qkv", (0, q)), "k": ("attn.qkv", (q, q + kv)), "v": ("attn.qkv", (q + kv, q + 2 * kv)),
             "o": ("attn.proj", (0, c)), "down": ("mlp.proj", (0, c))}
    if gated:  # fc holds [gate | up]
        parts.update(gate=("mlp.fc", (0, ff)), up=("mlp.fc", (ff, 2 * ff)))
    else:
        parts.update(up=("mlp.fc", (0, ff)))
    return parts, {"attn.qkv": q + 2 * kv, "attn.proj": c, "mlp.fc": (1 + gated) * ff, "mlp.proj": c}


def targets(cfg: ModelConfig, names: list[str]) -> dict[str, list[Piece]]:
    """our module path (layers.i.attn.qkv) -> the HF modules adapted there, in row order: from the family's
    tensor plan, every HF module whose rows overlap a named part's rows."""
    parts, sizes = _parts(cfg)
    lacking = [n for n in names if n not in parts]
    if lacking:
        raise ValueError(f"--lora-targets: a {cfg.model_type} model has no {','.join(lacking)} projection "
                         f"(it has {','.join(n for n in SHORT_NAMES if n in parts)})")
    prefix = FAMILIES[cfg.model_type].PREFIX
    wanted = [parts[n] for n in names]
    out: dict[str, list[Piece]] = {}
    for module, entries in gemm_plan(cfg).items():
        local = module.split(".", 2)[2]  # attn.qkv
        for hf, rows, transposed, order in entries:
            rows = rows or (0, sizes[local])
            if any(mod == local and s < rows[1] and rows[0] < e for mod, (s, e) in wanted):
                out.setdefault(module, []).append(Piece(prefix + hf, rows, order, transposed))
    return out


def target_modules(t: dict[str, list[Piece]]) -> list[str]:
    """adapter_config's target_modules: each HF module's path inside its layer (self_attn.q_proj, attn.c_proj),
    so that PEFT's suffix match cannot take GPT-2's mlp.c_proj for attn.c_proj."""
    return sorted({re.sub(r"^.*?\.\d+\.", "", p.hf) for ps in t.values() for p in ps})


class LoRALinear(Linear):
    """A Linear (its parameters taken over, names kept) plus one trainable adapter per HF module it holds."""

    def __init__(self, base: Linear, pieces: list[Piece], rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not Linear's: it would allocate a weight that base already has
        self.weight, self.bias = base.weight, base.bias
        self.in_features, self.activation, self.reduce = base.in_features, base.activation, None
        self.format = Dense(self)
        self.pieces, self.scaling, self.d_out = pieces, alpha / rank, base.weight.shape[0]
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        w = base.weight
        # PEFT's init: A kaiming-uniform (a = sqrt(5)), B zeros, so training starts at the base model
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(rank, self.in_features, device=w.device))
                                       for _ in pieces)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(e - s, rank, device=w.device))
                                       for s, e in (p.rows for p in pieces))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x, lora=None):
        # x (..., K) -> (..., N): the base GEMM plus u @ B_all^T in one addmm, then the activation (lora: the
        # serving engine's per-token adapters, which a training model never has)
        y = self.format.apply(x, self.bias, None)
        u = torch.cat([self.dropout(x) @ a.t() for a in self.lora_A], dim=-1) * self.scaling  # (..., P * r)
        y = torch.addmm(y.flatten(0, -2), u.flatten(0, -2), self.stacked_b().t()).view_as(y)
        return ACTIVATIONS[self.activation](y)

    def stacked_b(self) -> torch.Tensor:
        """(N, P * r): adapter i's B in its rows and its own r columns, zeros elsewhere (rows no adapter
        covers, as llama's k between adapted q and v)."""
        r, n = self.lora_A[0].shape[0], len(self.pieces)
        blocks, at = [], 0
        for i, (p, b) in enumerate(zip(self.pieces, self.lora_B)):
            if p.rows[0] > at:
                blocks.append(b.new_zeros(p.rows[0] - at, n * r))
            blocks.append(F.pad(b, (i * r, (n - 1 - i) * r)))
            at = p.rows[1]
        if at < self.d_out:
            blocks.append(blocks[-1].new_zeros(self.d_out - at, n * r))
        return torch.cat(blocks)


def apply(gpt: GPT, names: list[str], rank: int, alpha: float | None, dropout: float,
          base_dtype: str = "float32") -> dict[str, list[Piece]]:
    """Freeze gpt, put adapters on the targeted Linears (in place, on their device) and hold the layers' GEMM
    weights in base_dtype; returns the targets."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"--lora-base-dtype must be {' or '.join(BASE_DTYPES)}, got {base_dtype!r}")
    t = targets(gpt.config, names)
    gpt.requires_grad_(False)
    for path, pieces in t.items():
        parent, _, leaf = path.rpartition(".")
        owner = gpt.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), pieces, rank, alpha or rank, dropout))
    if base_dtype != "float32":  # the frozen GEMM weights in bf16 / int8 only; embeddings, norms, head stay float
        for lin in gpt.linears():
            lin.format = weight_format(lin, torch.bfloat16 if base_dtype == "bfloat16" else None,
                                       "int8" if base_dtype == "int8" else None, release=True)
    return t


def move_formats(gpt: GPT, device: torch.device) -> None:
    """The layers' weights held in a released format (a bf16 / int8 base) onto device: module.to() moves
    parameters only."""
    for lin in gpt.linears():
        f = lin.format
        if isinstance(f, Stored):
            lin.format = Stored(f.w.to(device))
        elif isinstance(f, Int8) and f.released:
            lin.format = Int8(f.q._replace(q=f.q.q.to(device), scale=f.q.scale.to(device)))


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def to_peft(sd: dict[str, torch.Tensor], t: dict[str, list[Piece]], prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapters of a state dict (our names, under `prefix`) as PEFT saves them: one lora_A / lora_B pair per
    HF module, B's rows in HF's order."""
    out = {}
    for path, pieces in t.items():
        for i, p in enumerate(pieces):
            a, b = sd[f"{prefix}{path}.lora_A.{i}"], sd[f"{prefix}{path}.lora_B.{i}"]
            out[f"{PEFT_PREFIX}{p.hf}.lora_A.weight"] = a
            out[f"{PEFT_PREFIX}{p.hf}.lora_B.weight"] = b if p.order is None else b[p.order]
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def adapter_config(t: dict[str, list[Piece]], rank: int, alpha: float | None, dropout: float, base: str) -> dict:
    alpha = alpha or rank
    return dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=int(alpha) if alpha == int(alpha)
                else alpha, lora_dropout=dropout, target_modules=target_modules(t),
                fan_in_fan_out=any(p.conv1d for ps in t.values() for p in ps), bias="none",
                base_model_name_or_path=base, inference_mode=True, init_lora_weights=True, use_rslora=False,
                use_dora=False, modules_to_save=None)


def save_adapter(out: Path, sd: dict, t: dict[str, list[Piece]], rank: int, alpha: float | None, dropout: float,
                 base: str, prefix: str = "") -> None:
    """OUT/adapter_config.json and OUT/adapter_model.safetensors, as peft.PeftModel.from_pretrained reads them."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_peft(sd, t, prefix)
    atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(adapter_config(t, rank, alpha, dropout, base), indent=2)
    atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))


@torch.no_grad()
def merge(base: GPT, sd: dict, t: dict[str, list[Piece]], rank: int, alpha: float | None,
          prefix: str = "") -> GPT:
    """base (a float GPT without adapters) with each adapter's B @ A * alpha / r added to its rows."""
    scaling = (alpha or rank) / rank
    for path, pieces in t.items():
        w = base.get_submodule(path).weight
        for i, p in enumerate(pieces):
            a, b = sd[f"{prefix}{path}.lora_A.{i}"].float(), sd[f"{prefix}{path}.lora_B.{i}"].float()
            w[p.rows[0]:p.rows[1]] += (b @ a * scaling).to(device=w.device, dtype=w.dtype)
    return base
