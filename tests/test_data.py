"""Data pipeline: sources, token memmaps, batches, jsonl pairs, the cached dataset."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpt_engine.train.data import (IGNORE_INDEX, build_dataset, default_corpus_files, encode_pairs, read_jsonl, sample_batch,
                         split_train_val, text_files, token_dtype, windows, write_tokens)
from gpt_engine.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("torch_cpu_path")

TEXT = "".join(f"line {i}: the quick brown fox, ünïcode ✓\n" for i in range(300))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300, show_progress=False)


def test_text_files(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.py").write_text("a")
    (tmp_path / "d" / "img.png").write_bytes(b"\x89PNG")
    assert [p.name for p in text_files(tmp_path / "d")] == ["b.txt", "a.py"]
    assert text_files(tmp_path / "d" / "b.txt") == [tmp_path / "d" / "b.txt"]
    with pytest.raises(FileNotFoundError, match="missing"):
        text_files(tmp_path / "missing")
    (tmp_path / "e").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        text_files(tmp_path / "e")


def test_default_corpus_listing():
    files = default_corpus_files(200_000)
    assert files and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files[:-1]) < 200_000 <= sum(f.stat().st_size for f in files)
    assert files == default_corpus_files(200_000)  # fixed order
    train, val = split_train_val(files)
    assert val and not set(train) & set(val) and len(train) + len(val) == len(files)


def test_write_tokens_dtype_and_layout(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    arr = write_tokens(tmp_path / "t.bin", [[1, 2], [3]], 300, eos=0)
    assert arr.dtype == np.uint16 and arr.tolist() == [1, 2, 0, 3, 0]
    big = write_tokens(tmp_path / "u.bin", [[70000]], 100_000, eos=None)
    assert big.dtype == np.uint32 and big.tolist() == [70000]


def test_sample_batch_shapes_and_shift():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = sample_batch(tokens, 5, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (5, 16) and x.dtype == np.int64
    assert (y == x + 1).all()
    with pytest.raises(ValueError, match="seq_len"):
        sample_batch(tokens[:10], 2, 16, np.random.default_rng(0))


def test_windows_mask():
    tokens = np.arange(20, dtype=np.uint16)
    mask = (np.arange(20) % 2).astype(np.uint8)
    x, y = windows(tokens, [0, 3], 5, mask)
    assert x[0].tolist() == [0, 1, 2, 3, 4]
    assert y[0].tolist() == [1, IGNORE_INDEX, 3, IGNORE_INDEX, 5]


def test_read_jsonl_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    assert read_jsonl(p) == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    p.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(p)
    p.write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected"):
        read_jsonl(p)
    p.write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl(p)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "none.jsonl")


def test_read_jsonl_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes('{"text": "héllo"}\n'.encode() + b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"bytes.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        read_jsonl(p)


def test_encode_pairs_masks_prompt(tok):
    toks, mask = encode_pairs([("line 1:", " the fox"), ("ab", "c")], tok)
    p1, c1 = tok.encode("line 1:"), tok.encode(" the fox")
    n1 = len(p1) + len(c1) + 1
    assert toks[:n1] == p1 + c1 + [tok.eos_token_id]
    assert mask[:n1] == [0] * len(p1) + [1] * (len(c1) + 1)
    assert len(toks) == len(mask)


def test_build_dataset_text_folder_jsonl_and_cache(tmp_path, tok):
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(TEXT[i * 100:])
    t, tr, va = build_dataset(tmp_path / "docs", tmp_path / "c1", None, 320, tokenizer_vocab=300, log=lambda *a: None)
    assert tr.tokens.dtype == np.uint16 and tr.mask is None and len(va.tokens) > 0
    assert (tmp_path / "c1" / "tokenizer.json").is_file()
    assert t.decode(tr.tokens[:20].tolist()) in TEXT[100:] + TEXT[:100] or len(tr.tokens) > 20
    mtime = (tmp_path / "c1" / "train.bin").stat().st_mtime_ns
    t2, tr2, _ = build_dataset(tmp_path / "docs", tmp_path / "c1", None, 320, tokenizer_vocab=300)
    assert (tmp_path / "c1" / "train.bin").stat().st_mtime_ns == mtime and np.array_equal(tr.tokens, tr2.tokens)

    j = tmp_path / "p.jsonl"
    j.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(50)))
    _, tr, va = build_dataset(j, tmp_path / "c2", tok, 320)
    assert tr.mask is not None and len(tr.mask) == len(tr.tokens) and tr.mask.dtype == np.uint8
    assert len(va.tokens) < len(tr.tokens)  # every 20th example validates
    with pytest.raises(ValueError, match="tokens but the model only"):
        build_dataset(j, tmp_path / "c3", tok, 100)


def test_build_dataset_default_corpus(tmp_path):
    t, tr, va = build_dataset(None, tmp_path / "c", None, 512, corpus_mb=0.25, log=lambda *a: None)
    assert t.vocab_size <= 512 and len(tr.tokens) > 10_000 and len(va.tokens) > 0
    assert t.eos_token_id in set(tr.tokens[:5000].tolist())  # documents are eos-separated
