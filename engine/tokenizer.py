"""Byte-level BPE through the `tokenizers` library: tokenizer.json (HF format), or a GPT-2-era vocab.json +
merges.txt, with what tokenizer_config.json says (special tokens, add_bos_token, chat_template) read the way
transformers (5.x) AutoTokenizer reads the same directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .atomic import atomic_write, write_text
from .models.hf_json import read_json

EOS = "<|endoftext|>"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Attributes: bos_token / eos_token / unk_token / pad_token (str or None) and their *_id; eos_token_ids
    (a list); add_bos_token / add_eos_token (whether encode(..., add_special_tokens=True) adds them);
    chat_template (str, or None; a dict of named templates becomes its "default" one)."""

    def __init__(self, tok: _HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self._tok = tok
        cfg = config or {}
        for key in SPECIAL_KEYS:  # named in tokenizer_config.json (a string or an AddedToken dict)
            setattr(self, key, _token_content(cfg.get(key), key))
        if self.eos_token is None and tok.token_to_id(EOS) is not None:  # our own tokenizers' EOS
            self.eos_token = EOS
        _register_special(tok, cfg, [getattr(self, k) for k in SPECIAL_KEYS])
        for key in SPECIAL_KEYS:
            t = getattr(self, key)
            setattr(self, key + "_id", None if t is None else tok.token_to_id(t))
        self.eos_token_ids = [] if self.eos_token_id is None else [self.eos_token_id]
        probe = tok.encode("", add_special_tokens=True).ids
        self.add_bos_token = bool(probe) and self.bos_token_id is not None and probe[0] == self.bos_token_id
        self.add_eos_token = bool(probe) and self.eos_token_id is not None and probe[-1] == self.eos_token_id
        self.chat_template = chat_template if chat_template is not None else _chat_template(cfg.get("chat_template"))

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (added tokens included), without padding or truncation:
        what grammar engines (llguidance) read."""
        d = json.loads(self._tok.to_str())
        d["padding"] = d["truncation"] = None
        return json.dumps(d)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, show_progress: bool = True) -> "Tokenizer":
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """From a model directory (tokenizer.json, else vocab.json + merges.txt; tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja where present) or a tokenizer.json file.

        As transformers 5 does: with tokenizer.json its post-processor decides what encode adds (tokenizer_config's
        add_bos_token is not read); with vocab.json + merges.txt (GPT-2 byte-level BPE) add_bos_token /
        add_eos_token from tokenizer_config.json decide, and bos/eos/unk default to <|endoftext|>."""
        p = Path(path)
        if not p.is_dir():
            if not p.is_file():
                raise FileNotFoundError(f"no tokenizer.json at {p}")
            return cls(_read_tokenizer_json(p))
        cfg = read_json(p / "tokenizer_config.json")
        for k, v in read_json(p / "special_tokens_map.json").items():
            cfg.setdefault(k, v)
        template = (p / "chat_template.jinja").read_text() if (p / "chat_template.jinja").is_file() else None
        if (p / "tokenizer.json").is_file():
            return cls(_read_tokenizer_json(p / "tokenizer.json"), cfg, template)
        vocab, merges = p / "vocab.json", p / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise FileNotFoundError(f"no tokenizer.json (or vocab.json + merges.txt) in {p}")
        try:
            bpe = models.BPE.from_file(str(vocab), str(merges), dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False)
        except Exception as e:  # tokenizers raises its own exception type on a malformed file
            raise ValueError(f"cannot read {vocab.name} + {merges.name} in {p}: {e}") from None
        tok = _HFTokenizer(bpe)
        add_prefix_space = cfg.get("add_prefix_space", False)
        if not isinstance(add_prefix_space, bool):
            raise ValueError(f"tokenizer_config.json: add_prefix_space must be a bool, got {add_prefix_space!r}")
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        names = {k: _token_content(cfg.get(k), k) for k in SPECIAL_KEYS}
        for k in ("bos_token", "eos_token", "unk_token"):  # GPT2Tokenizer's defaults
            if k not in cfg and tok.token_to_id(EOS) is not None:
                names[k] = EOS
        _register_special(tok, cfg, list(names.values()))
        flags = {}
        for k in ("add_bos_token", "add_eos_token"):
            flags[k] = cfg.get(k, False)
            if not isinstance(flags[k], bool):
                raise ValueError(f"tokenizer_config.json: {k} must be a bool, got {flags[k]!r}")
        bos, eos = names["bos_token"], names["eos_token"]
        single, special = "$A:0", []
        if flags["add_bos_token"] and bos is not None:
            single, special = f"{bos}:0 {single}", [(bos, tok.token_to_id(bos))]
        if flags["add_eos_token"] and eos is not None:
            single, special = f"{single} {eos}:0", special + [(eos, tok.token_to_id(eos))]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} $B:1", special_tokens=special)
        return cls(tok, {**cfg, **{k: v for k, v in names.items() if v is not None}}, template)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        atomic_write(d / "tokenizer.json", lambda p: self._tok.save(str(p)))
        # lets transformers.AutoTokenizer load the directory too
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token or EOS,
               "bos_token": self.bos_token or self.eos_token or EOS, "model_max_length": 1 << 30}
        for key in ("unk_token", "pad_token"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        # keep fields such as a chat_template that someone else wrote
        cfg = {**cfg, **read_json(d / "tokenizer_config.json")}
        write_text(d / "tokenizer_config.json", json.dumps(cfg, indent=2))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        """Every token (added ones too) and its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. add_special_tokens=True adds what the tokenizer's post-processor adds (BOS where
        add_bos_token), as transformers' tokenizer(text) does: use it for a prompt, not for rendered chat
        templates (they carry their BOS as text) nor for training documents."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of text (no special tokens added) and the character span each one covers."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


