"""Files written so that a crash, a kill or a full disk at any point leaves the old file or the new one,
never half of one, and no temporary file behind a write that returned or raised."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """write(tmp_path) to a temporary file beside path, then rename it over path. The file is fsynced
    before the rename and the directory after it, so a power loss cannot leave the new name pointing at
    unwritten data, nor lose the rename. A write that raises removes the temporary file; one a kill
    interrupts leaves it (.NAME.*.tmp), for remove_stale_temps."""
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


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def remove_stale_temps(d: Path) -> None:
    """The temporary files of writes a kill interrupted in directory d."""
    for tmp in Path(d).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _fsync(path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
