"""Where a training process stands and how its model is wrapped: one process or a torchrun job.

Dist reads torchrun's environment (world 1 without it) and opens the process group: gloo on
CPU, nccl on GPU. wrap() puts the loss module under what the run asks for.

Mixed precision is bf16 compute over fp32 master weights: the parameters are cast to bf16
inside the forward (CastParams, so the gradients flow back into fp32 through the cast) under
single process and DDP, and by FSDP2's MixedPrecisionPolicy under --fsdp.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig

if TYPE_CHECKING:
    from .model import LMLoss


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
            dist.init_process_group(self.backend)
        self.master = self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

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

    def close(self) -> None:
        """Ends the one-rank process group shard() opened; a torchrun job's group outlives train()."""
        if dist.is_initialized() and self.world == 1:
            dist.destroy_process_group()


class CastParams(nn.Module):
    """Runs module with its parameters cast to dtype; the casts are differentiable, so the
    fp32 parameters (the optimizer's master weights) receive fp32 gradients."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        params = {n: p.to(self.dtype) for n, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, params, args)


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
        dist.init_process_group(dd.backend, rank=0, world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in lm.gpt.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(lm, mp_policy=mp)
