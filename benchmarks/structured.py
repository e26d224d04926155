"""Structured outputs' cost: tokens/s of concurrent streams constrained by a JSON schema against the
same streams unconstrained, on the same engine; and one stream's time to first token unconstrained,
with a schema compiled on the spot (a new one), and with the schema cached.

The model is a random-init GPT-2 shape over a byte-level BPE trained here (vocab --vocab, the head
padded past it, as hub models pad theirs); the schema is an open-ended array of objects, so streams run
to max_tokens (ignore_eos on both sides). Both sides run in turns, round after round: each one's best
round, and the median of the rounds' paired ratios (a shared machine's load moves between rounds);
tokens are counted, not assumed. Writes benchmarks/results/<device>/structured.json.

    python -m benchmarks.structured [--streams 16] [--max-tokens 128] [--rounds 9] [--vocab 32000] [--device cpu]
        [--dtype float32] [--ttft-runs 30] [--threads N]

Time to first token: one stream, max_tokens 1, the three kinds in turns for --ttft-runs rounds; each
kind's median, and the median over rounds of each round's difference from the unconstrained run.
Offline (LLM.generate), then through `gpt-engine serve` (a streamed chat completion with OpenAI's
response_format, to the first chunk with text). The compile's own time is the median of fresh schemas
compiled alone (Grammars.compile: the grammar thread's work and the hand-off to it).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.serve import local_server

SHAPE = dict(n_layer=4, n_embd=256, n_head=4, n_positions=1024)
KINDS = ("unconstrained", "schema_compiled", "schema_cached")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SCHEMA = {"type": "array", "items": {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                   "kind": {"enum": ["file", "dir", "link"]}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["id", "name", "kind", "tags"], "additionalProperties": False}}


def _corpus(limit: int = 4 << 20) -> str:
    """The standard library's own source (present on every machine), up to limit characters."""
    root, parts, n = Path(inspect.getfile(json)).parent.parent, [], 0
    for f in sorted(root.glob("*.py")):
        parts.append(f.read_text(errors="replace"))
        n += len(parts[-1])
        if n > limit:
            break
    return "\n".join(parts)


