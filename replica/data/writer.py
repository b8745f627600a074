"""Writing a prepared store (``replica prepare``): every image decoded once, resized,
centre-cropped and stored, with the training set's mean image and RGB PCA from the same pass.

Preparation runs in worker processes, chunk by chunk, each with a pipe of its own. Each finished
chunk is recorded, with the running sums for the mean and covariance, in one state file
replaced atomically (every 30 s, and on the way out), so an interrupted
``prepare`` resumes where it stopped; one prepare at a time holds the folder's lock. The
format is :mod:`replica.store`'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ReplicaError
from ..fileio import atomic_write
from .imageio import DEFAULT_MAX_PIXELS, BadImage, prepared_from_array, read_prepared
from .imageio import Member
from .sources import Source, find_source
from .store import FORMAT_VERSION, JPEG_FROM_IMAGES, JPEG_QUALITY, STATE, PixelStats

log = logging.getLogger("replica")

LOCK = ".prepare.lock"
# The resume state (every chunk's flags, the JPEG index, the pixel sums) is rewritten whole, with
# an fsync of the data files before it: at ImageNet's size ~23 MB a time. Once a second that was
# 14-60 GB of writes over a prepare; now every STATE_EVERY_S seconds, and on the way out (an
# error, Ctrl-C, a dead worker: every finished chunk is kept). A crash of this process itself
# (SIGKILL, power) loses at most the last STATE_EVERY_S seconds of chunks, which a resume redoes.
STATE_EVERY_S = 30.0
# Below this many images, workers=None prepares in this process. A JPEG store's worker starts by
# importing torch (~2.5 s on 2 cores), more than the work: the tiny demo's 36 images took 2.88 s
# with 2 workers that imported it and 0.14 s in process; by arithmetic (~4 ms an image), 2 such
# workers pay off from ~1,500. A raw store's workers import no torch and start in a fraction of a
# second (the same 36 images: `replica prepare --workers 2` 0.46 s, `--workers 1` 0.28-0.35 s).
IN_PROCESS_BELOW = 1000
# A worker keeps the pixel sums of the training chunks it decodes and sends them along with its
# first result, then with every STATS_EVERY_CHUNKS-th (or after STATS_EVERY_S), and when it
# stops: sent with every 64-image chunk they were 1.57 MB (float64), the size of the JPEGs. A
# chunk counts as done (in the resume state) once its sums have arrived.
STATS_EVERY_CHUNKS = 16
STATS_EVERY_S = 5.0
DEFERRED = "deferred"  # a result whose pixel sums travel later, with the worker's accumulated ones
# what a prepare worker is limited to: it decodes one image at a time, and 16 workers × 16
# BLAS/OpenMP threads each would oversubscribe the machine 16-fold
WORKER_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# Writing


def _fingerprint(src: Source, size: int, fmt: str = "raw", quality: int = JPEG_QUALITY) -> str:
    """What the store is made of. Paths are taken relative to the source's root, so a source
    moved to another mount (the same files under a new absolute path) still resumes."""
    form = "" if fmt == "raw" else f"|jpeg{quality}"
    h = hashlib.sha256(f"{FORMAT_VERSION}|{size}{form}|{src.kind}|{src.classes}".encode())
    root = str(src.root)
    for name, s in src.splits.items():
        h.update(name.encode())
        h.update(str(len(s.items)).encode())
        for it, lab in zip(s.items, s.labels):
            h.update(f"{_relative(it, root)}\t{lab}\n".encode())
    return h.hexdigest()


def _split_fingerprints(src: Source, size: int, fmt: str, quality: int) -> tuple[str, dict]:
    """(what every split shares: format, size, kind, classes; and each split's own items and
    labels), so that a split added or changed later (ILSVRC-2010's test labels, released after
    the images) is prepared alone, and the others are kept."""
    form = "" if fmt == "raw" else f"|jpeg{quality}"
    base = hashlib.sha256(f"{FORMAT_VERSION}|{size}{form}|{src.kind}|{src.classes}".encode()).hexdigest()
    root, per = str(src.root), {}
    for name, s in src.splits.items():
        h = hashlib.sha256(f"{base}|{name}|{len(s.items)}".encode())
        for it, lab in zip(s.items, s.labels):
            h.update(f"{_relative(it, root)}\t{lab}\n".encode())
        per[name] = h.hexdigest()
    return base, per


def _kept_splits(old: dict | None, fp: str, base: str, per: dict) -> dict:
    """Splits of an existing store in ``out`` that match the source and need no work: those of a
    complete store with the same base whose training split is unchanged (its mean image and PCA
    then stand), or those an interrupted prepare of this same source had kept."""
    if not old:
        return {}
    if old.get("fingerprint") == fp:  # resuming this prepare: what it kept, it keeps
        return {k: v for k, v in (old.get("kept_splits") or {}).items() if per.get(k) == v.get("fingerprint")}
    olds = old.get("split_fingerprints") or {}
    if not (old.get("complete") and old.get("base_fingerprint") == base and olds.get("train") == per.get("train")):
        return {}
    return {k: dict(old["splits"][k], fingerprint=per[k]) for k in per if olds.get(k) == per[k] and k in old["splits"]}


def _relative(item, root: str) -> str:
    if isinstance(item, Member):
        return f"{os.path.relpath(item.path, root)}:{item.name}@{item.offset}+{item.size}"
    if isinstance(item, str):
        return os.path.relpath(item, root)
    return str(item)  # CIFAR: a row index


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or a job scheduler's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_W: dict = {}


def _worker_init(out: str, splits: list, size: int, max_pixels: int, fmt: str, quality: int, pool: bool = False):
    _W.update(out=out, size=size, max_pixels=max_pixels, fmt=fmt, quality=quality)
    if pool and fmt != "raw":  # a JPEG worker: torch's one thread (BLAS/OpenMP read WORKER_THREADS at start)
        import torch  # only here and in _encode: a raw store's workers never import torch (~2 s, ~0.5 GB)

        torch.set_num_threads(1)
    if fmt == "raw":
        _W["fds"] = {k: os.open(Path(out) / k / "images.u8", os.O_WRONLY) for k in splits}


def _encode(img: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
    """JPEG bytes of a (3, S, S) uint8 image, and the pixels a decoder gives back from them."""
    import torch

    from .jpeg import decode_jpeg, encode_jpeg

    data = encode_jpeg(torch.from_numpy(np.ascontiguousarray(img)), quality=quality)
    return data.numpy().tobytes(), decode_jpeg(data).numpy()


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset``: ``os.pwrite`` may write less than asked (a signal, a quota,
    the last blocks of a disk); the rest is written again, and a write of nothing is a full disk
    (an unchecked short write left a row partly zero and marked ok)."""
    import errno

    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _worker_chunk(task):
    """Decode one chunk; write it (raw: at its rows) or return it (jpeg: the encoded bytes).

    Returns (split, chunk, ok flags, skips, stats, encoded or None). Raw rows go out with one
    ``pwrite`` each: only what this chunk wrote is written (no whole-map flush), and a full disk
    is an ``OSError`` (ENOSPC) here, not a SIGBUS that kills the worker.
    """
    split, chunk, start, items, arrays, want_stats = task
    size, fmt = _W["size"], _W["fmt"]
    ok = np.zeros(len(items), bool)
    skips, encoded = [], [] if fmt == "jpeg" else None
    stats = PixelStats(size) if want_stats else None
    row = 3 * size * size
    for i, item in enumerate(items):
        try:
            if arrays is not None:  # CIFAR: a (3, 32, 32) array
                img = prepared_from_array(arrays[i], size)
            else:
                img = read_prepared(item, size, _W["max_pixels"])
        except BadImage as e:
            skips.append((split, str(item), str(e)))
            if encoded is not None:
                encoded.append(b"")
            continue
        except Exception as e:  # anything else is still one bad file, not a dead job
            skips.append((split, str(item), f"{type(e).__name__}: {e}"))
            if encoded is not None:
                encoded.append(b"")
            continue
        if fmt == "raw":
            pwrite_all(_W["fds"][split], np.ascontiguousarray(img).tobytes(), (start + i) * row)
        else:
            data, img = _encode(img, _W["quality"])  # statistics of the pixels the net will see
            encoded.append(data)
        ok[i] = True
        if stats is not None:
            stats.add_image(img)
    return split, chunk, ok, skips, (_compact(stats) if stats is not None else None), encoded


