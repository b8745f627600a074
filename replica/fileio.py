"""All-or-nothing file writes. No torch here: the prepare workers import this."""
from __future__ import annotations

import contextlib
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


class _Recorded:
    """A file whose write errors are remembered: torch.save into a file object turns the
    ``OSError`` of a full disk into a ``RuntimeError`` of its archive writer, losing the errno."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, b):
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def atomic_write(path: Path, write) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, rename: all or nothing.

    Whatever stops it (a full disk, a read-only folder, a signal, a bug in ``write``), the temp
    file is removed and ``path`` is as it was. An ``OSError``, also one that a writer wrapped in
    another exception (torch.save's ``RuntimeError``), becomes a one-line :class:`ReplicaError`
    naming the path and the cause."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    rec = None
    try:
        with open(tmp, "wb") as f:
            rec = _Recorded(f)
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ReplicaError(f"cannot write {path}: {_reason(e)}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if rec is not None and rec.error is not None:  # the disk's error, behind the writer's own
            raise ReplicaError(f"cannot write {path}: {_reason(rec.error)}") from None
        raise
    fsync_dir(path.parent)


def take_lock(folder: Path, name: str) -> tuple[int | None, str]:
    """An advisory lock on ``folder/name``, held until the returned descriptor is closed or the
    process ends, however it ends (the kernel releases it: a SLURM requeue after a kill finds it
    free). (fd, "") when taken; (None, what the holder wrote: "pid N on HOST") when another
    process holds it."""
    import fcntl
    import socket

    fd = os.open(Path(folder) / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    except OSError as e:  # a filesystem without flock (some Lustre and NFS mounts): go on, unguarded
        import logging

        logging.getLogger("replica").warning(
            "warning: cannot lock %s (%s): a second process writing the same folder would not be stopped",
            Path(folder) / name, os.strerror(e.errno) if e.errno else e)
        return fd, ""
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd, ""


@contextlib.contextmanager
def locked(folder: Path, name: str, busy):
    """:func:`take_lock` held for the block; ``busy(holder)``: the one-line error when another
    process holds it."""
    fd, holder = take_lock(folder, name)
    if fd is None:
        raise ReplicaError(busy(holder))
    try:
        yield
    finally:
        os.close(fd)
