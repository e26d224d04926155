"""LoRA adapters for serving: PEFT's LORA directories read onto the engine's GEMMs, and the slot tensors
that let one engine step run tokens of several adapters (and of the base model) together.

An adapter directory is what peft's save_pretrained writes: adapter_config.json (peft_type "LORA") and
adapter_model.safetensors (or adapter_model.bin) holding, per adapted module, lora_A (r, in) and lora_B
(out, r); a module's output gains scaling * x @ A^T @ B^T (scaling = alpha / r, or alpha / sqrt(r) with
use_rslora). The module names are the HF model's: the family's tensor plan (families/, what the loader
reads) says which of our GEMMs, and which of its rows, each one is: q_proj, k_proj and v_proj land in parts
of the fused qkv GEMM, gate_proj and up_proj in the fused [gate | up], GPT-2's c_attn is the whole qkv
(PEFT keeps LoRA weights untransposed for Conv1D too), a checkpoint's row order (GPT-NeoX, GPT-J) applies
to B's rows as it does to the weight's.

Slots (S-LoRA / punica's layout): each adapted GEMM stacks its adapters' A into (max_loras * W, K) and B into
(max_loras * W, N), W = P * R columns per slot for P parts of rank up to R, an adapter's parts side by side
(B zero outside each part's rows). A step's tokens are grouped by slot (LoRAStep) and each GEMM adds, in the
activations' dtype on top of whatever format the base weight has (formats.py),
  y[rows] += bmm(bmm(x[rows], A_slots^T), B_slots)     x gathered (s, m, K) by slot, scattered back
or, for groups too uneven to pad, ((x @ A[:s W]^T) * mask) @ B[:s W] with a one-hot (token, slot) mask:
a few batched GEMMs whatever the mix of adapters and base-model tokens in the step. CPU float32 inference
runs the same update straight from the slot tensors in one kernel (kernels.lora_add_), which the fused
decode layer also calls between its GEMMs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt_engine.kernels import decode_layer_applies, lora_add_
from gpt_engine.kernels.reference import ACTIVATIONS

from .loader import _plan, _strip

CONFIG, SAFETENSORS, BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# adapter_config.json fields that change what the adapter computes beyond A and B: refused when set
UNSUPPORTED = ("use_dora", "lora_bias", "modules_to_save", "target_parameters", "trainable_token_indices",
               "layer_replication", "use_qalora", "use_bdlora", "alora_invocation_tokens")


@dataclass(frozen=True)
class Target:
    """Where an HF module's LoRA lands: our GEMM, its part (q, k, v of a fused qkv), the rows its outputs
    fill (None: all), and the row each of its output rows goes to (None: in order)."""
    module: str
    part: int
    rows: tuple[int, int] | None
    order: torch.Tensor | None


_GEMM = re.compile(r"layers\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc|mlp\.proj)")


def gemm_plan(cfg) -> dict[str, list[tuple[str, tuple[int, int] | None, bool, torch.Tensor | None]]]:
    """The family plan's entries onto the transformer layers' GEMM weights (what LoRA adapts, training and
    serving alike): our GEMM (layers.i.attn.qkv) -> its HF modules (name without the family's prefix, rows
    of our weight or None for all, transposed (a GPT-2 Conv1D), row order), by their first row."""
    plan, _ = _plan(cfg)
    out: dict[str, list] = {}
    for name, (param, rows, transposed, order) in plan.items():
        module = param.removesuffix(".weight")
        if name.endswith(".weight") and param.endswith(".weight") and _GEMM.fullmatch(module):
            out.setdefault(module, []).append((name.removesuffix(".weight"), rows, transposed, order))
    for entries in out.values():
        entries.sort(key=lambda e: e[1][0] if e[1] else 0)
    return out


def targets(model) -> tuple[dict[str, Target], dict[str, int]]:
    """gemm_plan read for serving -> (HF module name -> Target, our GEMM's name -> its part count): a plan
    entry onto any other parameter (a norm, an embedding, the head) is no LoRA target here."""
    out, parts = {}, {}
    for module, entries in gemm_plan(model.config).items():
        parts[module] = len(entries)
        for part, (hf, rows, _transposed, order) in enumerate(entries):
            out[hf] = Target(module, part, rows, order)
    return out, parts


@dataclass
class Adapter:
    """A checked adapter: per GEMM of ours, its parts' (Target, A (r, K), B (n, r) times the scaling)."""
    path: Path
    rank: int
    weights: dict[str, list[tuple[Target, torch.Tensor, torch.Tensor]]]


def _pattern(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def _read_config(path: Path) -> dict:
    f = path / CONFIG
    if not f.is_file():
        raise ValueError(f"LoRA adapter {path}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"LoRA adapter {path}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise ValueError(f"LoRA adapter {path}: {CONFIG} has peft_type {got!r}; only PEFT LORA adapters are served")
    bad = [k for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if bad:
        raise ValueError(f"LoRA adapter {path}: {CONFIG} sets {', '.join(bad)}, which serving does not support "
                         f"(plain LoRA only: A and B per module)")
    alpha = cfg.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"LoRA adapter {path}: lora_alpha must be a number, got {alpha!r}")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path / SAFETENSORS)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"LoRA adapter {path}: cannot read {SAFETENSORS} ({e})") from None
    if (path / BIN).is_file():
        try:
            return torch.load(path / BIN, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"LoRA adapter {path}: cannot read {BIN} ({e})") from None
    raise ValueError(f"LoRA adapter {path}: no {SAFETENSORS} or {BIN}")


def read_adapter(path, model, max_rank: int) -> Adapter:
    """Read and check a PEFT LoRA directory against model (a GPT): ValueError naming the file, the tensor
    or the field when it is not an adapter this model can serve (missing files, not LORA, a module the
    engine has no GEMM for, shapes of another base model, a rank above max_rank)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"LoRA adapter {path}: no such directory")
    cfg = _read_config(path)
    tensors = _read_tensors(path)
    mcfg = model.config
    where, _ = targets(model)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ValueError(f"LoRA adapter {path}: unexpected tensor {key!r} (only the lora_A / lora_B weights "
                             f"of linear modules are served)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise ValueError(f"LoRA adapter {path}: no lora_A / lora_B tensors")
    gemms = dict(model.named_modules())
    alpha, rslora = cfg.get("lora_alpha", 8), bool(cfg.get("use_rslora"))
    weights: dict[str, list] = {}
    rank = 0
    for hf_name, ab in pairs.items():
        target = where.get(_strip(mcfg, hf_name))
        if target is None:
            raise ValueError(f"LoRA adapter {path}: target module {hf_name!r} is not a linear layer the engine "
                             f"adapts in a {mcfg.model_type} model with {mcfg.n_layer} layers")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path}: module {hf_name!r} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        lin = gemms[target.module]
        n = target.rows[1] - target.rows[0] if target.rows else lin.out_features
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != lin.in_features or tuple(b.shape) != (n, r):
            raise ValueError(f"LoRA adapter {path}: module {hf_name!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}, this base model needs ({r}, {lin.in_features}) and ({n}, {r}): "
                             f"an adapter of another base model?")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"LoRA adapter {path}: module {hf_name!r} has non-float LoRA weights")
        if r > max_rank:
            raise ValueError(f"LoRA adapter {path}: rank {r} (module {hf_name!r}) is above max_lora_rank "
                             f"{max_rank}; start the engine with a larger max_lora_rank")
        a_ = _pattern(cfg.get("alpha_pattern") or {}, hf_name, alpha)
        scaling = a_ / (math.sqrt(r) if rslora else r)
        weights.setdefault(target.module, []).append((target, a.float(), b.float() * scaling))
        rank = max(rank, r)
    return Adapter(path, rank, weights)


@dataclass
class LoRAStep:
    """One step's tokens by slot (slots 0 .. groups - 1), in one of three forms:
    only    every token runs this slot's adapter: one plain low-rank update
    rows    (groups * m,) slot j's tokens at rows[j m:(j + 1) m], padded with token 0 (pad (groups, m, 1)
            zeroes the padding; None: none): each token meets its own adapter only (batched GEMMs)
    mask    (N, groups * W) 1 on the columns of each token's slot (wide(W)): every token meets every slot
            in use, the form for groups so uneven (a prompt chunk beside a few decodes) that padding them
            to one length would cost more
    and, whatever the form, slots (N,) int64 each token's slot (-1: the base model), which the fused CPU
    decode layer takes instead (kernels.decode_layer's lora_slots)"""
    groups: int
    slots: torch.Tensor
    only: int | None = None
    rows: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    _wide: dict | None = None

    @classmethod
    def of(cls, slots: list[int], dtype, device) -> LoRAStep | None:
        """From each token's slot (-1: the base model); None when no token has an adapter."""
        groups: dict[int, list[int]] = {}
        for i, j in enumerate(slots):
            if j >= 0:
                groups.setdefault(j, []).append(i)
        if not groups:
            return None
        s, m = max(groups) + 1, max(map(len, groups.values()))
        per_token = torch.tensor(slots)
        if len(groups) == 1 and m == len(slots):
            return cls(1, per_token, only=next(iter(groups)))
        if s * m > 2 * len(slots):
            mask = per_token[:, None] == torch.arange(s)
            return cls(s, per_token, mask=mask.to(device=device, dtype=dtype), _wide={})
        rows = [i for j in range(s) for i in (groups.get(j, []) + [0] * (m - len(groups.get(j, []))))]
        full = len(groups) == s and all(len(g) == m for g in groups.values())
        pad = None if full else torch.tensor([[k < len(groups.get(j, [])) for k in range(m)] for j in range(s)])
        return cls(s, per_token, rows=torch.tensor(rows).to(device),
                   pad=None if pad is None else pad[..., None].to(device=device, dtype=dtype))

    def wide(self, width: int) -> torch.Tensor:
        m = self._wide.get(width)
        if m is None:  # once per step and width, for every GEMM of that width
            m = self._wide[width] = self.mask.repeat_interleave(width, dim=1)
        return m


class LoRASlots:
    """One GEMM's slot tensors (see the module docstring): A (L * W, K), B (L * W, N), slot j's rows
    j W .. (j + 1) W."""

    def __init__(self, max_loras: int, parts: int, max_rank: int, k: int, n: int, dtype, device):
        self.rank, self.width = max_rank, parts * max_rank
        self.a = torch.zeros(max_loras * self.width, k, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras * self.width, n, dtype=dtype, device=device)
        # the same tensors as (L, W, K) and (L, W, N): the form kernels.lora_add_ and decode_layer's lora take
        self.slot_views = (self.a.view(max_loras, self.width, k), self.b.view(max_loras, self.width, n))

    @torch.no_grad()
    def load(self, slot: int, parts: list[tuple[Target, torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter's parts of this GEMM in slot (none: this GEMM is not adapted, zeros)."""
        base = slot * self.width
        self.a[base:base + self.width].zero_()
        self.b[base:base + self.width].zero_()
        for t, a, b in parts:
            lo, r = base + t.part * self.rank, a.shape[0]
            rows = torch.arange(b.shape[0]) if t.order is None else t.order
            rows = rows + (t.rows[0] if t.rows else 0)
            self.a[lo:lo + r] = a.to(self.a)
            self.b[lo:lo + r, rows.to(self.b.device)] = b.t().to(self.b)

    def apply(self, y: torch.Tensor, x: torch.Tensor, step: LoRAStep, activation=None) -> torch.Tensor:
        """activation(y + each token's adapter update of x), y (N, N_out) the base GEMM's fresh output before
        its activation: CPU float32 inference in one kernel (kernels.lora_add_), else add_to's torch forms."""
        if decode_layer_applies(x, ()) and x.dim() == 2 and x.is_contiguous() and y.is_contiguous():
            return lora_add_(y, x, *self.slot_views, step.slots, activation)
        return ACTIVATIONS[activation](self.add_to(y, x, step))

    def add_to(self, y: torch.Tensor, x: torch.Tensor, step: LoRAStep) -> torch.Tensor:
        """y (N, N_out), the base GEMM's fresh output, plus each token's adapter update of x (N, K), in place."""
        w, s = self.width, step.groups
        if step.only is not None:
            a, b = self.a[step.only * w:(step.only + 1) * w], self.b[step.only * w:(step.only + 1) * w]
            return y.addmm_(torch.mm(x, a.t()), b)
        if step.mask is not None:
            return y.addmm_(torch.mm(x, self.a[:s * w].t()).mul_(step.wide(w)), self.b[:s * w])   # (N, s W)
        xg = x.index_select(0, step.rows).view(s, -1, x.shape[1])                  # (s, m, K)
        t = torch.bmm(xg, self.a[:s * w].view(s, w, -1).transpose(1, 2))          # (s, m, W)
        if step.pad is not None:
            t.mul_(step.pad)
        return y.index_add_(0, step.rows, torch.bmm(t, self.b[:s * w].view(s, w, -1)).flatten(0, 1))


def attach_slots(model, max_loras: int, max_rank: int, dtype, device) -> dict[str, LoRASlots]:
    """Slot tensors on every adaptable GEMM of model (each layers.Linear's `lora`) -> {GEMM name: slots}."""
    _, parts = targets(model)
    modules = dict(model.named_modules())
    out = {}
    for name, p in parts.items():
        lin = modules[name]
        lin.lora = out[name] = LoRASlots(max_loras, p, max_rank, lin.in_features, lin.out_features, dtype, device)
    return out
