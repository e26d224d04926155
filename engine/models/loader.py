"""Checkpoints with HF tensor names: what we save HF loads, what HF (and the hub) saves we load.

load_model reads a directory as the hub serves it: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (sharded too, pytorch_model.bin.index.json) read with
torch.load(weights_only=True). GPT-2 and GPT-Neo tensors may carry the `transformer.` prefix or not (the hub's
layout, with the attention's bias / masked_bias mask buffers). The model is built on the meta device and its
parameters allocated once; shards are read one at a time and each tensor lands straight in its slot of the
parameters: safetensors by plain file reads into the parameters' memory, a .bin from a memory mapping whose pages
are released as they are copied. Peak memory is the model plus a few MB (benchmarks/load_memory.py measures it).
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .gpt import GPT


# Each family's tensor names: HF name (without its `transformer.` / `model.` prefix) -> (our parameter, the rows
# it fills or None for all, stored transposed as GPT-2's Conv1D stores its weights). Loading and saving both
# read this one table.
_Target = tuple[str, "tuple[int, int] | None", bool]


def _prefix(cfg: ModelConfig) -> str:
    return "model." if cfg.rotary else "transformer."


def _qkv_sizes(cfg: ModelConfig) -> list[int]:
    return [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]


def _split(plan: dict, names, ours: str, sizes, kinds=("weight",)) -> None:
    """HF's separate tensors `names` (e.g. q/k/v) filling consecutive row ranges of our fused parameter."""
    for kind in kinds:
        start = 0
        for name, n in zip(names, sizes):
            plan[f"{name}.{kind}"] = (f"{ours}.{kind}", (start, start + n), False)
            start += n


def _plan(cfg: ModelConfig) -> tuple[dict[str, _Target], re.Pattern]:
    """checkpoint tensor name (HF prefix stripped) -> where it goes; and the names to skip (buffers)."""
    plan: dict[str, _Target] = {}

    def whole(theirs, ours, kinds=("weight", "bias"), transposed=False):
        for kind in kinds:
            plan[f"{theirs}.{kind}"] = (f"{ours}.{kind}", None, transposed and kind == "weight")

    if not cfg.rotary:  # gpt2, gpt_neo
        whole("wte", "tok_emb", ("weight",))
        whole("wpe", "pos_emb", ("weight",))
        whole("ln_f", "norm_f")
        conv1d = cfg.model_type == "gpt2"
        for i in range(cfg.n_layer):
            h, p = f"h.{i}.", f"layers.{i}."
            whole(h + "ln_1", p + "norm1")
            whole(h + "ln_2", p + "norm2")
            whole(h + "mlp.c_fc", p + "mlp.fc", transposed=conv1d)
            whole(h + "mlp.c_proj", p + "mlp.proj", transposed=conv1d)
            if conv1d:
                whole(h + "attn.c_attn", p + "attn.qkv", transposed=True)
                whole(h + "attn.c_proj", p + "attn.proj", transposed=True)
            else:
                _split(plan, [h + f"attn.attention.{x}_proj" for x in "qkv"], p + "attn.qkv", _qkv_sizes(cfg))
                whole(h + "attn.attention.out_proj", p + "attn.proj")
        skip = r"h\.\d+\.attn\.(attention\.)?(bias|masked_bias)"  # causal-mask buffers of older checkpoints
    else:
        whole("embed_tokens", "tok_emb", ("weight",))
        whole("norm", "norm_f", ("weight",))
        qkv_kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
        for i in range(cfg.n_layer):
            h, p = f"layers.{i}.", f"layers.{i}."
            whole(h + "input_layernorm", p + "norm1", ("weight",))
            whole(h + "post_attention_layernorm", p + "norm2", ("weight",))
            _split(plan, [h + f"self_attn.{x}_proj" for x in "qkv"], p + "attn.qkv", _qkv_sizes(cfg), qkv_kinds)
            whole(h + "self_attn.o_proj", p + "attn.proj", ("weight",))
            _split(plan, [h + "mlp.gate_proj", h + "mlp.up_proj"], p + "mlp.fc", [cfg.d_ff, cfg.d_ff])
            whole(h + "mlp.down_proj", p + "mlp.proj", ("weight",))
        skip = r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
    if cfg.tie_embeddings:
        skip += r"|lm_head\.weight"
    else:
        plan["lm_head.weight"] = ("lm_head.weight", None, False)
    return plan, re.compile(skip)


