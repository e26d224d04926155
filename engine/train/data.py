"""Text -> token shards (numpy memmap) and batches for the trainer.

Sources: a text file, a folder of text files, a .jsonl of {"text"}, {"prompt", "completion"}
or {"messages"} examples (fine-tuning: a parallel uint8 mask marks the tokens that carry loss,
and each batch row stays inside one example), or the default corpus (the Python standard
library's own .py files, present on every machine).

DIR/data/ caches what the trainer needs: tokenizer.json, {train,val}.bin token memmaps,
{train,val}.mask and {train,val}.idx (example bounds) for jsonl data, and meta.json describing
where they came from.
"""
from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write, remove_stale_temps, write_text
from ..chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate

IGNORE_INDEX = -100  # the label of a token without loss (padding, prompts): cross-entropy's ignore_index

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

    def write(tmp):
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
    atomic_write(path, write)
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def split_train_val(files: list[Path], val_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """Every k-th file goes to validation (at least one file, when there are two or more)."""
    if len(files) < 2:
        return files, files
    k = max(2, round(1 / val_fraction))
    val = files[::k]
    train = [f for i, f in enumerate(files) if i % k]
    return train, val


def sample_starts(n_tokens: int, count: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """count random window starts, each leaving room for seq_len + 1 tokens."""
    if n_tokens <= seq_len + 1:
        raise ValueError(f"corpus has {n_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                         f"use a smaller --seq-len or more data")
    return rng.integers(0, n_tokens - seq_len - 1, size=count)


def windows(tokens: np.ndarray, starts, seq_len: int, mask: np.ndarray | None = None):
    """x (B, T) and y = x shifted by one (int64); y is IGNORE_INDEX where mask is 0."""
    x = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int64)
    y = np.stack([tokens[s + 1:s + 1 + seq_len] for s in starts]).astype(np.int64)
    if mask is not None:
        m = np.stack([mask[s + 1:s + 1 + seq_len] for s in starts])
        y[m == 0] = IGNORE_INDEX
    return x, y


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator, mask=None):
    """Random windows: x (B, T) and y = x shifted by one, as int64 numpy arrays."""
    return windows(tokens, sample_starts(len(tokens), batch_size, seq_len, rng), seq_len, mask)


# --- jsonl examples: {"text"}, {"prompt", "completion"}, {"messages"} -------------------

def _check_record(d) -> str | None:
    """What is wrong with one parsed jsonl line, or None."""
    if not isinstance(d, dict):
        return "expected a JSON object"
    if "messages" in d:
        msgs = d["messages"]
        if not isinstance(msgs, list) or not msgs:
            return '"messages" must be a non-empty list'
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f'messages[{j}] must be an object with string "role" and "content"'
        if not any(m["role"] == "assistant" for m in msgs):
            return 'a conversation needs an "assistant" message (only those carry loss)'
        return None
    if "text" in d:
        return None if isinstance(d["text"], str) else '"text" must be a string'
    if isinstance(d.get("prompt"), str) and isinstance(d.get("completion"), str):
        return None
    return 'expected an object with string "prompt" and "completion", a string "text", or "messages"'


def read_jsonl(path: str | Path) -> list[dict]:
    """The examples of a .jsonl file, one object a line: {"text"} (loss on every token),
    {"prompt", "completion"} (loss on the completion) or {"messages": [{"role", "content"}, ...]}
    (loss on the assistant turns). A bad line raises ValueError naming the file and line number."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data path {p} does not exist")
    records = []
    # bytes, decoded line by line: a decoding error then names its line, not just a byte offset
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            problem = _check_record(d)
            if problem:
                raise ValueError(f"{p}:{i}: {problem}")
            records.append(d)
    if not records:
        raise ValueError(f"{p} holds no examples")
    return records


def encode_pairs(pairs, tokenizer) -> tuple[list[int], list[int]]:
    """Pack prompt + completion + eos examples into one stream; mask is 1 where loss counts
    (completion and eos tokens), 0 on prompt tokens."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer.encode_batch([p for p, _ in pairs])
    comps = tokenizer.encode_batch([c for _, c in pairs])
    toks, mask = [], []
    for p, c in zip(prompts, comps):
        c = c + ([eos] if eos is not None else [])
        toks += p + c
        mask += [0] * len(p) + [1] * len(c)
    return toks, mask


def encode_chat(messages: list[dict], tokenizer, template) -> tuple[list[int], list[int]]:
    """A conversation rendered by template and tokenized whole, as the engine tokenizes a rendered
    prompt; mask is 1 on the tokens that start inside an assistant turn."""
    from ..chat_template import assistant_spans
    text, spans = assistant_spans(template, messages)
    ids, offsets = tokenizer.encode_offsets(text)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in offsets]
    return ids, mask


