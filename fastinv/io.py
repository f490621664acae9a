"""Atomic file writes: every file fastinv writes goes through here.

A file is written to a temporary name in its own directory (``.<name>.<pid>.tmp``), flushed
and fsynced, then renamed over the target with ``os.replace`` (atomic on POSIX and Windows), so
a reader sees the old file or the new one, never half of one, and a crash leaves at most a
``.tmp`` file that :func:`remove_stale_tmp` clears. The directory is fsynced after the rename
so that the new name survives a power cut too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def tmp_path(path: Path) -> Path:
    """The temporary name a write of ``path`` by this process uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported (Windows) or not permitted: the rename itself is done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", *, fsync: bool = True, **kwargs) -> Iterator[IO]:
    """``with atomic_open(path, "w") as fh: ...``: ``path`` appears complete when the block
    ends, or not at all if it raises (the temporary file is removed). ``fsync=False`` keeps the
    rename (no reader ever sees half a file) but not the flush to disk: for bulk data such as
    a generated dataset, where one fsync per file would cost more than the writes."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = True) -> Path:
    """Call ``write(fh)`` on a binary file handle and publish the result at ``path``."""
    path = Path(path)
    with atomic_open(path, "wb", fsync=fsync) as fh:
        write(fh)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = True) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), fsync=fsync)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' ``save`` (bytes in memory, then one atomic write): CPU-contiguous copies of
    the tensors are taken here, so callers may pass a ``state_dict`` as it is."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def atomic_savefig(fig, path: str | Path, **kwargs) -> Path:
    """``fig.savefig`` for matplotlib figures; the format comes from ``path``'s suffix."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or None)
    return atomic_write(path, lambda fh: fig.savefig(fh, format=fmt, **kwargs))


def atomic_save_image(image, path: str | Path, **kwargs) -> Path:
    """``PIL.Image.save`` with the format from ``path``'s suffix."""
    from PIL import Image

    path = Path(path)
    fmt = kwargs.pop("format", Image.registered_extensions().get(path.suffix.lower()))
    return atomic_write(path, lambda fh: image.save(fh, format=fmt, **kwargs))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: nothing of ours is mid-write when this is called
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: leave it
    return True


def remove_stale_tmp(directory: str | Path, pattern: re.Pattern | None = None) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files in ``directory`` (not below it) left by writers
    that died mid-write; files of a process still running are kept. ``pattern`` narrows the
    names (it must capture the pid as group 1). Returns what was removed."""
    directory = Path(directory)
    pattern = pattern or _TMP
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = pattern.match(p.name)
        if m and p.is_file() and not p.is_symlink() and not _alive(int(m.group(1))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return sorted(removed)