def to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's parameters under their HF names and layouts."""
    cfg, sd = model.config, model.state_dict()
    plan, _ = _plan(cfg)
    unmapped = set(sd) - {pname for pname, _, _ in plan.values()}
    assert not unmapped, unmapped  # the table names every parameter
    out = {}
    for name, (pname, rows, transposed) in plan.items():
        t = sd[pname] if rows is None else sd[pname][rows[0]:rows[1]]
        out[name if name.startswith("lm_head.") else _prefix(cfg) + name] = t.t() if transposed else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def _checkpoint_files(d: Path) -> list[Path]:
    """The weight files of a model directory, in the order to read them."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (d / single).is_file():
            return [d / single]
        if (d / index).is_file():
            try:
                weight_map = json.loads((d / index).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{d / index} is not a valid shard index: {e!r}") from None
            for name in files:
                if not isinstance(name, str) or Path(name).name != name:
                    raise ValueError(f"{d / index}: bad shard file name {name!r}")
                if not (d / name).is_file():
                    raise FileNotFoundError(f"{d / index} names {name}, which is missing")
            return [d / n for n in files]
    raise FileNotFoundError(f"{d} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin "
                            "or pytorch_model.bin.index.json")


# A checkpoint tensor is copied in row blocks of at most this many bytes: the most a dtype conversion, a
# transposition or a not-yet-released page of a mapped .bin holds beside the parameters.
_CHUNK_BYTES = 16 << 20
_ST_DTYPES = {k: getattr(torch, v) for k, v in dict(
    F64="float64", F32="float32", F16="float16", BF16="bfloat16", F8_E4M3="float8_e4m3fn", F8_E5M2="float8_e5m2",
    I64="int64", I32="int32", I16="int16", I8="int8", U8="uint8", BOOL="bool").items() if hasattr(torch, v)}
_ST_MAX_HEADER = 100 << 20  # safetensors' own limit


def _row_blocks(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, int]]:
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows, step = shape[0], max(1, _CHUNK_BYTES // row_bytes)
    return ((i, min(rows, i + step)) for i in range(0, rows, step))


def _block_of(out: torch.Tensor, i: int, j: int, transposed: bool) -> torch.Tensor:
    """out's part that source rows i:j fill (out holds the source's transpose when transposed)."""
    return out[:, i:j] if transposed else out[i:j]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _FileTensor:
    """One tensor of a safetensors file, not read yet: read() puts it straight into the parameter's memory
    with ordinary file reads, so the file's pages (kernel page cache) never count as the process' memory."""

    def __init__(self, file, path: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, nbytes: int):
        self.file, self.path, self.name, self.st_dtype, self.shape = file, path, name, dtype, shape
        self.start, self.nbytes = start, nbytes

    @property
    def dtype(self) -> torch.dtype | None:  # None: a dtype torch has no name for here (never a weight we read)
        return _ST_DTYPES.get(self.st_dtype)

    def _read(self, buf: torch.Tensor, offset: int) -> None:
        view, done = _bytes_of(buf), 0
        self.file.seek(self.start + offset)
        while done < len(view):
            n = self.file.readinto(view[done:])
            if not n:
                raise ValueError(f"{self.path.name}: file ends inside tensor {self.name!r}")
            done += n

    def copy_to(self, out: torch.Tensor, transposed: bool) -> None:
        if out.numel() == 0:
            return
        if out.dtype == self.dtype and not transposed and out.is_contiguous() and out.device.type == "cpu":
            self._read(out, 0)
            return
        if not self.shape:
            buf = torch.empty((), dtype=self.dtype)
            self._read(buf, 0)
            out.copy_(buf)
            return
        row_bytes = self.nbytes // self.shape[0]
        for i, j in _row_blocks(self.shape, self.dtype.itemsize):
            buf = torch.empty((j - i, *self.shape[1:]), dtype=self.dtype)
            self._read(buf, i * row_bytes)
            _block_of(out, i, j, transposed).copy_(buf.t() if transposed else buf)


def _safetensors_entries(path: Path, f) -> list[_FileTensor]:
    """The tensors a safetensors file's header describes, in file order; ValueError on a malformed header."""
    size = path.stat().st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, _ST_MAX_HEADER):
        raise ValueError(f"{path.name} is not a safetensors file (bad header length)")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the safetensors header is not an object")
    out = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            ok = (all(isinstance(x, int) and x >= 0 for x in (*shape, a, b)) and a <= b <= size - 8 - n
                  and (dtype not in _ST_DTYPES or b - a == math.prod(shape) * _ST_DTYPES[dtype].itemsize))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path.name}: bad safetensors header entry for {name!r}: {e!r}")
        out.append(_FileTensor(f, path, name, dtype, shape, 8 + n + a, b - a))
    return sorted(out, key=lambda t: t.start)


