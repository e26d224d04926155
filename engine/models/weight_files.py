"""Reading checkpoint weight files one tensor at a time: safetensors (single or sharded) and
pytorch_model.bin (read with torch.load(weights_only=True), never unpickling code).

Each tensor is copied straight into the parameter that receives it: safetensors by plain file reads into
the parameter's memory, a .bin from a memory mapping whose pages are released as they are copied, both in
row blocks of at most _CHUNK_BYTES. So a load's peak memory is the model plus a few MB, never the file
resident beside the parameters (benchmarks/load_memory.py measures it).
"""
from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import sys
from pathlib import Path
from typing import Iterator

import torch


def checkpoint_files(d: Path) -> list[Path]:
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
# a header is read (and parsed) whole: past this it is refused unread. A real one holds ~130 bytes a
# tensor, so this is over 100k tensors in one file (safetensors itself allows 100 MB)
_ST_MAX_HEADER = 16 << 20


def _row_blocks(shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[int, int]]:
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows, step = shape[0], max(1, _CHUNK_BYTES // row_bytes)
    return ((i, min(rows, i + step)) for i in range(0, rows, step))


def _put(out: torch.Tensor, i: int, j: int, block: torch.Tensor, transposed: bool,
         order: torch.Tensor | None) -> None:
    """Source rows i:j (block) into out: its transpose when transposed, row r into out's row order[r] when
    given (a checkpoint whose rows are in another order)."""
    if order is not None:
        out.index_copy_(0, order[i:j].to(out.device), block.to(out.dtype))
    elif transposed:
        out[:, i:j].copy_(block.t())
    else:
        out[i:j].copy_(block)


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
                raise ValueError(f"{self.path}: the file ends inside tensor {self.name!r}")
            done += n

    def copy_to(self, out: torch.Tensor, transposed: bool, order: torch.Tensor | None = None) -> None:
        if out.numel() == 0:
            return
        if (out.dtype == self.dtype and not transposed and order is None and out.is_contiguous()
                and out.device.type == "cpu"):
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
            _put(out, i, j, buf, transposed, order)


def _safetensors_entries(path: Path, f) -> list[_FileTensor]:
    """The tensors a safetensors file's header describes, in file order; ValueError on a malformed header.
    As safetensors requires, the tensors' data tile the rest of the file exactly: each starts where the one
    before ends, the last ends at the end of the file, and each is as long as its dtype and shape say."""
    size = path.stat().st_size
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < n <= size - 8:
        raise ValueError(f"{path}: not a safetensors file (its header length {n} does not fit the file's "
                         f"{size} bytes)")
    if n > _ST_MAX_HEADER:
        raise ValueError(f"{path}: the safetensors header is {n} bytes, over the {_ST_MAX_HEADER} this loader reads")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not an object")
    out = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(x, int) and x >= 0 for x in (*shape, a, b)) and a <= b
                  and (dtype not in _ST_DTYPES or b - a == math.prod(shape) * _ST_DTYPES[dtype].itemsize))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: bad safetensors header entry for {name!r}: {e!r}")
        out.append(_FileTensor(f, path, name, dtype, shape, 8 + n + a, b - a))
    out.sort(key=lambda t: (t.start, t.nbytes))
    end = 8 + n
    for t in out:
        if t.start != end:
            raise ValueError(f"{path}: bad safetensors header: the data of {t.name!r} starts at byte {t.start - 8 - n} "
                             f"but the tensor before it ends at {end - 8 - n} (overlapping or out-of-range offsets)")
        end += t.nbytes
    if end != size:
        raise ValueError(f"{path}: the safetensors header describes {end - 8 - n} bytes of tensor data but the file "
                         f"holds {size - 8 - n} (truncated or padded)")
    return out


class _LoadedTensor:
    """One tensor of a torch.load'ed (.bin) state dict. When it lives in a memory mapping of the file, the
    mapped pages are released block by block once copied, so the file never becomes resident as a whole."""

    def __init__(self, t: torch.Tensor, mapping: list[tuple[int, int]]):
        self.t, self.mapping, self.shape, self.dtype = t, mapping, tuple(t.shape), t.dtype

    def copy_to(self, out: torch.Tensor, transposed: bool, order: torch.Tensor | None = None) -> None:
        t = self.t
        if t.dim() == 0 or t.numel() == 0:
            out.copy_(t)
            return
        for i, j in _row_blocks(self.shape, t.element_size()):
            part = t[i:j]
            _put(out, i, j, part, transposed, order)
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


def iter_tensors(path: Path) -> Iterator[tuple[str, "_FileTensor | _LoadedTensor"]]:
    """(name, tensor source) of one weight file, one tensor at a time; each source has shape, dtype and
    copy_to(out, transposed, order=None), and is read only when copied."""
    if path.name.endswith(".safetensors"):
        with open(path, "rb", buffering=0) as f:
            for t in _safetensors_entries(path, f):
                yield t.name, t
        return
    sd, mapping = _torch_load(path)
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    while sd:
        k, t = sd.popitem()
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is not a tensor")
        yield k, _LoadedTensor(t, mapping)


def _torch_load(path: Path) -> tuple[object, list[tuple[int, int]]]:
    """A .bin's contents (never unpickling code: weights_only) and where it is mapped; ValueError naming the file
    when it is not a weights-only torch checkpoint (a pickle that would run code, a truncated or foreign file)."""
    try:
        try:  # mmap keeps a .bin shard out of memory until read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), _file_mapping(path)
        except RuntimeError:  # legacy (non-zip) serialization cannot be mmapped
            return torch.load(path, map_location="cpu", weights_only=True), []
    except OSError:
        raise
    except Exception as e:  # torch.load raises many kinds on a bad file; the first line says which
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: {why})") from None


def stored_bytes(files: list[Path]) -> int:
    """The bytes of a checkpoint's weight files: at least one a parameter (the narrowest dtype read is 8-bit)."""
    return sum(f.stat().st_size for f in files)


def first_dtype(path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a weight file (cheap for safetensors: the header only)."""
    tensors = iter_tensors(path)
    try:
        for _, t in tensors:
            if t.dtype is not None and t.dtype.is_floating_point:
                return t.dtype
        return torch.float32
    finally:
        tensors.close()
