"""gpt-engine train | generate | chat | serve | bench | bench serve | eval   (also: python -m gpt_engine ...)

Each subcommand's module owns its flags: add_args(parser) and run(args).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__

# `bench serve` is a command of its own, read before the others: `gpt-engine bench MODEL` keeps its
# positional model (a model directory named serve: `gpt-engine bench ./serve`)
BENCH_SERVE = "gpt_engine.cli.bench_serve"
COMMANDS = {
    "train": ("gpt_engine.cli.train", "train or fine-tune a model; writes an HF-format directory"),
    "generate": ("gpt_engine.cli.generate", "generate text from a model directory"),
    "chat": ("gpt_engine.cli.chat", "chat with a model in the terminal (streamed answers)"),
    "serve": ("gpt_engine.cli.serve", "OpenAI-compatible HTTP server"),
    "bench": ("gpt_engine.cli.bench", "offline throughput benchmark against HF generate "
              "(`bench serve`: load generator for an OpenAI-compatible server)"),
    "eval": ("gpt_engine.cli.eval", "perplexity of a text file or .jsonl (sliding windows, prompt logprobs)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # torch's CPU allocator puts large tensors on transparent huge pages only when this is set
    # before its first large allocation: the engine's own processes opt in (a user's setting
    # wins), so activations get them too, and in `bench` so does the HF baseline.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if argv[:2] == ["bench", "serve"]:
        command, module = "bench serve", importlib.import_module(BENCH_SERVE)
        parser = argparse.ArgumentParser(prog="gpt-engine bench serve", description=module.__doc__.splitlines()[0])
        module.add_args(parser)
        args = parser.parse_args(argv[2:])
    else:
        args = _parser(argv).parse_args(argv)
        command, module = args.command, importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except (ValueError, OSError) as e:  # bad input (flags, files, model configs, an unreachable server): the message
        print(f"gpt-engine {command}: error: {e}", file=sys.stderr)
        return 2


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpt-engine", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # only the chosen subcommand's module is imported: `gpt-engine generate` needs no server deps
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == chosen:
            importlib.import_module(mod).add_args(p)
    return parser


if __name__ == "__main__":
    sys.exit(main())
