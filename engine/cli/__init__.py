"""gpt-engine train | generate | chat | serve | bench | eval   (also: python -m gpt_engine ...)

Each subcommand's module owns its flags: add_args(parser) and run(args).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__

COMMANDS = {
    "train": ("gpt_engine.cli.train", "train or fine-tune a model; writes an HF-format directory"),
    "generate": ("gpt_engine.cli.generate", "generate text from a model directory"),
    "chat": ("gpt_engine.cli.chat", "chat with a model in the terminal (streamed answers)"),
    "serve": ("gpt_engine.cli.serve", "OpenAI-compatible HTTP server"),
    "bench": ("gpt_engine.cli.bench", "offline throughput benchmark against HF generate"),
    "eval": ("gpt_engine.cli.eval", "perplexity of a text file or .jsonl (sliding windows, prompt logprobs)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torch's CPU allocator puts large tensors on transparent huge pages only when this is set
    # before its first large allocation: the engine's own processes opt in (a user's setting
    # wins), so activations get them too, and in `bench` so does the HF baseline.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    parser = argparse.ArgumentParser(prog="gpt-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # only the chosen subcommand's module is imported: `gpt-engine generate` needs no server deps
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            importlib.import_module(mod).add_args(p)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
    except (ValueError, OSError) as e:  # bad input (flags, files, model configs): the message, not a traceback
        print(f"gpt-engine {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
