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
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ReplicaError
from ..fileio import atomic_write, locked
from .imageio import DEFAULT_MAX_PIXELS, BadImage, prepared_from_array, read_prepared
from .imageio import Member
from .sources import Source, find_source
from .chunks import DEFERRED, encode, run_chunks, usable_cpus
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
            sizes.append(len(encode(img, quality)[0]))
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
    with locked(out, LOCK, lambda holder: f"{out}: another 'replica prepare' is writing this store ({holder}); "
                                          f"wait for it to finish (or stop it), then run this one again to resume"):
        yield


class PrepareState:
    """What a prepare has done so far, chunk by chunk, and the file that keeps it for a resume.

    Per split: which chunks are done, which images were usable (``ok``), and for a JPEG store
    each image's (offset, bytes) in its data file and how many bytes of that file the state
    accounts for (``committed``); the skipped inputs; the training images' pixel sums. A
    training chunk whose sums are still with its worker waits in ``pending`` and is done when
    they arrive (:meth:`record_stats`). :meth:`save` writes the data files' bytes to disk first,
    then the state that says they are there.
    """

    def __init__(self, out: Path, source: Source, fp: str, fmt: str, size: int, chunk: int):
        self.path, self.fp, self.fmt, self.chunk = out / STATE, fp, fmt, chunk
        self.data_file = {k: out / k / ("images.u8" if fmt == "raw" else "images.jpeg") for k in source.splits}
        self.done = {k: np.zeros(-(-len(s.items) // chunk), bool) for k, s in source.splits.items()}
        self.ok = {k: np.zeros(len(s.items), bool) for k, s in source.splits.items()}
        self.index = {k: np.full((len(s.items), 2), -1, np.int64) for k, s in source.splits.items()}  # jpeg
        self.committed = {k: 0 for k in source.splits}  # jpeg: bytes of each file the state accounts for
        self.skips: list = []
        self.stats = PixelStats(size)
        self.pending: dict = {}  # (split, chunk) recorded, its pixel sums still with its worker: its skips
        self.appends, self.readers = {}, {}

    def load(self) -> None:
        """The state an interrupted prepare of the same inputs left (else nothing is done yet)."""
        if not self.path.exists():
            return
        st = np.load(self.path, allow_pickle=False)
        if str(st["fingerprint"]) != self.fp:
            return
        for k in self.done:
            self.done[k] = st[f"done_{k}"].copy()
            self.ok[k] = st[f"ok_{k}"].copy()
            if self.fmt == "jpeg":
                self.index[k] = st[f"index_{k}"].copy()
                self.committed[k] = int(st[f"committed_{k}"])
        self.skips = json.loads(str(st["skips"]))
        self.stats = PixelStats.from_arrays(st)

    def open(self) -> None:
        """The data files: appended to (jpeg), and read handles to fsync what workers wrote."""
        if self.fmt == "jpeg":
            self.appends = {k: open(f, "ab") for k, f in self.data_file.items()}
        self.readers = {k: os.open(f, os.O_RDONLY) for k, f in self.data_file.items()}

    def close(self) -> None:
        for f in self.appends.values():
            with contextlib.suppress(OSError):  # a failed flush here was raised (and said) already
                f.close()
        for fd in self.readers.values():
            os.close(fd)
        self.appends, self.readers = {}, {}

    def save(self) -> None:
        for k in self.data_file:  # the data first, then the state that says it is there
            if self.fmt == "jpeg":
                self.appends[k].flush()
                self.committed[k] = self.appends[k].tell()
            os.fsync(self.readers[k])
        extra = {f"done_{k}": v for k, v in self.done.items()}
        extra.update({f"ok_{k}": v for k, v in self.ok.items()})
        if self.fmt == "jpeg":
            extra.update({f"index_{k}": v for k, v in self.index.items()})
            extra.update({f"committed_{k}": np.int64(v) for k, v in self.committed.items()})
        atomic_write(self.path, lambda f: np.savez(f, fingerprint=np.array(self.fp),
                                                   skips=np.array(json.dumps(self.skips)), **self.stats.arrays(),
                                                   **extra))

    def record(self, result) -> int:
        """A chunk's result from :func:`~replica.data.chunks.run_chunks`; returns its image count."""
        name, ci, ok, sk, part, encoded = result
        a = ci * self.chunk
        self.ok[name][a:a + len(ok)] = ok
        if encoded is not None:
            f = self.appends[name]
            for i, data in enumerate(encoded):
                if data:
                    self.index[name][a + i] = (f.tell(), len(data))
                    f.write(data)
        if part == DEFERRED:  # done when its sums arrive (record_stats)
            self.pending[(name, ci)] = sk
            return len(ok)
        if part is not None:
            self.stats.merge(PixelStats.from_arrays(part))
        self.skips.extend(sk)
        self.done[name][ci] = True
        return len(ok)

    def record_stats(self, sums) -> None:
        """A worker's accumulated sums: merged, and the chunks they cover marked done, only if
        every one of them was recorded here (else all of them are redone on resume, sums and all)."""
        arrays, covered = sums
        if any(tuple(c) not in self.pending for c in covered):
            return
        if arrays is not None:
            self.stats.merge(PixelStats.from_arrays(arrays))
        for name, ci in covered:
            self.done[name][ci] = True
            self.skips.extend(self.pending.pop((name, ci)))


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
    state = PrepareState(out, source, fp, fmt, size, chunk)
    state.load()
    needed = _estimate_bytes(source, size, fmt, quality, max_pixels)
    have = sum(_allocated(f) if fmt == "raw" else state.committed[k] for k, f in state.data_file.items())
    _check_space(out, needed, have, f"{total:,} images, {fmt}" + ("" if fmt == "raw" else f" quality {quality}"))
    for k, f in state.data_file.items():
        if fmt == "raw":
            nbytes = len(source.splits[k].items) * 3 * size * size
            if not f.exists() or f.stat().st_size != nbytes:
                with open(f, "wb") as fh:
                    fh.truncate(nbytes)  # sparse until written
        else:  # bytes past what the state accounts for belong to chunks that will be redone
            with open(f, "ab") as fh:
                fh.truncate(state.committed[k])
    meta = dict(version=FORMAT_VERSION, fingerprint=fp, complete=False, source=full.root, kind=full.kind,
                size=size, format=fmt, quality=quality if fmt == "jpeg" else None, classes=full.classes,
                names=full.names, dataset=full.dataset, notes=full.notes, base_fingerprint=base_fp,
                split_fingerprints=split_fps, kept_splits=kept)
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))

    todo = [c for c in chunks if not state.done[c[0]][c[1]]]
    resumed = len(chunks) - len(todo)

    def task(c):
        name, ci, a, b = c
        s = source.splits[name]
        arrays = s.arrays[s.items[a]:s.items[b - 1] + 1] if s.arrays is not None else None
        return name, ci, a, s.items[a:b], arrays, name == "train"  # a kept train split is not in source

    t0 = time.time()
    state.open()
    try:
        if todo:
            bar = _bar(total, resumed_images=sum(min(chunk, len(source.splits[c[0]].items) - c[2]) for c in chunks
                                                  if state.done[c[0]][c[1]]), enabled=progress)
            last_save, finished = time.time(), resumed

            def handle(result):
                nonlocal last_save, finished
                bar.update(state.record(result))
                finished += 1
                if time.time() - last_save >= STATE_EVERY_S:
                    state.save()
                    last_save = time.time()
                bar.set_postfix(skipped=len(state.skips), refresh=False)
                if on_chunk is not None:
                    on_chunk(finished, len(chunks))

            args = (str(out), list(source.splits), size, max_pixels, fmt, quality)
            try:
                auto = 1 if total < IN_PROCESS_BELOW else usable_cpus()
                run_chunks(map(task, todo), handle, min(workers or auto, len(todo)), args, out,
                           handle_stats=state.record_stats)
            finally:  # an interrupted run keeps every chunk it finished
                state.save()
                bar.close()
    finally:
        state.close()
    return _finish(out, source, meta, state.ok, state.skips, state.stats, resumed, time.time() - t0,
                   state.index if fmt == "jpeg" else None, kept=kept, order=list(full.splits))


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
