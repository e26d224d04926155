"""The family registry: HF model_type -> the module that maps its config.json and tensor names
(base.py lists what such a module defines). A family is one file here plus one entry below."""
from __future__ import annotations

from types import ModuleType

from . import gemma, gpt2, gpt_neo, gpt_neox, gptj, llama, mistral, phi3, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {
    "gpt2": gpt2,
    "gpt_neo": gpt_neo,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "gpt_neox": gpt_neox,
    "gptj": gptj,
    "phi3": phi3,
    "gemma": gemma,
    "qwen3": qwen3,
}
