"""The work of ``replica prepare``'s worker processes, and their pool.

A worker takes a chunk of a split (a few dozen images): decodes, resizes and centre-crops each
image once, then writes its rows into the raw store (``pwrite`` at their offsets) or returns
their JPEG bytes for the main process to append; a training chunk's pixel sums (for the mean
image and PCA) go back too. :func:`run_chunks` runs every chunk in this process or in a pool of
spawned workers, each with a pipe of its own. The main side (:mod:`replica.data.writer`) records
what comes back and keeps the resume state.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ReplicaError
from .imageio import BadImage, prepared_from_array, read_prepared
from .store import PixelStats

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


def encode(img: np.ndarray, quality: int) -> tuple[bytes, np.ndarray]:
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
            data, img = encode(img, _W["quality"])  # statistics of the pixels the net will see
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


def run_chunks(tasks, handle, workers: int, args, out, handle_stats=None):
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