def _ttft_rounds(first_token_ms, runs: int) -> tuple[dict, dict]:
    """first_token_ms(kind) for the three kinds in turns (the machine's load moves between rounds), runs
    rounds -> (each kind's median, the median over rounds of each constrained kind's difference from the
    unconstrained run of its round)."""
    ms = {k: [] for k in KINDS}
    for _ in range(runs):
        for k in KINDS:
            ms[k].append(first_token_ms(k))
    growth = {k: statistics.median(a - b for a, b in zip(ms[k], ms["unconstrained"])) for k in KINDS[1:]}
    return {k: statistics.median(v) for k, v in ms.items()}, growth


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ttft-runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the engines (default: torch's); fewer than the cores leaves the grammar "
                        "thread a core of its own")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/structured.json)")
    args = p.parse_args(argv)

    import llguidance
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server's

    from gpt_engine import LLM, SamplingParams, StructuredOutputsParams
    from gpt_engine.tokenizer import Tokenizer

    tok = Tokenizer.train([_corpus()], vocab_size=args.vocab, show_progress=False)
    vocab = tok._tok.get_vocab_size()
    padded = -(-vocab // 64) * 64
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=padded, bos_token_id=tok.eos_token_id,
                                                          eos_token_id=tok.eos_token_id, **SHAPE)).eval()
    prompts = [f"item {i}: " for i in range(args.streams)]
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        tok.save(tmp)
        llm = LLM(tmp, device=args.device, dtype=args.dtype)
        free = [SamplingParams(max_tokens=args.max_tokens, seed=i, ignore_eos=True) for i in range(args.streams)]
        so = StructuredOutputsParams(json=SCHEMA)
        # ignore_eos on both: a stream whose grammar completes early keeps its row (its matcher then allows
        # EOS alone), so both sides decode the same batch for the same number of steps
        constrained = [SamplingParams(max_tokens=args.max_tokens, seed=i, ignore_eos=True, structured_outputs=so)
                       for i in range(args.streams)]

        def run(params):
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t), outs

        run(free), run(constrained)  # warm-up (and the schema's compile)
        best = {"unconstrained": 0.0, "constrained": 0.0}
        finished, rates = 0, {"unconstrained": [], "constrained": []}
        for r in range(args.rounds):
            for name, params in (("unconstrained", free), ("constrained", constrained)):
                rate, outs = run(params)
                best[name] = max(best[name], rate)
                rates[name].append(rate)
                if name == "constrained":  # those whose grammar completed (then EOS only, ignored)
                    finished = sum(o.token_ids[-1] == tok.eos_token_id for o in outs)
                print(f"round {r + 1}: {name:13s} {rate:8.1f} tok/s", flush=True)

        fresh = iter(range(10**6))

        def schema_of(kind):  # "schema_compiled": a schema never seen, so its compile is in the measured time
            if kind == "unconstrained":
                return None
            s = json.loads(json.dumps(SCHEMA))
            if kind == "schema_compiled":
                s["items"]["properties"][f"k{next(fresh)}"] = {"type": "boolean"}
            return s

        def offline_ms(kind):
            s = schema_of(kind)
            sp = SamplingParams(max_tokens=1, structured_outputs=None if s is None else StructuredOutputsParams(json=s))
            t = time.perf_counter()
            llm.generate(prompts[0], sp, use_tqdm=False)
            return (time.perf_counter() - t) * 1e3

        ttft_ms, growth_ms = _ttft_rounds(offline_ms, args.ttft_runs)
        compile_ms = []
        for _ in range(args.ttft_runs):
            so_new = StructuredOutputsParams(json=schema_of("schema_compiled"))
            t = time.perf_counter()
            llm.grammars.compile(so_new)
            compile_ms.append((time.perf_counter() - t) * 1e3)
        ttft_ms["compile_alone"] = statistics.median(compile_ms)
        print("ttft ms", ttft_ms, "growth ms", growth_ms, flush=True)
        del llm  # the server's engine takes the device next
        if args.device == "cuda":
            torch.cuda.empty_cache()
        (Path(tmp) / "chat.jinja").write_text(CHAT_TEMPLATE)
        with local_server(tmp, ["--device", args.device, "--dtype", args.dtype, "--chat-template",
                                str(Path(tmp) / "chat.jinja")], None) as base, httpx.Client(base_url=base) as client:
            def served_ms(kind):  # to the first chunk with the answer's text (or its end: a token of no whole
                s = schema_of(kind)  # character yet has no text), streamed
                body = {"messages": [{"role": "user", "content": "list the items"}], "max_tokens": 1, "stream": True}
                if s is not None:
                    body["response_format"] = {"type": "json_schema", "json_schema": {"name": "items", "schema": s}}
                t, ms = time.perf_counter(), None
                with client.stream("POST", "/v1/chat/completions", json=body, timeout=60) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if ms is not None or not line.startswith("data: {"):
                            continue
                        c = json.loads(line[6:])["choices"][0]
                        if c["delta"].get("content") or c["finish_reason"]:
                            ms = (time.perf_counter() - t) * 1e3
                return ms

            served_ms("schema_cached")  # the cached schema's compile
            server_ttft_ms, server_growth_ms = _ttft_rounds(served_ms, args.ttft_runs)
        print("server ttft ms", server_ttft_ms, "growth ms", server_growth_ms, flush=True)
    result = dict(shape=SHAPE, tokenizer_vocab=vocab, model_vocab=padded, device=args.device, dtype=args.dtype,
                  threads=torch.get_num_threads(), streams=args.streams, max_tokens=args.max_tokens,
                  rounds=args.rounds, schema=SCHEMA,
                  unconstrained_tok_per_s=round(best["unconstrained"], 1),
                  constrained_tok_per_s=round(best["constrained"], 1),
                  ratio=round(best["constrained"] / best["unconstrained"], 3),
                  median_round_ratio=round(statistics.median(c / u for c, u in zip(rates["constrained"],
                                                                                   rates["unconstrained"])), 3),
                  # each round's pair (constrained / unconstrained, run back to back): the spread the load gave
                  round_ratios=[round(c / u, 3) for c, u in zip(rates["constrained"], rates["unconstrained"])],
                  constrained_finished_by_grammar=finished, load_avg_1m=round(os.getloadavg()[0], 2),
                  ttft_ms={k: round(v, 2) for k, v in ttft_ms.items()},
                  ttft_growth_ms={k: round(v, 2) for k, v in growth_ms.items()},
                  server_ttft_ms={k: round(v, 2) for k, v in server_ttft_ms.items()},
                  server_ttft_growth_ms={k: round(v, 2) for k, v in server_growth_ms.items()},
                  llguidance=llguidance.__version__, torch=torch.__version__)
    print(json.dumps(result, indent=1))
    out = Path(args.out or Path(__file__).resolve().parent / "results" / args.device / "structured.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
