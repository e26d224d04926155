"""gpt-engine bench: vLLM-style offline throughput, ours vs HF generate in one run.

N prompts of random token ids with random input/output lengths, ignore_eos, greedy. HF
runs batched and left-padded over the same prompts, sorted by output length and cut into
batches that each run to their longest request (only the requested tokens are counted).
The two engines' timed runs alternate, and each one's best counts.

    gpt-engine bench gpt2-tiny --num-prompts 32 --input-len 8,128 --output-len 64
"""
from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path

from ..engine_config import EngineConfig
from .flags import add_dataclass_args


def add_args(p) -> None:
    p.add_argument("model", help="model directory or a random-init preset (gpt2-tiny, gpt2, llama-tiny, ...); "
                   "`gpt-engine bench serve --help`: the load generator for a server")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", default="8,128", help="MIN,MAX prompt length (or one number)")
    p.add_argument("--output-len", default="64", help="MIN,MAX new tokens (or one number)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and the random-init model")
    p.add_argument("--hf-batch-size", type=int, default=0, help="HF generate batch size (0: all prompts at once)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each engine, in turns; the best counts")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig, skip=("seed",))
    p.set_defaults(enable_prefix_caching=False)  # random prompts: nothing to share, keeps the comparison plain


def _range(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length range {spec!r}")
    return lo, hi


def make_workload(n, input_len, output_len, vocab, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*input_len))] for _ in range(n)]
    outs = [rng.randint(*output_len) for _ in range(n)]
    return prompts, outs


def model_dir(spec: str, tmp: str, seed: int) -> str:
    """A model directory: spec itself, or a random-init preset saved under tmp."""
    if Path(spec).is_dir():
        return spec
    import torch

    from ..models.presets import resolve_config
    from ..models.gpt import GPT
    from ..models.save import save_model
    cfg = resolve_config(spec)
    torch.manual_seed(seed)
    save_model(GPT(cfg), tmp)
    return tmp


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _best_times(fns: dict, repeat, device) -> dict:
    """Best wall time of `repeat` calls of each fn, the calls taken in turns: a shared machine's
    noise only ever adds time, and its slow spells then fall on every contender alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def prepare_ours(path, prompts, outs, device, dtype, **engine_args):
    """-> (a timed-run callable, the LLM), warmed up."""
    from ..llm import LLM
    from ..core.sampling_params import SamplingParams
    # random prompts: nothing to share, so no prefix caching unless asked: keeps the comparison plain
    llm = LLM(path, device=device, dtype=dtype, **{"enable_prefix_caching": False, **engine_args})
    sps = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outs]
    # warm-up: every prompt's prefill once, so Triton autotuning of each length bucket and the
    # allocator's growth stay out of the timed run
    llm.generate(prompts, [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)] * len(prompts),
                 use_tqdm=False)

    def once():
        res = llm.generate(prompts, sps, use_tqdm=False)
        assert [len(r.token_ids) for r in res] == outs
    return once, llm


def prepare_hf(path, prompts, outs, device, dtype, batch_size=0):
    """-> a timed-run callable of HF generate over the same prompts, warmed up."""
    import torch
    try:
        import transformers
    except ImportError as e:
        raise SystemExit("gpt-engine bench compares with transformers: pip install 'gpt-engine[bench]'") from e
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # ignore_eos
    model.generation_config.pad_token_id = 0
    # sorted by output length and cut into batches: each batch runs to its longest request (little
    # waste after sorting); only the requested tokens are counted
    order = sorted(range(len(prompts)), key=lambda i: outs[i])
    bs = batch_size or len(prompts)
    groups = [order[i:i + bs] for i in range(0, len(order), bs)]

    def run(group):
        ps = [prompts[i] for i in group]
        T = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in ps], device=device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in ps], device=device)
        n = max(outs[i] for i in group)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

    run(groups[0][:4])  # warm-up
    return lambda: [run(g) for g in groups]


def run_bench(model: str, num_prompts=32, input_len=(8, 128), output_len=(64, 64), device=None, dtype=None,
              seed=0, hf=True, hf_batch_size=0, repeat=1, **engine_args) -> dict:
    """Ours vs HF generate on one workload; engine_args are EngineConfig's fields."""
    import torch
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(model, tmp, seed)
        from ..models.config import ModelConfig
        cfg = ModelConfig.load(path)
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        limit = cfg.max_seq_len - output_len[1]
        input_len = (min(input_len[0], limit), min(input_len[1], limit))
        prompts, outs = make_workload(num_prompts, input_len, output_len, cfg.vocab_size, seed)
        n_in, n_out = sum(map(len, prompts)), sum(outs)
        res = dict(model=model, device=str(device), dtype=str(dtype).replace("torch.", ""), num_prompts=num_prompts,
                   input_len=list(input_len), output_len=list(output_len), prompt_tokens=n_in, output_tokens=n_out,
                   repeat=repeat, thp_mem_alloc=os.environ.get("THP_MEM_ALLOC_ENABLE"))  # both engines run under it
        ours, llm = prepare_ours(path, prompts, outs, device, dtype, **engine_args)
        fns = {"ours": ours}
        if hf:
            fns["hf"] = prepare_hf(path, prompts, outs, device, dtype, hf_batch_size)
        # both engines' start-up objects (models, tokenizers, libraries: ~300k) out of the cyclic
        # collector's scans while timing, as vLLM does after start-up: 3.5% of a gpt2-tiny CPU run
        gc.collect()
        gc.freeze()
        try:
            best = _best_times(fns, repeat, device)
        finally:
            gc.unfreeze()
        for name, dt in best.items():
            res[name] = dict(seconds=dt, requests_per_s=num_prompts / dt, output_tok_per_s=n_out / dt,
                             total_tok_per_s=(n_in + n_out) / dt)
        res["ours"]["cuda_graphs"] = bool(llm.runner.graphs)
        if llm.spec is not None:  # speculative decoding's counters over the warm-up and the timed runs
            res["ours"]["speculative"] = {k: v for k, v in llm.stats().items() if k.startswith("spec_")}
        if hf:
            res["ratio_output_tok_per_s"] = res["ours"]["output_tok_per_s"] / res["hf"]["output_tok_per_s"]
    return res


