"""gpt-engine: train and serve GPT models.  from gpt_engine import LLM, SamplingParams, load_model

The import root is `gpt_engine`: setuptools maps the repository's engine/ folder to it and
kernels/ to `gpt_engine.kernels` (see pyproject.toml's package-dir).
"""
import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "LLM": "llm", "AsyncLLM": "async_llm", "EngineConfig": "engine_config", "RequestOutput": "core.request",
    "SamplingParams": "core.sampling_params", "LoRARequest": "core.lora",
    "StructuredOutputsParams": "core.structured", "load_model": "models.loader", "save_model": "models.save",
    "ModelConfig": "models.config", "GPT": "models.gpt", "Tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