def _compact(stats: PixelStats) -> dict:
    """A chunk's sums for the pipe: its mean-image sum is whole numbers (≤ 255 × the chunk's
    images), so uint16 holds it exactly up to 257 images: 393 KB a chunk of 256², not the
    1.57 MB (~24 KB an image, the size of the JPEG itself) of float64."""
    a = stats.arrays()
    a["image_sum"] = a["image_sum"].astype(np.uint16 if stats.images * 255 <= 65535 else np.uint32)
    return a


def _estimate_bytes(source: Source, size: int, fmt: str, quality: int, max_pixels: int) -> int:
    """Bytes the store's images will take: exact for raw, sampled (up to 16 images) for jpeg."""
    n = sum(len(s.items) for s in source.splits.values())
    if fmt == "raw":
        return n * 3 * size * size
    s = source.splits.get("train") or next(iter(source.splits.values()))  # a later split alone: its own images
    sizes = []
    for k in np.linspace(0, len(s.items) - 1, min(16, len(s.items))).astype(int).tolist():
        try:
            img = prepared_from_array(s.arrays[s.items[k]], size) if s.arrays is not None else \
                read_prepared(s.items[k], size, max_pixels)
            sizes.append(len(_encode(img, quality)[0]))
        except (BadImage, OSError):
            continue
    per = float(np.mean(sizes)) if sizes else 40_000.0
    return int(n * per * 1.25)  # a margin: images differ


