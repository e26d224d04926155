"""Text -> token shards (numpy memmap) and batches for the trainer.

Sources: a text file, a folder of text files, or the default corpus (the Python standard
library's own .py files, present on every machine). Fine-tuning .jsonl lives in the trainer.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".c", ".h", ".html", ".csv", ""}


def default_corpus_files(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files in a fixed order (tests excluded), up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    if max_bytes is None:
        return files
    out, total = [], 0
    for p in files:
        out.append(p)
        total += p.stat().st_size
        if total >= max_bytes:
            break
    return out


def text_files(path: str | Path) -> list[Path]:
    """A file, or the text files under a folder (sorted, for a reproducible order)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {p} holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
        return files
    raise FileNotFoundError(f"data path {p} does not exist")


def read_text(path: Path) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_tokens(path: Path, docs: list[list[int]], vocab_size: int, eos: int | None) -> np.memmap:
    """Concatenate documents (separated by eos) into a memmap at path; returns it opened read-only."""
    n = sum(len(d) for d in docs) + (len(docs) if eos is not None else 0)
    tmp = Path(str(path) + ".tmp")
    arr = np.memmap(tmp, dtype=token_dtype(vocab_size), mode="w+", shape=(n,))
    i = 0
    for d in docs:
        arr[i:i + len(d)] = d
        i += len(d)
        if eos is not None:
            arr[i] = eos
            i += 1
    arr.flush()
    del arr
    tmp.replace(path)
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def split_train_val(files: list[Path], val_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """Every k-th file goes to validation (at least one file, when there are two or more)."""
    if len(files) < 2:
        return files, files
    k = max(2, round(1 / val_fraction))
    val = files[::k]
    train = [f for i, f in enumerate(files) if i % k]
    return train, val


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator):
    """Random windows: x (B, T) and y = x shifted by one, as int64 numpy arrays."""
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"corpus has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    x = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)
    y = np.stack([tokens[s + 1:s + 1 + seq_len] for s in starts]).astype(np.int64)
    return x, y