def encode_examples(records: list[dict], tokenizer, template=None, where: str = "data"):
    """Tokens, loss mask and example bounds (n + 1 offsets) of jsonl records; template (a ChatTemplate)
    renders the conversations. A conversation the template refuses raises ValueError naming it."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    toks, mask, bounds = [], [], [0]
    for i, r in enumerate(records):
        if "messages" in r:
            if template is None:
                raise ValueError(f"{where}: conversations need a chat template")
            try:
                t, m = encode_chat(r["messages"], tokenizer, template)
            except ValueError as e:
                raise ValueError(f"{where}: example {i + 1}: {e}") from None
        elif "text" in r:
            t = tokenizer.encode(r["text"]) + eos
            m = [1] * len(t)
        else:
            t, m = encode_pairs([(r["prompt"], r["completion"])], tokenizer)
        toks += t
        mask += m
        bounds.append(len(toks))
    return toks, mask, bounds


def example_text(r: dict) -> str:
    """The text an own tokenizer trains on for one record."""
    if "messages" in r:
        return "\n".join(f"{m['role']}\n{m['content']}" for m in r["messages"])
    return r["text"] if "text" in r else r["prompt"] + r["completion"]


def example_windows(bounds: np.ndarray, mask: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, 2) [start, stop) token ranges of at most seq_len + 1 tokens, each inside one example
    (long examples are cut into several), those without a loss token left out: a batch row is one
    range, so attention and loss never cross an example's boundary."""
    out = []
    for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        for a in range(s, e - 1, seq_len):
            b = min(a + seq_len + 1, e)
            if mask[a + 1:b].any():
                out.append((a, b))
    if not out:
        raise ValueError("no example has a token that carries loss")
    return np.asarray(out, dtype=np.int64)


def example_batch(tokens: np.ndarray, mask: np.ndarray, wins: np.ndarray):
    """x (B, T) and y (B, T) int64 for the ranges wins (B, 2), T the longest range minus one; each row
    is left-aligned and padded, y is IGNORE_INDEX on padding and where mask is 0."""
    T = int((wins[:, 1] - wins[:, 0]).max()) - 1
    x = np.zeros((len(wins), T), dtype=np.int64)
    y = np.full((len(wins), T), IGNORE_INDEX, dtype=np.int64)
    for r, (s, e) in enumerate(wins.tolist()):
        n = e - s - 1
        x[r, :n] = tokens[s:e - 1]
        lab = tokens[s + 1:e].astype(np.int64)
        lab[mask[s + 1:e] == 0] = IGNORE_INDEX
        y[r, :n] = lab
    return x, y


# --- the cached dataset under DIR/data ------------------------------------------------

@dataclass
class Split:
    tokens: np.ndarray                # (n,) uint16/uint32 memmap
    mask: np.ndarray | None = None    # (n,) uint8 memmap: 1 where the token carries loss (jsonl only)
    bounds: np.ndarray | None = None  # (examples + 1,) int64: where each jsonl example starts, then n
    windows: np.ndarray | None = None  # (m, 2) example_windows for the run's seq_len (set by the trainer)


def _save(path: Path, values, dtype) -> np.ndarray:
    atomic_write(path, lambda tmp: np.asarray(values, dtype=dtype).tofile(tmp))
    return np.memmap(path, dtype=dtype, mode="r")