def _check_space(out: Path, needed: int, have: int, what: str) -> None:
    import shutil

    free = shutil.disk_usage(out).free
    if needed - have > free:
        gb = lambda b: f"{b / 1e9:,.1f} GB" if b >= 1e9 else f"{b / 1e6:,.1f} MB"  # noqa: E731
        raise ReplicaError(f"{out}: the store needs about {gb(needed)} ({what}); {gb(have)} written so far and "
                           f"{gb(free)} free on that disk. Free {gb(needed - have - free)} or choose another OUT"
                           + (" (or --format jpeg, about 7× smaller)" if "raw" in what else ""))


def _allocated(path: Path) -> int:
    try:
        st = path.stat()
        return min(st.st_size, st.st_blocks * 512)  # a sparse file holds only what was written
    except (OSError, AttributeError):
        return 0


def prepare(src, out, val=None, size: int = 256, workers: int | None = None, chunk: int = 64,
            max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, on_chunk=None, fmt: str = "auto",
            quality: int = JPEG_QUALITY) -> dict:
    """Write the prepared store for ``src`` into ``out`` (resumable). Returns the summary.

    ``fmt``: ``raw`` (uint8 rows: a batch is a memory copy), ``jpeg`` (each image encoded once at
    ``quality``: ~28 KB instead of 196,608 bytes), or ``auto``: jpeg from
    :data:`JPEG_FROM_IMAGES` images on, raw below. ``workers=1`` works in this process; more use
    a process pool (default: the CPUs this process may use, or this process alone for fewer than
    :data:`IN_PROCESS_BELOW` images). ``on_chunk(done, total)`` is called
    after each chunk is recorded.
    """
    out = Path(out)
    source = find_source(src, val)
    log.info("%s: %s, %d classes; %s", source.root, source.kind, len(source.classes),
             ", ".join(f"{k} {len(v.items):,}" for k, v in source.splits.items()))
    for note in source.notes:  # what was recognized, and where the labels came from
        log.info("  %s", note)
    total = sum(len(s.items) for s in source.splits.values())
    meta_path = out / "meta.json"
    old = None
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = None
    if fmt == "auto":  # an interrupted store keeps its format
        fmt = (old or {}).get("format") or ("jpeg" if total >= JPEG_FROM_IMAGES else "raw")
    if fmt not in ("raw", "jpeg"):
        raise ReplicaError(f"format: expected raw, jpeg or auto, got {fmt!r}")
    if not 1 <= int(quality) <= 100:
        raise ReplicaError(f"quality: expected 1 to 100, got {quality}")
    fp = _fingerprint(source, size, fmt, quality)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        try:
            return _prepare_into(out, source, old, fp, fmt, quality, size, chunk, total, max_pixels, workers,
                                 progress, on_chunk)
        except OSError as e:  # ENOSPC, EIO, a quota, in any write of this process: one line, resumable
            why = os.strerror(e.errno) if e.errno else str(e)
            raise ReplicaError(f"writing the store in {out} failed: {why}; every finished chunk is kept: free "
                               f"space (or fix the disk), then run the same 'replica prepare' again to resume") from None


