"""What a model directory says about generation (config.json + generation_config.json): every EOS id
and the default sampling parameters, read as transformers reads them, so the engine stops and samples
where HF generate would."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .hf_json import Fields, config_path, read_json, token_ids


@dataclass
class GenerationDefaults:
    """Every EOS id (config.json and generation_config.json, each an int or a list; the tokenizer's
    EOS only where neither names one) and the default sampling parameters, as SamplingParams keyword
    arguments (only those the directory sets)."""
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling: dict = field(default_factory=dict)  # subset of temperature, top_p, top_k, min_p, repetition_penalty, max_tokens


def load_generation_config(path: str | Path, tokenizer=None, vocab_size: int | None = None) -> GenerationDefaults:
    """GenerationDefaults of a model directory (config.json and generation_config.json, both optional).
    `do_sample: false` maps to temperature 0 (greedy, as transformers would run it); HF's top_k 0 to -1."""
    d = Path(path)
    cfg = read_json(config_path(d), required=False)
    gen = read_json(d / "generation_config.json" if d.is_dir() else d.parent / "generation_config.json",
                    required=False)
    eos: list[int] = []
    for src, name in ((cfg, "config.json"), (gen, "generation_config.json")):
        for i in token_ids(src.get("eos_token_id"), f"{name}: eos_token_id"):
            if i not in eos:
                eos.append(i)
    if not eos and tokenizer is not None:
        eos.extend(getattr(tokenizer, "eos_token_ids", None) or
                   ([tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []))
    bad = [i for i in eos if vocab_size is not None and i >= vocab_size]
    if bad:  # as GPT2Config()'s defaults give a small-vocab model: transformers loads it too, and no token can be it
        warnings.warn(f"eos_token_id {bad} is out of range for vocab_size {vocab_size}: ignored", stacklevel=2)
        eos = [i for i in eos if i not in bad]
    g = Fields(gen, "generation_config.json")
    sampling: dict = {}
    if "temperature" in gen and gen["temperature"] is not None:
        sampling["temperature"] = g.float("temperature", lo=0.0)
    if "top_p" in gen and gen["top_p"] is not None:
        sampling["top_p"] = g.float("top_p", hi=1.0)
    if "top_k" in gen and gen["top_k"] is not None:
        sampling["top_k"] = g.int("top_k", lo=0) or -1
    if "min_p" in gen and gen["min_p"] is not None:
        sampling["min_p"] = g.float("min_p", lo=0.0, hi=1.0)
    if "repetition_penalty" in gen and gen["repetition_penalty"] is not None:
        sampling["repetition_penalty"] = g.float("repetition_penalty")
    if "max_new_tokens" in gen and gen["max_new_tokens"] is not None:
        sampling["max_tokens"] = g.int("max_new_tokens")
    if g.bool("do_sample", True) is False:
        sampling["temperature"] = 0.0
    bos = Fields(cfg).opt_int("bos_token_id", 0)
    bos = g.opt_int("bos_token_id", 0) if gen.get("bos_token_id") is not None else bos
    pad = g.opt_int("pad_token_id", 0) if gen.get("pad_token_id") is not None else Fields(cfg).opt_int("pad_token_id", 0)
    return GenerationDefaults(eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, sampling=sampling)
