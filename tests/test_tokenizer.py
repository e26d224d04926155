"""Byte-level BPE: exact round trips (unicode, whitespace), save/load, incremental decoding."""
from __future__ import annotations

import pytest

from gpt_engine.tokenizer import EOS, IncrementalDecoder, Tokenizer

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TRAIN = ["def main():\n    print('hello, world')\n\tx = 1\n", "naïve café — 日本語 🙂\n"] * 50
CASES = ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n", "def f(x):\n    return x",
         "naïve café", "日本語のテキスト", "emoji 🙂🚀 zwj 👩‍💻", "unseen: Ωμέγα ж ק", "\x00\x7f control"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TRAIN, vocab_size=300, show_progress=False)


@pytest.mark.parametrize("text", CASES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_and_eos(tok):
    assert tok.vocab_size <= 300 and tok.eos_token_id == 0 and tok.id_to_token(0) == EOS
    assert tok.decode(tok.encode("a") + [tok.eos_token_id]) == "a"  # special tokens skipped
    assert len(tok.encode("def main():")) < len("def main():")  # merges learned


def test_save_load(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file()
    again = Tokenizer.load(tmp_path)
    for text in CASES:
        assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(CASES) == [tok.encode(t) for t in CASES]
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_incremental_decoder(tok):
    text = "日本語 🙂 café"
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push([i]) for i in tok.encode(text)) == text