def format_result(r: dict) -> str:
    lines = [f"{r['model']} on {r['device']} ({r['dtype']}): {r['num_prompts']} prompts, input {r['input_len']}, "
             f"output {r['output_len']} ({r['prompt_tokens']} prompt + {r['output_tokens']} output tokens)"]
    for name in ("ours", "hf"):
        if name in r:
            x = r[name]
            lines.append(f"  {name:5s} {x['seconds']:8.2f} s  {x['requests_per_s']:8.2f} req/s  "
                         f"{x['output_tok_per_s']:10.1f} output tok/s  {x['total_tok_per_s']:10.1f} total tok/s")
    spec = r.get("ours", {}).get("speculative")
    if spec:
        lines.append(f"  speculative: {spec['spec_num_draft_tokens']} drafts, acceptance "
                     f"{spec['spec_acceptance_rate']:.2f}, mean accepted length {spec['spec_mean_accepted_length']:.2f}")
    if "ratio_output_tok_per_s" in r:
        lines.append(f"  ours / HF generate: {r['ratio_output_tok_per_s']:.2f}x output tok/s")
    return "\n".join(lines)


def run(args) -> int:
    import torch
    names = EngineConfig.names() - {"seed", "device", "dtype"}
    engine_args = {k: v for k, v in vars(args).items() if k in names and v is not None}
    r = run_bench(args.model, args.num_prompts, _range(args.input_len), _range(args.output_len), args.device,
                  getattr(torch, args.dtype) if args.dtype else None, args.seed, not args.no_hf,
                  args.hf_batch_size, args.repeat, **engine_args)
    print(format_result(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0
