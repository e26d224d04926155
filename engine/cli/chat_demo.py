"""`make chat`: a small model taught to answer questions about the Python standard library.

    python -m gpt_engine.cli.chat_demo [--base runs/tiny] [--out runs/chat] [--no-chat]

1. The base model: --base if it holds a model (make run's), else pretrained there on the default corpus.
2. Conversations from the standard library's own docstrings: "What does json.dumps do?" -> the first
   sentence of its docstring; every tenth question is held out.
3. Chat fine-tuning on the rest (loss on the answers only), with the held-out answer loss printed
   before and after.
4. The terminal chat with the result (--no-chat, or GPT_ENGINE_NO_CHAT=1, skips it).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import warnings
from pathlib import Path

# modules whose public names make the questions: imported for their docstrings, none with side effects
MODULES = ("abc", "argparse", "base64", "bisect", "calendar", "collections", "colorsys", "copy", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib",
           "heapq", "hmac", "html", "inspect", "io", "ipaddress", "itertools", "json", "keyword", "logging", "math",
           "operator", "os", "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re", "secrets", "shlex",
           "shutil", "socket", "statistics", "string", "struct", "subprocess", "tempfile", "textwrap", "threading",
           "time", "timeit", "tokenize", "traceback", "types", "typing", "unicodedata", "urllib.parse", "uuid",
           "warnings", "weakref", "zipfile", "zlib")
HOLD_OUT = 10  # every tenth question is held out


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence, on one line; None for signatures-only or very short docs."""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    sentence = m.group(1) if m else text
    if len(sentence) < 12 or len(sentence) > 200 or "(" in sentence.split(" ")[0]:
        return None
    return sentence


def questions() -> list[tuple[str, str]]:
    """(question, answer) pairs in a fixed order."""
    pairs, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            mod = importlib.import_module(name)
            for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
                if attr.startswith("_"):
                    continue
                obj = getattr(mod, attr, None)
                if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                    continue
                doc = getattr(obj, "__doc__", None)
                answer = first_sentence(doc) if isinstance(doc, str) else None
                q = f"What does {name}.{attr} do?"
                if answer and q not in seen:
                    seen.add(q)
                    pairs.append((q, answer))
    return pairs


def conversation(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write_data(d: Path) -> tuple[Path, list[dict]]:
    """d/train.jsonl and the held-out conversations."""
    pairs = questions()
    d.mkdir(parents=True, exist_ok=True)
    train = [conversation(q, a) for i, (q, a) in enumerate(pairs) if i % HOLD_OUT]
    held = [conversation(q, a) for i, (q, a) in enumerate(pairs) if not i % HOLD_OUT]
    path = d / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in train))
    (d / "heldout.jsonl").write_text("".join(json.dumps(c) + "\n" for c in held))
    print(f"{len(pairs)} questions from {len(MODULES)} standard-library modules: {len(train)} to train on, "
          f"{len(held)} held out")
    return path, held


def answer_loss(model_dir: Path, records: list[dict], template_source: str) -> float:
    """Mean loss per answer token (nats) of the records' assistant turns under the model."""
    import torch
    import torch.nn.functional as F

    from ..chat_template import ChatTemplate
    from ..train.data import IGNORE_INDEX, encode_examples
    from ..tokenizer import Tokenizer
    from ..models.loader import load_model
    tok = Tokenizer.load(model_dir)
    model = load_model(model_dir, dtype=torch.float32).eval()
    template = ChatTemplate(template_source, {"eos_token": tok.eos_token, "bos_token": tok.bos_token})
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            toks, mask, _ = encode_examples([r], tok, template)
            x = torch.tensor([toks[:-1]])
            y = torch.tensor(toks[1:])
            y[torch.tensor(mask[1:]) == 0] = IGNORE_INDEX
            total += F.cross_entropy(model(x)[0].float(), y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((y != IGNORE_INDEX).sum())
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/tiny", help="pretrained model directory (made here when absent)")
    p.add_argument("--out", default="runs/chat", help="the fine-tuned model directory")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning peak learning rate")
    p.add_argument("--no-chat", action="store_true", help="stop after fine-tuning (also GPT_ENGINE_NO_CHAT=1)")
    args = p.parse_args(argv)

    from ..chat_template import DEFAULT_CHAT_TEMPLATE
    from ..cli import main as cli
    from ..tokenizer import Tokenizer
    from ..train.config import TrainConfig
    from ..train.trainer import train
    base, out = Path(args.base), Path(args.out)
    if not (base / "config.json").is_file():
        print(f"pretraining {base} on the default corpus")
        cli(["train", "--out", str(base)])
    data, held = write_data(out.parent / f"{out.name}-data")
    template = Tokenizer.load(base).chat_template or DEFAULT_CHAT_TEMPLATE
    before = answer_loss(base, held, template)
    print(f"held-out answer loss before fine-tuning: {before:.3f}")
    train(TrainConfig(out=str(out), init=str(base), data=str(data), steps=args.steps, lr=args.lr, batch_size=16,
                      seq_len=128, eval_every=max(1, args.steps // 3), log_every=10))
    after = answer_loss(out, held, template)
    print(f"held-out answer loss before fine-tuning: {before:.3f}, after: {after:.3f} "
          f"({len(held)} held-out questions)")
    if args.no_chat or os.environ.get("GPT_ENGINE_NO_CHAT"):
        return 0
    print(f"held-out questions to try: {held[0]['messages'][0]['content']!r}, {held[1]['messages'][0]['content']!r}")
    return cli(["chat", str(out), "--temperature", "0"])


if __name__ == "__main__":
    raise SystemExit(main())
