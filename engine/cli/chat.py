"""gpt-engine chat MODEL [--system TEXT]: a terminal chat that streams its answers.

Each answer is one streamed engine request over the whole conversation, rendered by the model's
chat template (or --chat-template); replies join the history. /reset forgets the conversation,
/exit (or Ctrl-D) ends the program, Ctrl-C stops the answer being written.
"""
from __future__ import annotations

import signal
import sys
import threading

from ..core.request import RequestError
from ..engine_config import EngineConfig
from .flags import add_dataclass_args, from_args

PROMPT = ">>> "
DEFAULT_MAX_TOKENS = 256
STOPPED = "[stopped]"
HELP = "commands: /reset forgets the conversation, /exit quits; Ctrl-C stops an answer, Ctrl-D quits"


def add_args(p) -> None:
    p.add_argument("model", help="HF-format model directory (with tokenizer.json and a chat template)")
    p.add_argument("--system", default=None, help="system prompt opening every conversation")
    p.add_argument("--chat-template", default=None, metavar="FILE|STRING",
                   help="jinja chat template (a file or the template itself) instead of the model's")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens of one answer; older exchanges are dropped to leave room for them (default: the "
                        f"model's generation_config max_new_tokens, else {DEFAULT_MAX_TOKENS}, cut to the context left)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--ignore-eos", action="store_true", help="write until --max-tokens or the context is full")
    add_dataclass_args(p.add_argument_group("engine"), EngineConfig)


class Chat:
    """A conversation with llm (an LLM): the history, and one streamed answer at a time."""

    def __init__(self, llm, template, fields: dict, system: str | None = None):
        """fields: the SamplingParams fields the user set (the model's defaults fill the rest)."""
        self.llm, self.template, self.fields, self.system = llm, template, fields, system
        self.history: list[dict] = []
        self.interrupted = False
        self._turn = 0
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def prepare(self):
        """The conversation as a prepared request (the template carries its BOS)."""
        text = self.template.render(self.history, add_generation_prompt=True)
        return self.llm.prepare(text, self.fields, add_special_tokens=False, param="messages",
                                default_max_tokens=DEFAULT_MAX_TOKENS)

    def fit(self, write):
        """The prepared request once the conversation leaves room to answer: the oldest exchanges are
        dropped as the context fills (the system prompt and the new message stay); None when the new
        message alone leaves no room."""
        first = 1 if self.system else 0
        while True:
            try:
                return self.prepare()
            except RequestError as e:
                if e.code != "context_length_exceeded":
                    raise
                if len(self.history) - first <= 1:
                    return None
            del self.history[first:first + 2]
            write("[the oldest exchange was dropped to fit the context]\n")

    def send(self, message: str, write) -> str:
        """Answer message, writing the answer as it streams; returns it (cut short by Ctrl-C, or
        stop(), after which the answer ends with STOPPED)."""
        self.interrupted = False
        # Ctrl-C sets a flag the loop reads between engine steps: an interrupt inside a step would
        # leave the scheduler half-updated
        previous = signal.signal(signal.SIGINT, lambda *_: self.stop()) if _main_thread() else None
        rid = f"chat-{self._turn}"
        self._turn += 1
        reply, finished, started = [], False, False
        try:
            self.history.append({"role": "user", "content": message})
            request = self.fit(write)
            if request is None:
                self.history.pop()
                write("[the message does not fit the model's context]\n")
                return ""
            self.llm.add_request(request, request_id=rid, stream=True)
            started = True
            while not finished and not self.interrupted:
                for out in self.llm.step():
                    if out.request_id == rid:
                        reply.append(out.new_text)
                        write(out.new_text)
                        finished = out.finished
        finally:
            if started and not finished:
                self.llm.abort(rid)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            write(f" {STOPPED}")
        write("\n")
        text = "".join(reply)
        self.history.append({"role": "assistant", "content": text})
        return text

    def stop(self) -> None:
        self.interrupted = True


def _main_thread() -> bool:  # signal handlers can only be set from the main thread
    return threading.current_thread() is threading.main_thread()


def repl(chat: Chat, read=input, write=None) -> int:
    """The read-answer loop: 0 on /exit or end of input."""
    if write is None:
        def write(s):
            sys.stdout.write(s)
            sys.stdout.flush()
    write(HELP + "\n")
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            write("\n")
            continue
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            return 0
        if message == "/reset":
            chat.reset()
            write("[conversation reset]\n")
            continue
        chat.send(message, write)


def run(args) -> int:
    from ..chat_template import read_template_arg
    from ..llm import LLM
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    llm = LLM(args.model, config=from_args(EngineConfig, args))
    if llm.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tokenizer.json or vocab.json + merges.txt): chat needs one")
    template = llm.template(read_template_arg(args.chat_template) if args.chat_template else None,
                            hint="pass --chat-template FILE|STRING")
    fields = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                  ignore_eos=args.ignore_eos)
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    return repl(Chat(llm, template, fields, args.system))
