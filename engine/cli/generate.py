"""gpt-engine generate MODEL --prompt TEXT [--prompt TEXT ...]: one batch, printed samples, tokens/s."""
from __future__ import annotations

import time

from ..engine_config import EngineConfig
from .flags import add_dataclass_args, from_args


def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory (with tokenizer.json)")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat the flag to generate several prompts as one batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (prompt i draws with seed + i)")
    p.add_argument("--ignore-eos", action="store_true")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig, skip=("seed",))


def run(args) -> int:
    import torch

    from ..llm import LLM
    from ..core.sampling_params import SamplingParams
    prompts = args.prompt or ["The"]
    # one seed per prompt: equal seeds would give every prompt the same random stream
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=None if args.seed is None else args.seed + i,
                             ignore_eos=args.ignore_eos) for i in range(len(prompts))]
    llm = LLM(args.model, config=from_args(EngineConfig, args, seed=None))
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up: kernels, allocator
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    for i, o in enumerate(outs):
        print(f"--- sample {i} ({len(o.token_ids)} tokens, {o.finish_reason})")
        print(o.prompt + o.text)
    n = sum(len(o.token_ids) for o in outs)
    print(f"--- {n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s ({len(outs)} prompts, {llm.device})")
    return 0