@contextlib.contextmanager
def _locked(out: Path):
    """One prepare at a time into ``out``: a second one would interleave its writes with the
    first's (tried: the first then died on its vanished state file). An advisory lock on
    ``out/.prepare.lock``, released by the kernel when the process ends, however it ends."""
    import fcntl

    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise ReplicaError(f"{out}: another 'replica prepare' is writing this store ({holder}); wait for it "
                               f"to finish (or stop it), then run this one again to resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _prepare_into(out: Path, source: Source, old, fp: str, fmt: str, quality: int, size: int, chunk: int,
                  total: int, max_pixels: int, workers, progress: bool, on_chunk) -> dict:
    """The writing part of :func:`prepare`, under its lock."""
    meta_path = out / "meta.json"
    base_fp, split_fps = _split_fingerprints(source, size, fmt, quality)
    kept = _kept_splits(old, fp, base_fp, split_fps)
    if old is not None:
        if old.get("fingerprint") == fp and old.get("complete"):
            return old  # nothing to do: the same source is already prepared here
        if old.get("fingerprint") != fp and not kept:
            raise ReplicaError(f"{out} holds a store prepared from other inputs or in another format "
                               f"({old.get('source')}, {old.get('format', 'raw')}); choose a new OUT folder or "
                               f"delete this one")
    full = source
    if kept:  # only the splits that are new or changed are written; the others stay as they are
        source = dataclasses.replace(source, splits={k: v for k, v in source.splits.items() if k not in kept})
        log.info("%s: keeping %s as prepared; preparing %s", out, ", ".join(kept), ", ".join(source.splits) or "none")
        total = sum(len(s.items) for s in source.splits.values())

    chunks = []
    for name, s in source.splits.items():
        (out / name).mkdir(exist_ok=True)
        for c, start in enumerate(range(0, len(s.items), chunk)):
            chunks.append((name, c, start, min(start + chunk, len(s.items))))
    data_file = {k: out / k / ("images.u8" if fmt == "raw" else "images.jpeg") for k in source.splits}

    state_path = out / STATE
    done: dict[str, np.ndarray] = {k: np.zeros(-(-len(s.items) // chunk), bool) for k, s in source.splits.items()}
    ok_flags = {k: np.zeros(len(s.items), bool) for k, s in source.splits.items()}
    index = {k: np.full((len(s.items), 2), -1, np.int64) for k, s in source.splits.items()}  # jpeg: offset, bytes
    committed = {k: 0 for k in source.splits}  # jpeg: bytes of each file the state accounts for
    skips: list = []
    stats = PixelStats(size)
    if state_path.exists():
        st = np.load(state_path, allow_pickle=False)
        if str(st["fingerprint"]) == fp:
            for k in done:
                done[k] = st[f"done_{k}"].copy()
                ok_flags[k] = st[f"ok_{k}"].copy()
                if fmt == "jpeg":
                    index[k] = st[f"index_{k}"].copy()
                    committed[k] = int(st[f"committed_{k}"])
            skips = json.loads(str(st["skips"]))
            stats = PixelStats.from_arrays(st)
    needed = _estimate_bytes(source, size, fmt, quality, max_pixels)
    have = sum(_allocated(f) if fmt == "raw" else committed[k] for k, f in data_file.items())
    _check_space(out, needed, have, f"{total:,} images, {fmt}" + ("" if fmt == "raw" else f" quality {quality}"))
    for k, f in data_file.items():
        if fmt == "raw":
            nbytes = len(source.splits[k].items) * 3 * size * size
            if not f.exists() or f.stat().st_size != nbytes:
                with open(f, "wb") as fh:
                    fh.truncate(nbytes)  # sparse until written
        else:  # bytes past what the state accounts for belong to chunks that will be redone
            with open(f, "ab") as fh:
                fh.truncate(committed[k])
    meta = dict(version=FORMAT_VERSION, fingerprint=fp, complete=False, source=full.root, kind=full.kind,
                size=size, format=fmt, quality=quality if fmt == "jpeg" else None, classes=full.classes,
                names=full.names, dataset=full.dataset, notes=full.notes, base_fingerprint=base_fp,
                split_fingerprints=split_fps, kept_splits=kept)
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))

    todo = [c for c in chunks if not done[c[0]][c[1]]]
    resumed = len(chunks) - len(todo)
    appends = {k: open(f, "ab") for k, f in data_file.items()} if fmt == "jpeg" else {}
    readers = {k: os.open(f, os.O_RDONLY) for k, f in data_file.items()}  # to fsync what workers wrote

    def task(c):
        name, ci, a, b = c
        s = source.splits[name]
        arrays = s.arrays[s.items[a]:s.items[b - 1] + 1] if s.arrays is not None else None
        return name, ci, a, s.items[a:b], arrays, name == "train"  # a kept train split is not in source

    def save_state():
        for k in data_file:  # the data first, then the state that says it is there
            if fmt == "jpeg":
                appends[k].flush()
                committed[k] = appends[k].tell()
            os.fsync(readers[k])
        extra = {f"done_{k}": v for k, v in done.items()}
        extra.update({f"ok_{k}": v for k, v in ok_flags.items()})
        if fmt == "jpeg":
            extra.update({f"index_{k}": v for k, v in index.items()})
            extra.update({f"committed_{k}": np.int64(v) for k, v in committed.items()})
        atomic_write(state_path, lambda f: np.savez(f, fingerprint=np.array(fp), skips=np.array(json.dumps(skips)),
                                                    **stats.arrays(), **extra))

    pending: dict = {}  # (split, chunk) recorded, its pixel sums still with its worker: its skips

    def record(result):
        name, ci, ok, sk, part, encoded = result
        a = ci * chunk
        ok_flags[name][a:a + len(ok)] = ok
        if encoded is not None:
            f = appends[name]
            for i, data in enumerate(encoded):
                if data:
                    index[name][a + i] = (f.tell(), len(data))
                    f.write(data)
        if part == DEFERRED:  # done when its sums arrive (record_stats)
            pending[(name, ci)] = sk
            return len(ok)
        if part is not None:
            stats.merge(PixelStats.from_arrays(part))
        skips.extend(sk)
        done[name][ci] = True
        return len(ok)

    def record_stats(sums):
        """A worker's accumulated sums: merged, and the chunks they cover marked done, only if
        every one of them was recorded here (else all of them are redone on resume, sums and all)."""
        arrays, covered = sums
        if any(tuple(c) not in pending for c in covered):
            return
        if arrays is not None:
            stats.merge(PixelStats.from_arrays(arrays))
        for name, ci in covered:
            done[name][ci] = True
            skips.extend(pending.pop((name, ci)))

    t0 = time.time()
    try:
        if todo:
            bar = _bar(total, resumed_images=sum(min(chunk, len(source.splits[c[0]].items) - c[2]) for c in chunks
                                                  if done[c[0]][c[1]]), enabled=progress)
            last_save, finished = time.time(), resumed

            def handle(result):
                nonlocal last_save, finished
                bar.update(record(result))
                finished += 1
                if time.time() - last_save >= STATE_EVERY_S:
                    save_state()
                    last_save = time.time()
                bar.set_postfix(skipped=len(skips), refresh=False)
                if on_chunk is not None:
                    on_chunk(finished, len(chunks))

            args = (str(out), list(source.splits), size, max_pixels, fmt, quality)
            try:
                auto = 1 if total < IN_PROCESS_BELOW else usable_cpus()
                _run_chunks(map(task, todo), handle, min(workers or auto, len(todo)), args, out,
                            handle_stats=record_stats)
            finally:  # an interrupted run keeps every chunk it finished
                save_state()
                bar.close()
    finally:
        for f in appends.values():
            with contextlib.suppress(OSError):  # a failed flush here was raised (and said) already
                f.close()
        for fd in readers.values():
            os.close(fd)
    return _finish(out, source, meta, ok_flags, skips, stats, resumed, time.time() - t0, index if fmt == "jpeg" else None,
                   kept=kept, order=list(full.splits))


@contextlib.contextmanager
def single_threaded_children():
    """Processes started inside inherit :data:`WORKER_THREADS` (a spawned child reads its thread
    limits from the environment when numpy and torch load); this process's own are restored."""
    before = {k: os.environ.get(k) for k in WORKER_THREADS}
    os.environ.update(WORKER_THREADS)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pool_worker(conn, args) -> None:
    """A prepare worker: chunks in over its own pipe, results out; None ends it, after its last
    pixel sums. Messages out: ("ok", result, sums or None), ("stats", sums), ("oserror", ...);
    sums are (arrays, [(split, chunk), …]: the chunks they cover)."""
    _worker_init(*args, pool=True)
    acc, covered, sent, last = None, [], 0, time.monotonic()

    def take():
        nonlocal acc, covered, last
        out = (_compact(acc) if acc is not None else None, covered)
        acc, covered, last = None, [], time.monotonic()
        return out

    while True:
        task = conn.recv()
        if task is None:
            conn.send(("stats", take()))
            return
        try:
            split, chunk, ok, skips, part, encoded = _worker_chunk(task)
        except OSError as e:  # ENOSPC and the like: the main process says it, once
            conn.send(("oserror", (e.errno, str(e))))
            continue
        sums = None
        if part is not None:  # a training chunk: its sums join this worker's own
            st = PixelStats.from_arrays(part)
            if acc is None:
                acc = st
            else:
                acc.merge(st)
            covered.append((split, chunk))
            part = DEFERRED
            if sent == 0 or len(covered) >= STATS_EVERY_CHUNKS or time.monotonic() - last >= STATS_EVERY_S:
                sums, sent = take(), sent + 1
        conn.send(("ok", (split, chunk, ok, skips, part, encoded), sums))


def _run_chunks(tasks, handle, workers: int, args, out, handle_stats=None):
    """Every task (an iterable, made as it is needed) through ``_worker_chunk`` and its result
    through ``handle``, in this process (``workers=1``) or in worker processes; the workers'
    accumulated pixel sums through ``handle_stats`` (after the results they cover).

    Each worker has its own pipe. A worker that dies (the OOM killer, a signal), even half-way
    through sending a result, closes its end: the read fails at once instead of waiting for the
    rest of the message (a shared result queue, as ``multiprocessing.Pool`` and
    ``ProcessPoolExecutor`` use, waits for ever there).
    """
    from multiprocessing.connection import wait

    died = ReplicaError("a prepare worker died (killed by a signal: out of memory is the usual cause); every "
                        "finished chunk is kept: run the same 'replica prepare' again to resume, with fewer "
                        "--workers if memory is short")

    def send(conn, msg) -> None:
        """To a worker: a dead one's pipe refuses the write (EPIPE) whatever the moment, and that is
        a dead worker, not a full disk (only this process's own writes and a worker's reported
        "oserror" are the disk's)."""
        try:
            conn.send(msg)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise died from None
    try:
        if workers <= 1:
            _worker_init(*args)
            try:
                for t in tasks:
                    handle(_worker_chunk(t))
            finally:
                for fd in _W.pop("fds", {}).values():
                    os.close(fd)
            return
        ctx = mp.get_context("spawn")
        procs, conns, clean = [], [], False
        try:
            with single_threaded_children():
                for _ in range(workers):
                    mine, theirs = ctx.Pipe()
                    p = ctx.Process(target=_pool_worker, args=(theirs, args), daemon=True)
                    p.start()
                    theirs.close()  # only the worker holds its end: its death closes the pipe
                    procs.append(p)
                    conns.append(mine)
            queue, busy = iter(tasks), {}  # busy: chunks sent to a worker and not yet back
            for _ in range(2):  # two in flight each: a worker starts its next chunk while this process records
                for conn in conns:
                    t = next(queue, None)
                    if t is not None:
                        send(conn, t)
                        busy[conn] = busy.get(conn, 0) + 1
            while busy:
                for ready in wait(list(busy)):
                    try:
                        kind, payload, *sums = ready.recv()
                    except (EOFError, OSError):
                        raise died from None
                    if kind == "oserror":
                        raise OSError(*payload)
                    handle(payload)
                    if sums and sums[0] is not None and handle_stats is not None:
                        handle_stats(sums[0])
                    t = next(queue, None)
                    if t is not None:
                        send(ready, t)
                    elif busy[ready] == 1:
                        del busy[ready]
                    else:
                        busy[ready] -= 1
            for conn in conns:  # every result is in: each worker's last sums, then it ends
                send(conn, None)
            for conn in conns:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    raise died from None
                if handle_stats is not None:
                    handle_stats(payload)
            clean = True
        finally:
            if not clean:  # an error or an interrupt: the live workers' last sums, briefly, and they end
                for conn in conns:
                    with contextlib.suppress(OSError):
                        conn.send(None)
                for conn in conns:
                    with contextlib.suppress(EOFError, OSError, ValueError):
                        while handle_stats is not None and conn.poll(2):
                            kind, payload, *_ = conn.recv()
                            if kind == "stats":  # taken only if this process recorded every chunk it covers
                                handle_stats(payload)
                                break
            for p in procs:  # after an error or an interrupt, workers still sending are not waited for
                p.join(timeout=5 if clean else 0)
                if p.is_alive():
                    p.kill()
                    p.join()
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise ReplicaError(f"writing the store in {out} failed: {why}; every finished chunk is kept: free space "
                           f"(or fix the disk), then run the same 'replica prepare' again to resume") from None


def _bar(total, resumed_images, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=resumed_images, unit="img", desc="prepare", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


def _finish(out: Path, source: Source, meta: dict, ok_flags, skips, stats: PixelStats, resumed, seconds,
            index=None, kept=None, order=None) -> dict:
    """Labels (and the JPEG index) of the splits written, the mean image and PCA if the training
    split was among them, skipped.tsv, and meta.json marked complete, last. ``kept``: splits left
    as they were (their files, skipped lines and, for train, statistics stand)."""
    kept = kept or {}
    for name, s in source.splits.items():
        labels = np.where(ok_flags[name], np.asarray(s.labels, np.int64), -1)
        np.save(out / name / "labels.npy", labels)
        if index is not None:
            np.save(out / name / "index.npy", index[name])
    if "train" not in kept:
        mean, pca = stats.result()
        np.save(out / "mean.npy", mean)
        (out / "pca.json").write_text(json.dumps(pca, indent=1))
        _save_mean_png(out / "mean.png", mean)
    lines = [(split, path, reason) for split, path, reason in skips]
    if kept and (out / "skipped.tsv").exists():  # the kept splits' own lines
        old = [ln.split("\t", 2) for ln in (out / "skipped.tsv").read_text().splitlines()[1:]]
        lines += [tuple(p) for p in old if len(p) == 3 and p[0] in kept]
    with open(out / "skipped.tsv", "w") as f:
        f.write("split\tpath\treason\n")
        for split, path, reason in sorted(lines):
            f.write(f"{split}\t{path}\t{reason}\n")
    splits = {name: dict(total=len(s.items), used=int(ok_flags[name].sum())) for name, s in source.splits.items()}
    splits.update({name: dict(total=v["total"], used=v["used"]) for name, v in kept.items()})
    if order:
        splits = {k: splits[k] for k in order if k in splits}
    meta.pop("kept_splits", None)
    meta.update(complete=True, splits=splits, skipped=len(lines))
    atomic_write(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    (out / STATE).unlink(missing_ok=True)
    meta["seconds"] = seconds
    meta["resumed_chunks"] = resumed
    return meta


def _save_mean_png(path: Path, mean: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.clip(np.round(mean), 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(path)
