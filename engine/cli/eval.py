"""gpt-engine eval MODEL --data FILE: perplexity of a text file or a .jsonl of {"text"} records.

Each document is tokenized as the trainer tokenizes it (train/data.py: its text without special
tokens, then EOS) and scored through the engine's prompt logprobs (SamplingParams.prompt_logprobs),
windows batched as requests. A document longer than a window is scored in sliding windows, as
transformers' perplexity guide does: windows of --window tokens start every --stride tokens, and each
scores only its tokens the previous window did not, the ones before them being context. A document's
first token has no context and is not scored.

The defaults match the trainer's validation loss: a .jsonl's examples are cut into ranges of seq_len + 1
tokens every seq_len tokens (train/data.py, example_windows), which is --window seq_len+1 --stride
seq_len here; with those, this command's nll_per_token is the trainer's val loss over all the ranges
(tests/test_eval.py holds them to each other).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..engine_config import EngineConfig
from .flags import add_dataclass_args, from_args


def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory (with tokenizer.json)")
    p.add_argument("--data", required=True, help='a text file (one document) or a .jsonl of {"text"} lines')
    p.add_argument("--window", type=int, default=None,
                   help="tokens per window (default: the context length less the one token each request samples)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: window - 1, the trainer's windows)")
    p.add_argument("--batch", type=int, default=64, help="windows in flight at once")
    p.add_argument("--json", dest="json_out", default=None, help="also write the result to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig)


def read_documents(path: str | Path) -> list[str]:
    """The documents of a text file (one) or of a .jsonl's {"text"} records (read as the trainer reads them)."""
    from ..train.data import read_jsonl
    p = Path(path)
    if p.suffix != ".jsonl":
        if not p.is_file():
            raise FileNotFoundError(f"data file {p} does not exist")
        return [p.read_text(encoding="utf-8", errors="replace")]
    docs = []
    for i, d in enumerate(read_jsonl(p), 1):
        if not isinstance(d.get("text"), str):
            raise ValueError(f'{p}: record {i} has no string "text" (eval scores {{"text"}} records)')
        docs.append(d["text"])
    if not docs:
        raise ValueError(f"{p} holds no documents")
    return docs


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first): the windows over n tokens, each scoring the targets [first, end) (their
    logprobs given the tokens from begin)."""
    if window < 2 or not 1 <= stride < window:
        raise ValueError(f"need window >= 2 and 1 <= stride < window, got window {window}, stride {stride}")
    out, prev_end = [], 1
    for b in range(0, max(n - 1, 1), stride):
        e = min(b + window, n)
        if e > prev_end:
            out.append((b, e, max(prev_end, b + 1)))
        prev_end = max(prev_end, e)
        if e == n:
            break
    return out


def perplexity(llm, docs: list[str], window: int, stride: int, batch: int = 64, progress: bool = True) -> dict:
    """Scored over the engine's prompt logprobs -> the result's numbers (nll in nats)."""
    from ..core.sampling_params import SamplingParams
    tok = llm.tokenizer
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    ids = [tok.encode(d) + eos for d in docs]
    jobs = [(ids[i][b:e], first - b) for i, d in enumerate(ids) for b, e, first in windows(len(d), window, stride)]
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    total = sum(len(w) - k for w, k in jobs)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="eval", unit="tok", dynamic_ncols=True, file=sys.stderr)
    nll, t0 = 0.0, time.perf_counter()
    try:
        for a in range(0, len(jobs), batch):
            part = jobs[a:a + batch]
            outs = llm.run_prepared([llm.prepare(w, params) for w, _ in part], use_tqdm=False)
            for (w, k), o in zip(part, outs):
                nll -= math.fsum(o.prompt_logprobs[j][w[j]] for j in range(k, len(w)))
            if bar is not None:
                bar.update(sum(len(w) - k for w, k in part))
    finally:
        if bar is not None:
            bar.close()
    dt = time.perf_counter() - t0
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return dict(documents=len(docs), windows=len(jobs), tokens=total, bytes=n_bytes, nll=nll,
                nll_per_token=nll / max(total, 1), perplexity=math.exp(nll / max(total, 1)),
                nll_per_byte=nll / max(n_bytes, 1), byte_perplexity=math.exp(nll / max(n_bytes, 1)),
                bits_per_byte=nll / max(n_bytes, 1) / math.log(2), window=window, stride=stride,
                seconds=dt, tokens_per_s=total / dt if dt > 0 else None)


def run(args) -> int:
    from ..llm import LLM
    docs = read_documents(args.data)
    llm = LLM(args.model, config=from_args(EngineConfig, args))
    if llm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json): eval tokenizes text")
    window = args.window or llm.max_model_len - 1
    if window + 1 > llm.max_model_len:
        raise ValueError(f"--window {window} leaves no room in the context ({llm.max_model_len} tokens) for the "
                         f"token each request samples: use at most {llm.max_model_len - 1}")
    stride = args.stride or window - 1
    result = dict(model=str(args.model), data=str(args.data),
                  **perplexity(llm, docs, window, stride, args.batch, not args.no_progress))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0
