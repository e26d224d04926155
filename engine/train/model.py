"""What a run trains: the model config, the GPT under its loss, the wrapped modules and the optimizer.

The GPT comes new from --model, loaded from --init (fine-tuning), or shaped by a checkpoint's
model config (resume). LMLoss puts the chunked linear+cross-entropy (train/losses.py) on top, so
the full logits never exist; it is the module that DDP, FSDP and compile wrap and that holds
the parameters the optimizer and the state dicts work on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..models.config import ModelConfig
from ..models.gpt import GPT
from ..models.layers import Block
from ..models.presets import resolve_config
from . import lora
from .config import VOCAB_MULTIPLE, TrainConfig
from .distributed import Dist, wrap
from .losses import chunked_cross_entropy


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
        w, head = self.gpt.head_weight, self.gpt.lm_head
        if head is not None and head.bias is not None:  # the bias as one more input feature, always 1
            h = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)
            w = torch.cat([w, head.bias[:, None].to(w.dtype)], dim=1)
        return chunked_cross_entropy(h, w, y)


@dataclass
class Modules:
    lm: LMLoss            # holds the parameters: state dicts and the optimizer work on it
    model: nn.Module      # what a training step calls: lm under the cast, DDP or FSDP, and compile
    infer: nn.Module      # eval and sampling: no DDP (no gradients to sync), no compile (shapes change)
    opt: torch.optim.Optimizer
    params: list
    n_params: int         # without the position embedding, for FLOPs per token


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


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
        saved = dict(ckpt["model_config"])
        if "norm" not in saved:  # written before the traits were fields: qkv_bias then meant a bias beyond `bias`
            saved["qkv_bias"] = bool(saved.get("bias")) or bool(saved.get("qkv_bias"))
        return ModelConfig(**saved), None
    mcfg = resolve_config(cfg.model, **({"vocab_size": cfg.vocab_size} if cfg.vocab_size else {}))
    # the tokenizer gets the requested size; the embedding rounds up for aligned GEMMs
    cfg.vocab_size = cfg.vocab_size or mcfg.vocab_size
    mcfg.vocab_size = pad_vocab(mcfg.vocab_size)
    return mcfg, None


def build(cfg: TrainConfig, dd: Dist, mcfg: ModelConfig, fine_tune: bool) -> Modules:
    """The model (new, or loaded from --init), wrapped for this run, and its optimizer."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if fine_tune or cfg.lora_rank:  # LoRA: the frozen base comes from --init on a resume too
        from ..models.loader import load_model
        gpt = load_model(cfg.init, device="cpu", dtype=torch.float32).requires_grad_(True)
        gpt.config = mcfg
    else:
        gpt = GPT(mcfg)
    n_params = sum(p.numel() for p in gpt.parameters()) - (gpt.pos_emb.weight.numel() if gpt.pos_emb else 0)
    if cfg.lora_rank:  # on the host copy: a bf16 / int8 base reaches the device in that format only
        lora.apply(gpt, lora.parse_targets(cfg.lora_targets), cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                   cfg.lora_base_dtype)
    gpt.to(dd.device).train()
    if cfg.lora_rank:
        lora.move_formats(gpt, dd.device)
    lm = LMLoss(gpt)
    if cfg.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(gpt, check_fn=_is_block)
    model, infer = wrap(lm, cfg, dd)
    opt, params = make_optimizer(lm, cfg, dd)
    return Modules(lm, model, infer, opt, params, n_params)


def _is_block(module: nn.Module) -> bool:
    return isinstance(module, Block)


def make_optimizer(lm: LMLoss, cfg: TrainConfig, dd: Dist):
    """AdamW with weight decay on the matrices only; (optimizer, the parameters it steps)."""
    params = [p for p in lm.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=dd.device.type == "cuda")
    return opt, params