class _LoadedTensor:
    """One tensor of a torch.load'ed (.bin) state dict. When it lives in a memory mapping of the file, the
    mapped pages are released block by block once copied, so the file never becomes resident as a whole."""

    def __init__(self, t: torch.Tensor, mapping: list[tuple[int, int]]):
        self.t, self.mapping, self.shape, self.dtype = t, mapping, tuple(t.shape), t.dtype

    def copy_to(self, out: torch.Tensor, transposed: bool) -> None:
        t = self.t
        if t.dim() == 0 or t.numel() == 0:
            out.copy_(t)
            return
        for i, j in _row_blocks(self.shape, t.element_size()):
            part = t[i:j]
            _block_of(out, i, j, transposed).copy_(part.t() if transposed else part)
            self._release(part)

    def _release(self, part: torch.Tensor) -> None:
        if not self.mapping or not part.is_contiguous():
            return
        start, end = part.data_ptr(), part.data_ptr() + part.numel() * part.element_size()
        if any(a <= start and end <= b for a, b in self.mapping):
            _drop_pages(start, end)


def _drop_pages(start: int, end: int) -> None:
    """madvise(DONTNEED) the whole pages of [start, end): only ever called on an unmodified private mapping of a
    checkpoint file, where a page touched again just reads back from the file (pages shared with a neighbouring
    tensor included)."""
    page = mmap.PAGESIZE
    a, b = (start + page - 1) // page * page, end // page * page
    if b > a:
        _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), 4)  # MADV_DONTNEED (4 on Linux)


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _file_mapping(path: Path) -> list[tuple[int, int]]:
    """The address ranges where path is mapped in this process, from /proc/self/maps; none where there is no such
    file (not Linux) or path is not mapped (a legacy .bin read into memory, whose pages are never released)."""
    if not sys.platform.startswith("linux"):
        return []
    target, ranges = str(path.resolve()), []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] == target:
                    a, b = parts[0].split("-")
                    ranges.append((int(a, 16), int(b, 16)))
    except OSError:
        return []
    return ranges


def _iter_tensors(path: Path) -> Iterator[tuple[str, "_FileTensor | _LoadedTensor"]]:
    """(name, tensor source) of one weight file, one tensor at a time; each source has shape, dtype and
    copy_to(out, transposed), and is read only when copied."""
    if path.name.endswith(".safetensors"):
        with open(path, "rb", buffering=0) as f:
            for t in _safetensors_entries(path, f):
                yield t.name, t
        return
    mapping: list[tuple[int, int]] = []
    try:  # never unpickle code; mmap keeps a .bin shard out of memory until read
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        mapping = _file_mapping(path)
    except RuntimeError:  # legacy (non-zip) serialization cannot be mmapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    while sd:
        k, t = sd.popitem()
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor")
        yield k, _LoadedTensor(t, mapping)


