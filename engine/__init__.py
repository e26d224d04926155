"""gpt-engine: train and serve GPT models.  from engine import LLM, SamplingParams, load_model"""
import importlib

_EXPORTS = {
    "LLM": "llm", "SamplingParams": "sampling", "load_model": "weights", "save_model": "weights",
    "ModelConfig": "config", "GPT": "model", "Tokenizer": "tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
