"""Images inside uncompressed tars, as ImageNet ships them: each member's byte range, listed once.

An image inside an uncompressed tar is a :class:`~replica.data.imageio.Member`: the archive's
path and the byte range of the member's data. The training tar's inner per-class tars are
uncompressed too, so an image there is a byte range of the outer file as well: read with one
seek, in any process. Listing a tar reads every header, so each archive's index is kept in a
cache folder (below).
"""
from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np

from ..errors import ReplicaError
from .imageio import Member

log = logging.getLogger("replica")

INNER_IN_MEMORY = 1 << 20  # an inner tar up to this size is read whole; larger ones are walked in place


def _tar_members(path: Path, fileobj=None, base: int = 0, limit: int | None = None):
    """(name, absolute offset, size) of each regular file of an uncompressed tar."""
    try:
        tf = tarfile.open(name=None if fileobj else path, fileobj=fileobj, mode="r:")
    except tarfile.ReadError as e:
        raise ReplicaError(f"{path}: not an uncompressed tar archive ({e}); image-net.org's archives are "
                           f"plain .tar files") from None
    out = []
    try:
        for ti in tf:
            if ti.isfile():
                end = ti.offset_data + ti.size
                if limit is not None and end > limit:
                    raise ReplicaError(f"{path}: truncated: member {ti.name} ends {end - limit:,} bytes past the "
                                       f"end of the archive; download it again")
                out.append((ti.name, base + ti.offset_data, ti.size))
    except (tarfile.ReadError, EOFError) as e:
        raise ReplicaError(f"{path}: truncated or damaged tar archive ({e}); download it again") from None
    finally:
        tf.close()
    return out


# -- the member index, scanned once per archive ---------------------------------------------------
#
# Listing a tar reads every header: ILSVRC-2012's training tar holds 1.28 M, as random 8 KB reads
# across 138 GB (minutes on NVMe, far longer on a disk). Each archive's index is kept in a cache
# folder, keyed by its path, size and mtime, so prepare, its resume, `eval --data ARCHIVES` and
# `neighbors` scan it once. REPLICA_CACHE names the folder (default: $XDG_CACHE_HOME/replica, or
# ~/.cache/replica); where it cannot be written, every command scans, as before.
INDEX_VERSION = 1


def cache_dir() -> Path:
    import os

    base = os.environ.get("REPLICA_CACHE")
    if base:
        return Path(base) / "tar-index"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "replica" / "tar-index"


def _index_file(path: Path, kind: str) -> Path:
    import hashlib

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{kind}|{INDEX_VERSION}"
    return cache_dir() / f"{path.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _indexed(path: Path, kind: str, scan) -> list[tuple[str, str, int, int]]:
    """(group, name, offset, size) of each member, from the cache or from ``scan()`` (then kept)."""
    from ..fileio import atomic_write

    try:
        cache = _index_file(path, kind)
    except OSError:
        return scan()
    try:
        with np.load(cache, allow_pickle=False) as z:
            rows = list(zip(z["groups"].tolist(), z["names"].tolist(), z["offsets"].tolist(), z["sizes"].tolist()))
        log.debug("%s: member index from %s", path, cache)
        return rows
    except (OSError, ValueError, KeyError):
        pass
    rows = scan()
    arrays = dict(groups=np.array([r[0] for r in rows], dtype=str), names=np.array([r[1] for r in rows], dtype=str),
                  offsets=np.array([r[2] for r in rows], np.int64), sizes=np.array([r[3] for r in rows], np.int64))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda f: np.savez(f, **arrays))
    except (OSError, ReplicaError):  # a read-only home: scan again next time
        pass
    return rows


def tar_images(path: Path) -> list[Member]:
    """The image members of a flat tar (the val or test archive)."""
    def scan():
        return [("", name, off, n) for name, off, n in _tar_members(path, limit=path.stat().st_size)]

    return [Member(str(path), off, n, name) for _, name, off, n in _indexed(path, "flat", scan)]


def nested_tar_classes(path: Path) -> dict[str, list[Member]]:
    """WNID → images of the training tar: one inner ``<wnid>.tar`` per class."""
    def scan():
        rows = []
        with open(path, "rb") as f:
            for name, off, n in _tar_members(path, limit=path.stat().st_size):
                wnid = Path(name).name[:-4] if name.endswith(".tar") else None
                if not wnid:
                    continue
                f.seek(off)
                inner = io.BytesIO(f.read(n)) if n <= INNER_IN_MEMORY else _Window(f, off, n)
                members = _tar_members(Path(f"{path}:{name}"), fileobj=inner, base=off, limit=off + n)
                rows += [(wnid, f"{name}/{m}", o, k) for m, o, k in members]
        return rows

    out: dict[str, list[Member]] = {}
    for wnid, name, off, n in _indexed(path, "nested", scan):
        out.setdefault(wnid, []).append(Member(str(path), off, n, name))
    return out


def folder_of_tars(folder: Path) -> dict[str, list[Member]]:
    """WNID → images of a folder of per-class tars (``ILSVRC2012_img_train/`` unpacked once)."""
    out = {}
    for p in sorted(folder.glob("*.tar")):
        out[p.stem] = tar_images(p)
    return out


class _Window(io.RawIOBase):
    """A read-only window [offset, offset + size) of an open file, for tarfile to walk."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)