def _first_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a weight file (cheap for safetensors: the header only)."""
    tensors = _iter_tensors(path)
    try:
        for _, t in tensors:
            if t.dtype is not None and t.dtype.is_floating_point:
                return t.dtype
        return torch.float32
    finally:
        tensors.close()


def _strip(cfg: ModelConfig, name: str) -> str:
    return name.removeprefix(_prefix(cfg))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """Load an HF-format model directory (see the module docstring for the layouts); dtype None keeps the
    checkpoint's."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory {d} does not exist")
    cfg = ModelConfig.load(d)  # validated before anything large is allocated
    files = _checkpoint_files(d)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dtype = dtype or _first_dtype(files[0])
    device = torch.device(device)
    with torch.device("meta"):
        model = GPT(cfg)
    params = dict(model.named_parameters())
    plan, skip = _plan(cfg)
    unknown = [n for n in plan if plan[n][0] not in params]
    assert not unknown, unknown  # the plan only names parameters the model has
    # parameters allocated once, in the target dtype on the target device; each tensor lands in its rows
    dest = {n: torch.empty(p.shape, dtype=dtype, device=device) for n, p in params.items()}
    seen: set[str] = set()
    for f in files:
        for raw, src in _iter_tensors(f):
            name = _strip(cfg, raw)
            if name not in plan:
                if skip.fullmatch(name):
                    continue
                raise ValueError(f"{f.name}: unexpected tensor {raw!r} for a {cfg.model_type} model "
                                 f"({cfg.n_layer} layers)")
            if name in seen:
                raise ValueError(f"tensor {raw!r} appears twice in the checkpoint")
            pname, rows, transposed = plan[name]
            out = dest[pname] if rows is None else dest[pname][rows[0]:rows[1]]
            want = tuple(out.shape)[::-1] if transposed else tuple(out.shape)
            if tuple(src.shape) != want:
                raise ValueError(f"tensor {raw!r} has shape {tuple(src.shape)}, expected {want}")
            if src.dtype is None or not src.dtype.is_floating_point:
                raise ValueError(f"tensor {raw!r} has dtype {getattr(src, 'st_dtype', src.dtype)}, "
                                 "expected a floating type")
            src.copy_to(out, transposed)
            seen.add(name)
    missing = [n for n in plan if n not in seen]
    if missing:
        raise ValueError(f"checkpoint is missing tensor(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(dest, strict=True, assign=True)
    # buffers (rotary tables) are not in the checkpoint: rebuild them off the meta device
    for mod in model.modules():
        if hasattr(mod, "cos") and mod.cos.is_meta:
            fresh = type(mod)(cfg)
            mod.cos, mod.sin = fresh.cos, fresh.sin
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def from_hf(cfg: ModelConfig, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors (either GPT-2 layout) -> our state dict; raises ValueError naming any missing tensor."""
    plan, _ = _plan(cfg)
    got = {_strip(cfg, k): v for k, v in t.items()}
    missing = [n for n in plan if n not in got]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r}")
    parts: dict[str, list] = {}
    for name, (pname, rows, transposed) in plan.items():
        parts.setdefault(pname, []).append((rows[0] if rows else 0, got[name].t() if transposed else got[name]))
    return {k: torch.cat([x for _, x in sorted(v, key=lambda r: r[0])]).contiguous() for k, v in parts.items()}


# --- writing ------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename over path, so a crash never leaves a half-written file: the
    file is fsynced before the rename and the directory after it, so a power loss cannot leave
    the new name pointing at unwritten data, nor lose the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model: GPT, directory: str | Path, tokenizer=None) -> None:
    """Write an HF-format directory: config.json, model.safetensors [, tokenizer.json]."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu") for k, v in to_hf(model).items()}
    atomic_write(d / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    config = json.dumps(model.config.to_hf(), indent=2)
    atomic_write(d / "config.json", lambda p: Path(p).write_text(config))
    if tokenizer is not None:
        tokenizer.save(d)
