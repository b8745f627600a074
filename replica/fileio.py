"""All-or-nothing file writes. No torch here: the prepare workers import this."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ReplicaError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, rename: all or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ReplicaError(f"cannot write {path}: {reason}") from None
    fsync_dir(path.parent)
