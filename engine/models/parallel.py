"""Tensor parallelism, Megatron-style: which slice of each weight a rank holds.

    qkv, MLP fc (gate | up)    column-parallel: the rank's heads / its d_ff / world slice, no communication
    attn.proj, mlp.proj        row-parallel: the matching input columns; one all-reduce of the output each
                               (the bias on rank 0 only, so the sum adds it once)
    tok_emb, lm_head           vocab-parallel: ceil(V / world) rows each (the last rank's padded with zeros);
                               a lookup all-reduces the rows the rank holds, the head all-gathers its logits
    norms, positions           replicated

KV heads split across ranks; with fewer KV heads than ranks each rank keeps the one its query heads read
(replicated, as with MQA). The layers take a TPGroup (tp) and read their local sizes from it; the
collectives are the communicator's (worker/tensor_parallel.py), so nothing here starts processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in a tensor-parallel group, and the group's collectives (comm: all_reduce(t) in
    place, all_gather(t) -> the ranks' t concatenated on the last dim)."""
    rank: int
    world: int
    comm: object

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(t)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(t)


def check_tensor_parallel(cfg: ModelConfig, world: int) -> None:
    """ValueError naming what the model's shape cannot split world ways."""
    if world == 1:
        return
    if cfg.n_head % world:
        raise ValueError(f"tensor_parallel_size {world} must divide the model's {cfg.n_head} attention heads")
    if cfg.n_kv_head % world and world % cfg.n_kv_head:
        raise ValueError(f"tensor_parallel_size {world} and the model's {cfg.n_kv_head} KV heads must divide one "
                         f"another")
    if cfg.d_ff % world:
        raise ValueError(f"tensor_parallel_size {world} must divide the MLP's {cfg.d_ff} hidden features")


def local_heads(cfg: ModelConfig, rank: int, world: int) -> tuple[int, int, int]:
    """-> (query heads, KV heads, first KV head) of this rank."""
    h = cfg.n_head // world
    if cfg.n_kv_head % world == 0:
        hkv = cfg.n_kv_head // world
        return h, hkv, rank * hkv
    return h, 1, rank // (world // cfg.n_kv_head)  # world / n_kv_head ranks share each KV head


def vocab_rows(vocab_size: int, world: int) -> int:
    return -(-vocab_size // world)


def shard_state(sd: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, world: int) -> dict[str, torch.Tensor]:
    """The full model's state dict (GPT names) -> this rank's."""
    h, hkv, kv0 = local_heads(cfg, rank, world)
    d, f = cfg.head_dim, cfg.d_ff // world
    q = slice(rank * h * d, (rank + 1) * h * d)
    k = slice((cfg.n_head + kv0) * d, (cfg.n_head + kv0 + hkv) * d)
    v = slice((cfg.n_head + cfg.n_kv_head + kv0) * d, (cfg.n_head + cfg.n_kv_head + kv0 + hkv) * d)
    ff = [slice(rank * f, (rank + 1) * f)]
    if cfg.mlp == "gated":  # [gate | up]: the rank's slice of each
        ff.append(slice(cfg.d_ff + rank * f, cfg.d_ff + (rank + 1) * f))
    vr = vocab_rows(cfg.vocab_size, world)

    def rows(t, slices):
        return torch.cat([t[s] for s in slices])

    out = {}
    for name, t in sd.items():
        part = name.rsplit(".", 2)[-2:] if name.startswith("layers.") else [name]
        kind = ".".join(part)
        if kind in ("qkv.weight", "qkv.bias"):
            t = rows(t, (q, k, v))
        elif kind in ("fc.weight", "fc.bias") and ".mlp." in name:
            t = rows(t, ff)
        elif kind == "proj.weight":  # row-parallel: the input columns of the rank's heads / features
            t = t[:, q] if ".attn." in name else t[:, ff[0]]
        elif kind == "proj.bias" and rank:
            t = torch.zeros_like(t)
        elif name in ("tok_emb.weight", "lm_head.weight", "lm_head.bias"):
            t = t[rank * vr:(rank + 1) * vr]
            if len(t) < vr:  # the last rank's padding: zero rows, cut from the gathered logits
                t = torch.cat([t, t.new_zeros(vr - len(t), *t.shape[1:])])
        out[name] = t.clone()
    return out
