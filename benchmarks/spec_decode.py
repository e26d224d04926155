"""Speculative decoding on one stream: tokens/s with speculation against plain decoding, on one engine
each, in alternating turns over several rounds (the median of the rounds' paired ratios; a shared
machine's load moves between rounds). Workloads, greedy unless said:

- grounded: the prompt holds a standard-library function, then the same function's first lines again (an
  edit that rewrites it): the output can copy spans of the input;
- repetition: a plain continuation of standard-library code, where a small model falls into loops;
- no_match: random token prompts, sampled at temperature 1 (few n-grams recur);
- draft: the draft model on the grounded and repetition prompts (acceptance and speedup).

The target and the draft are trained on the same corpus with the same tokenizer, e.g.
    gpt-engine train --out runs/tiny --model gpt2-tiny
    gpt-engine train --out runs/draft --model draft.json   # {"model_type": "gpt2", "n_layer": 1, "n_head": 2,
                                                           #  "d_model": 128, "max_seq_len": 256, "vocab_size": 4096}
    python -m benchmarks.spec_decode --target runs/tiny --draft runs/draft
Writes benchmarks/results/<device>/spec_decode.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path


def _functions(n: int) -> list[str]:
    """n top-level functions of the standard library's source (a fixed, readable sample)."""
    import ast
    import inspect
    out = []
    for mod in ("json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "base64.py", "glob.py"):
        src = (Path(inspect.getfile(json)).parent.parent / mod).read_text()
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and 6 <= node.end_lineno - node.lineno <= 25:
                out.append(ast.get_source_segment(src, node))
    return out[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True)
    p.add_argument("--draft", default=None)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from gpt_engine import LLM, SamplingParams

    plain = LLM(args.target, device=args.device)
    tok = plain.tokenizer
    fns = _functions(args.prompts)
    limit = plain.max_model_len - args.max_tokens - args.k - 2
    cut = lambda ids: ids[-limit:]  # noqa: E731
    grounded = [cut(tok.encode(f + "\n\n\n" + "\n".join(f.splitlines()[:2]) + "\n")) for f in fns]
    repetition = [cut(tok.encode("\n".join(f.splitlines()[:3]) + "\n")) for f in fns]
    g = torch.Generator().manual_seed(0)
    no_match = [torch.randint(10, tok.vocab_size, (48,), generator=g).tolist() for _ in fns]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    engines = {"ngram": LLM(args.target, device=args.device, speculative_config={
        "method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2})}
    if args.draft:
        engines["draft"] = LLM(args.target, device=args.device, speculative_config={
            "model": args.draft, "num_speculative_tokens": args.k})
    cases = [("grounded", "ngram", grounded, greedy), ("repetition", "ngram", repetition, greedy),
             ("no_match", "ngram", no_match, sampled)]
    if args.draft:
        cases += [("grounded", "draft", grounded, greedy), ("repetition", "draft", repetition, greedy)]

    def one_stream(llm, prompts, sp):
        """Tokens/s of the prompts one at a time (a person chatting), and the outputs."""
        outs, t = [], time.perf_counter()
        for pr in prompts:
            outs += llm.generate([pr], sp, use_tqdm=False)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t), outs

    results = {}
    for name, method, prompts, sp in cases:
        spec = engines[method]
        one_stream(plain, prompts[:1], sp), one_stream(spec, prompts[:1], sp)  # warm-up
        before = spec.spec_stats.as_dict()
        ratios, best = [], {"plain": 0.0, "spec": 0.0}
        for r in range(args.rounds):
            a, ref = one_stream(plain, prompts, sp)
            b, outs = one_stream(spec, prompts, sp)
            if sp.temperature == 0:
                assert [o.token_ids for o in outs] == [o.token_ids for o in ref], "greedy output differs"
            ratios.append(b / a)
            best = {"plain": max(best["plain"], a), "spec": max(best["spec"], b)}
            print(f"{name:10s} {method:5s} round {r + 1}: plain {a:7.1f} tok/s  spec {b:7.1f} tok/s  {b / a:.2f}x",
                  flush=True)
        after = spec.spec_stats.as_dict()
        drafts = after["spec_num_draft_tokens"] - before["spec_num_draft_tokens"]
        accepted = after["spec_num_accepted_tokens"] - before["spec_num_accepted_tokens"]
        steps = after["spec_num_drafts"] - before["spec_num_drafts"]
        results[f"{name}/{method}"] = dict(
            median_ratio=round(statistics.median(ratios), 3), round_ratios=[round(x, 3) for x in ratios],
            plain_tok_per_s=round(best["plain"], 1), spec_tok_per_s=round(best["spec"], 1),
            acceptance_rate=round(accepted / drafts, 3) if drafts else 0.0,
            mean_accepted_length=round(1 + accepted / steps, 3) if steps else 0.0, verification_steps=steps)
    def cfg(d):
        return json.loads((Path(d) / "config.json").read_text())

    def params(d):  # from the checkpoint: on CPU the engine keeps GEMM weights in packs, not parameters
        from safetensors import safe_open
        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())

    result = dict(device=args.device, threads=torch.get_num_threads(), k=args.k, max_tokens=args.max_tokens,
                  prompts=len(fns), rounds=args.rounds, target=cfg(args.target),
                  draft=cfg(args.draft) if args.draft else None, target_params=params(args.target),
                  draft_params=params(args.draft) if args.draft else None,
                  load_avg_1m=round(os.getloadavg()[0], 2), torch=torch.__version__, results=results)
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "spec_decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
