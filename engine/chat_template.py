"""Chat templates as HF tokenizer_config.json carries them (jinja2, sandboxed), else a plain
default: "<|role|>\\ncontent\\n" per message and "<|assistant|>\\n" to prompt the reply."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .request import RequestError

log = logging.getLogger("gpt_engine.chat_template")


def _raise_template_error(msg):
    raise ValueError(msg)


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._template = None
        if source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            text = "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages)
            return text + ("<|assistant|>\n" if add_generation_prompt else "")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # a template's raise_exception or a bad message shape: the caller's fault
            raise RequestError(f"chat template: {e}", "messages") from e


def load_chat_template(model_dir: str | Path) -> ChatTemplate:
    """The chat template of an HF model directory (tokenizer_config.json or chat_template.jinja)."""
    d = Path(model_dir)
    cfg_path, jinja_path = d / "tokenizer_config.json", d / "chat_template.jinja"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    source = cfg.get("chat_template")
    if isinstance(source, list):  # HF's named templates: [{"name", "template"}]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if source is None and jinja_path.is_file():
        source = jinja_path.read_text()

    def tok(name):
        v = cfg.get(name) or ""
        return v.get("content", "") if isinstance(v, dict) else v
    return ChatTemplate(source, tok("bos_token"), tok("eos_token"))