def _read_tokenizer_json(p: Path) -> _HFTokenizer:
    try:
        return _HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises its own exception type on a malformed file
        raise ValueError(f"{p} is not a valid tokenizer.json: {e}") from None


def _token_content(v, key: str) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or an AddedToken dict with "content"."""
    if v is None:
        return None
    if isinstance(v, dict):
        v = v.get("content")
    if not isinstance(v, str) or not v:
        raise ValueError(f"tokenizer_config.json: {key} must be a token string, got {v!r}")
    return v


def _register_special(tok: _HFTokenizer, cfg: dict, named: list) -> None:
    """Adds tokenizer_config's added_tokens_decoder entries (at their ids) and the named special tokens to the
    backend where it lacks them, as transformers does, so they encode as one token and decode as skippable."""
    have = {t.content: (i, t) for i, t in tok.get_added_tokens_decoder().items()}
    entries = cfg.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise ValueError("tokenizer_config.json: added_tokens_decoder must be an object")
    todo = []
    for i, e in sorted(entries.items(), key=lambda kv: int(kv[0])):
        if not isinstance(e, dict) or not isinstance(e.get("content"), str):
            raise ValueError(f"tokenizer_config.json: added_tokens_decoder[{i}] must have a string content")
        todo.append((int(i), e))
    todo += [(None, {"content": t, "special": True}) for t in named if t is not None]
    for want_id, e in todo:
        content = e["content"]
        if content in have:
            continue
        if want_id is None and tok.token_to_id(content) is None:
            continue  # a named token the vocabulary lacks: not invented here
        at = AddedToken(content, single_word=bool(e.get("single_word", False)), lstrip=bool(e.get("lstrip", False)),
                        rstrip=bool(e.get("rstrip", False)), normalized=bool(e.get("normalized", False)),
                        special=bool(e.get("special", True)))
        (tok.add_special_tokens if at.special else tok.add_tokens)([at])
        got = tok.token_to_id(content)
        if want_id is not None and got != want_id:
            raise ValueError(f"tokenizer_config.json: added token {content!r} should have id {want_id}, got {got}")
        have[content] = (got, at)


def _chat_template(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in v if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    raise ValueError(f"tokenizer_config.json: chat_template must be a string or a list, got {type(v).__name__}")




def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    for p in paths:
        yield Path(p).read_text(encoding="utf-8", errors="replace")