def build_dataset(data: str | Path | None, out: Path, tokenizer, vocab_size: int,
                  corpus_mb: float | None = None, tokenizer_vocab: int | None = None, log=print):
    """Tokenize data into out/ (reused when meta.json matches). tokenizer None: train a
    byte-level BPE of tokenizer_vocab tokens on the training text. Conversations in a .jsonl are
    rendered with the tokenizer's chat template; a tokenizer without one gets
    DEFAULT_CHAT_TEMPLATE (saved with it, so the trained model chats as it was taught).
    corpus_mb caps the default corpus (None: all of it). Returns (tokenizer, train, val)."""
    from ..tokenizer import Tokenizer, iter_texts  # the tokenizers library loads only when needed

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)  # of a build a kill interrupted (meta.json, written last, says a build finished)
    jsonl = data is not None and str(data).endswith(".jsonl")
    records = read_jsonl(data) if jsonl else None
    chats = bool(records) and any("messages" in r for r in records)
    if chats and tokenizer is not None and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    source = "default" if data is None else str(Path(data).resolve())
    meta = dict(source=source, corpus_mb=corpus_mb if data is None else None, vocab_size=vocab_size,
                own_tokenizer=tokenizer is None, jsonl=jsonl, format=2,
                template=getattr(tokenizer, "chat_template", None) if chats else None)
    dtype = token_dtype(vocab_size)
    meta_path = out / "meta.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == meta:
        tok = tokenizer or Tokenizer.load(out)
        splits = [Split(np.memmap(out / f"{s}.bin", dtype=dtype, mode="r"),
                        np.memmap(out / f"{s}.mask", dtype=np.uint8, mode="r") if jsonl else None,
                        np.fromfile(out / f"{s}.idx", dtype=np.int64) if jsonl else None)
                  for s in ("train", "val")]
        return tok, *splits

    if jsonl:
        k = 20  # every 20th example validates, when there are enough of them
        train_r, val_r = (records, records) if len(records) < 2 * k else \
            ([x for i, x in enumerate(records) if i % k], records[::k])
        if tokenizer is None:
            tokenizer = Tokenizer.train((example_text(r) for r in train_r), tokenizer_vocab or vocab_size, False)
            if chats:
                tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        _check_vocab(tokenizer, vocab_size)
        template = ChatTemplate.of_tokenizer(tokenizer) if chats else None
        splits = []
        for name, rs in (("train", train_r), ("val", val_r)):
            toks, mask, bounds = encode_examples(rs, tokenizer, template, where=str(data))
            splits.append(Split(_save(out / f"{name}.bin", toks, dtype), _save(out / f"{name}.mask", mask, np.uint8),
                                np.asarray(_save(out / f"{name}.idx", bounds, np.int64))))
    else:
        cap = None if corpus_mb is None else int(corpus_mb * (1 << 20))
        files = default_corpus_files(cap) if data is None else text_files(data)
        train_f, val_f = split_train_val(files)
        if not any(read_text(f).strip() for f in train_f):
            raise ValueError(f"data {data or 'default corpus'} is empty")
        if tokenizer is None:
            log(f"training a {tokenizer_vocab or vocab_size}-token BPE tokenizer on {len(train_f)} files")
            tokenizer = Tokenizer.train(iter_texts(train_f), tokenizer_vocab or vocab_size, show_progress=False)
        _check_vocab(tokenizer, vocab_size)
        splits = []
        for name, fs in (("train", train_f), ("val", val_f)):
            docs = [d for d in tokenizer.encode_batch(list(iter_texts(fs))) if d]
            if not docs:
                raise ValueError(f"the {name} split of {data or 'the default corpus'} is empty")
            splits.append(Split(write_tokens(out / f"{name}.bin", docs, vocab_size, tokenizer.eos_token_id)))
    tokenizer.save(out)
    write_text(meta_path, json.dumps(dict(key=meta, n_train=len(splits[0].tokens), n_val=len(splits[1].tokens)),
                                     indent=1))
    return tokenizer, *splits


def _check_vocab(tokenizer, vocab_size):
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
