"""The runner's LoRA adapters: which adapter sits in which slot, loaded when a batch first needs it and
evicted least recently used, and each step's per-token slot mask (models/lora.py computes with it).

The scheduler keeps the running sequences to at most max_loras adapters (ScheduledBatch.running_loras),
so a new adapter always finds a slot whose adapter no running sequence uses."""
from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from ..core.lora import LoRARequest
from ..models.lora import LoRAStep, attach_slots, read_adapter

log = logging.getLogger("gpt_engine.worker.lora")


class LoRAManager:
    def __init__(self, model, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.gemms = attach_slots(model, max_loras, max_rank, dtype, device)
        self.loaded: OrderedDict[int, int] = OrderedDict()   # adapter id -> slot, least recently used first
        self.known: dict[int, LoRARequest] = {}              # checked adapters by id
        self.num_loads = 0

    def check(self, lora: LoRARequest) -> None:
        """The intake's check (any thread): the adapter directory reads and fits the model (ValueError
        naming the problem), once per id; an id stays bound to its first directory."""
        if not isinstance(lora, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
        known = self.known.get(lora.lora_int_id)
        if known is not None:
            if known.lora_path != lora.lora_path:
                raise ValueError(f"lora_int_id {lora.lora_int_id} is adapter {known.lora_name!r} at "
                                 f"{known.lora_path}, not {lora.lora_path}: one id per adapter directory")
            return
        read_adapter(lora.lora_path, self.model, self.max_rank)
        self.known[lora.lora_int_id] = lora

    def step(self, batch) -> LoRAStep | None:
        """The batch's LoRAStep (its adapters loaded first), or None when no sequence has one."""
        if not any(s.lora_id for s in batch.seqs):
            return None
        slots = [self._slot(s.lora, batch.running_loras) if s.lora_id else -1 for s in batch.seqs]
        if not batch.is_decode:
            slots = [j for j, n in zip(slots, batch.num_new_tokens) for _ in range(n)]
        return LoRAStep.of(slots, self.dtype, self.device)

    def _slot(self, lora: LoRARequest, running: frozenset) -> int:
        slot = self.loaded.get(lora.lora_int_id)
        if slot is not None:
            self.loaded.move_to_end(lora.lora_int_id)
            return slot
        if len(self.loaded) < self.max_loras:
            slot = min(set(range(self.max_loras)) - set(self.loaded.values()))
        else:
            victim = next((i for i in self.loaded if i not in running), None)
            if victim is None:
                raise RuntimeError(f"no free LoRA slot: the running sequences use more than max_loras "
                                   f"({self.max_loras}) adapters")
            slot = self.loaded.pop(victim)
        adapter = read_adapter(lora.lora_path, self.model, self.max_rank)
        for name, gemm in self.gemms.items():
            gemm.load(slot, adapter.weights.get(name, []))
        self.loaded[lora.lora_int_id] = slot
        self.num_loads += 1
        log.info("LoRA adapter %r (id %d, rank %d) loaded into slot %d", lora.lora_name, lora.lora_int_id,
                 adapter.rank, slot)
        return slot
