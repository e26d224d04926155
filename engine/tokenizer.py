"""Byte-level BPE through the `tokenizers` library, stored as tokenizer.json (HF format)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tok: _HFTokenizer):
        self._tok = tok
        self.eos_token_id = tok.token_to_id(EOS)

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
        """From a model directory or a tokenizer.json file."""
        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        return cls(_HFTokenizer.from_file(str(p)))

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        self._tok.save(str(d / "tokenizer.json"))
        # lets transformers.AutoTokenizer load the directory too
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
               "model_max_length": 1 << 30}
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.exists():  # keep fields such as a chat_template that someone else wrote
            cfg = {**cfg, **json.loads(cfg_path.read_text())}
        cfg_path.write_text(json.dumps(cfg, indent=2))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without re-emitting or splitting
    multi-byte characters (a byte-level token can end mid-UTF-8 sequence)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text emitted so far

    def push(self, token_ids: Iterable[int]) -> str:
        self.ids.extend(token_ids)
        full = self.tok.decode(self.ids)
        if full.endswith("\ufffd"):  # incomplete character: wait for the next token
            return ""
        delta, self.text = full[len(self.text):], full
        return delta


def iter_texts(paths: Iterable[Path]) -> Iterator[str]:
    for p in paths:
        yield Path(p).read_text(encoding="utf-8", errors="replace")
