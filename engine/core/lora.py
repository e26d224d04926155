"""LoRARequest: which LoRA adapter a request runs with (vLLM's fields). No torch here.

    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "/adapters/sql"))

lora_int_id names the adapter inside the engine: its slot, its share of the prefix cache (a prompt
under one adapter never reuses another's KV blocks) and the scheduler's count of adapters in use. One
id stands for one directory for the engine's lifetime.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or isinstance(self.lora_int_id, bool) \
                or not isinstance(self.lora_int_id, int) or not isinstance(self.lora_path, (str, os.PathLike)):
            raise TypeError(f"LoRARequest takes (lora_name: str, lora_int_id: int, lora_path: str), got "
                            f"({self.lora_name!r}, {self.lora_int_id!r}, {self.lora_path!r})")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id}")
        if not os.fspath(self.lora_path):
            raise ValueError("lora_path must name the adapter's directory")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
