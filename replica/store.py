"""The prepared store: every image once, resized and centre-cropped, with its training stats.

Layout of a store folder::

    meta.json          classes, splits, image size, source, format version
    train/images.u8    (N, 3, 256, 256) uint8, C-order: one raw image after another
    train/labels.npy   (N,) int64; -1 marks a skipped input
    val/...            the same for the validation split
    mean.npy           (3, 256, 256) float64 training mean image, 0–255
    pca.json           RGB covariance of all training pixels, its eigenvalues and eigenvectors
    mean.png           the mean image, to look at
    skipped.tsv        split, path and reason for every input that could not be used

Why raw uint8 rather than JPEG: a training batch then costs a memory copy, not a decode
(``tools/bench_data.py`` measures bytes per image and images/s for both). The price is size:
196,608 bytes per image, 252 GB for ImageNet's 1.28M training images.

Preparation runs in worker processes, chunk by chunk. Each finished chunk is recorded, with
the running sums for the mean and covariance, in one state file replaced atomically, so an
interrupted ``prepare`` resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from .errors import ReplicaError
from .fileio import atomic_write
from .imageio import DEFAULT_MAX_PIXELS, BadImage, prepared_from_array, read_prepared
from .sources import Source, find_source

log = logging.getLogger("replica")

FORMAT_VERSION = 1
STATE = ".prepare-state.npz"


# ----------------------------------------------------------------------------------------------
# Statistics


class PixelStats:
    """Running float64 sums for the mean image and the RGB covariance over all pixels."""

    def __init__(self, size: int):
        self.image_sum = np.zeros((3, size, size), np.float64)
        self.s1 = np.zeros(3, np.float64)  # Σ p
        self.s2 = np.zeros((3, 3), np.float64)  # Σ p pᵀ
        self.images = 0

    def add_image(self, img: np.ndarray) -> None:
        x = img.reshape(3, -1).astype(np.float64)  # (3, H·W)
        self.image_sum += img
        self.s1 += x.sum(1)
        self.s2 += x @ x.T
        self.images += 1

    def merge(self, other: "PixelStats") -> None:
        self.image_sum += other.image_sum
        self.s1 += other.s1
        self.s2 += other.s2
        self.images += other.images

    def arrays(self) -> dict:
        return dict(image_sum=self.image_sum, s1=self.s1, s2=self.s2, images=np.int64(self.images))

    @classmethod
    def from_arrays(cls, a) -> "PixelStats":
        st = cls(a["image_sum"].shape[-1])
        st.image_sum, st.s1, st.s2, st.images = a["image_sum"].copy(), a["s1"].copy(), a["s2"].copy(), int(a["images"])
        return st

    def result(self) -> tuple[np.ndarray, dict]:
        if self.images == 0:
            raise ReplicaError("no usable training image: cannot compute the mean image and PCA")
        npix = self.images * self.image_sum[0].size
        mean = self.image_sum / self.images
        mu = self.s1 / npix
        cov = self.s2 / npix - np.outer(mu, mu)  # population covariance, 0–255² units
        return mean, pca_of(cov, mu, npix, self.images)


def pca_of(cov: np.ndarray, mu, npix: int, images: int) -> dict:
    """Eigen-system of an RGB covariance, largest eigenvalue first, eigenvectors as columns."""
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs * np.where(vecs.sum(0) < 0, -1.0, 1.0)  # a fixed sign: each column sums ≥ 0
    return dict(pixel_mean=list(map(float, mu)), covariance=cov.tolist(), eigenvalues=vals.tolist(),
                eigenvectors=vecs.tolist(), pixels=int(npix), images=int(images), units="0-255")


# ----------------------------------------------------------------------------------------------
# Writing


def _fingerprint(src: Source, size: int) -> str:
    h = hashlib.sha256(f"{FORMAT_VERSION}|{size}|{src.kind}|{src.classes}".encode())
    for name, s in src.splits.items():
        h.update(name.encode())
        h.update(str(len(s.items)).encode())
        for it, lab in zip(s.items, s.labels):
            h.update(f"{it}\t{lab}\n".encode())
    return h.hexdigest()


_W: dict = {}


def _worker_init(out: str, shapes: dict, size: int, max_pixels: int):
    _W.update(out=out, size=size, max_pixels=max_pixels,
              maps={k: np.memmap(Path(out) / k / "images.u8", np.uint8, "r+", shape=v) for k, v in shapes.items()})


def _worker_chunk(task):
    """Decode one chunk into the memmap; return (split, chunk, ok flags, skips, stats)."""
    split, chunk, start, items, arrays, want_stats = task
    size = _W["size"]
    mm = _W["maps"][split]
    ok = np.zeros(len(items), bool)
    skips = []
    stats = PixelStats(size) if want_stats else None
    for i, item in enumerate(items):
        try:
            if arrays is not None:  # CIFAR: a (3, 32, 32) array
                img = prepared_from_array(arrays[i], size)
            else:
                img = read_prepared(item, size, _W["max_pixels"])
        except BadImage as e:
            skips.append((split, str(item), str(e)))
            continue
        except Exception as e:  # anything else is still one bad file, not a dead job
            skips.append((split, str(item), f"{type(e).__name__}: {e}"))
            continue
        mm[start + i] = img
        ok[i] = True
        if stats is not None:
            stats.add_image(img)
    mm.flush()
    return split, chunk, ok, skips, (stats.arrays() if stats is not None else None)


def prepare(src, out, val=None, size: int = 256, workers: int | None = None, chunk: int = 64,
            max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, on_chunk=None) -> dict:
    """Write the prepared store for ``src`` into ``out`` (resumable). Returns the summary.

    ``workers=1`` works in this process; more use a process pool. ``on_chunk(done, total)`` is
    called after each chunk is recorded.
    """
    out = Path(out)
    source = find_source(src, val)
    log.info("%s: %s, %d classes; %s", source.root, source.kind, len(source.classes),
             ", ".join(f"{k} {len(v.items):,}" for k, v in source.splits.items()))
    for note in source.notes:  # what was recognized, and where the labels came from
        log.info("  %s", note)
    fp = _fingerprint(source, size)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp and meta.get("complete"):
            return meta  # nothing to do: the same source is already prepared here
        if meta.get("fingerprint") != fp:
            raise ReplicaError(f"{out} holds a store prepared from other inputs ({meta.get('source')}); "
                               "choose a new OUT folder or delete this one")

    shapes, chunks = {}, []
    for name, s in source.splits.items():
        n = len(s.items)
        shapes[name] = (n, 3, size, size)
        (out / name).mkdir(exist_ok=True)
        f = out / name / "images.u8"
        nbytes = n * 3 * size * size
        if not f.exists() or f.stat().st_size != nbytes:
            with open(f, "wb") as fh:
                fh.truncate(nbytes)  # sparse until written
        for c, start in enumerate(range(0, n, chunk)):
            chunks.append((name, c, start, min(start + chunk, n)))

    state_path = out / STATE
    done: dict[str, np.ndarray] = {k: np.zeros(-(-len(s.items) // chunk), bool) for k, s in source.splits.items()}
    ok_flags = {k: np.zeros(len(s.items), bool) for k, s in source.splits.items()}
    skips: list = []
    stats = PixelStats(size)
    if state_path.exists():
        st = np.load(state_path, allow_pickle=False)
        if str(st["fingerprint"]) == fp:
            for k in done:
                done[k] = st[f"done_{k}"].copy()
                ok_flags[k] = st[f"ok_{k}"].copy()
            skips = json.loads(str(st["skips"]))
            stats = PixelStats.from_arrays(st)
    meta = dict(version=FORMAT_VERSION, fingerprint=fp, complete=False, source=source.root, kind=source.kind,
                size=size, classes=source.classes, names=source.names, dataset=source.dataset, notes=source.notes)
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))

    todo = [c for c in chunks if not done[c[0]][c[1]]]
    resumed = len(chunks) - len(todo)

    def task(c):
        name, ci, a, b = c
        s = source.splits[name]
        arrays = s.arrays[s.items[a]:s.items[b - 1] + 1] if s.arrays is not None else None
        return name, ci, a, s.items[a:b], arrays, name == "train"

    def save_state():
        extra = {f"done_{k}": v for k, v in done.items()}
        extra.update({f"ok_{k}": v for k, v in ok_flags.items()})
        atomic_write(state_path, lambda f: np.savez(f, fingerprint=np.array(fp), skips=np.array(json.dumps(skips)),
                                                    **stats.arrays(), **extra))

    total = sum(len(s.items) for s in source.splits.values())
    t0 = time.time()
    if todo:
        workers = workers or os.cpu_count() or 1
        bar = _bar(total, resumed_images=sum(min(chunk, len(source.splits[c[0]].items) - c[2]) for c in chunks
                                              if done[c[0]][c[1]]), enabled=progress)
        last_save, finished = 0.0, resumed
        pool = None
        try:
            if workers > 1:
                pool = mp.get_context("spawn").Pool(workers, _worker_init, (str(out), shapes, size, max_pixels))
                results = pool.imap_unordered(_worker_chunk, map(task, todo))
            else:
                _worker_init(str(out), shapes, size, max_pixels)
                results = map(_worker_chunk, map(task, todo))
            for name, ci, ok, sk, part in results:
                a = ci * chunk
                ok_flags[name][a:a + len(ok)] = ok
                skips.extend(sk)
                if part is not None:
                    stats.merge(PixelStats.from_arrays(part))
                done[name][ci] = True
                finished += 1
                if time.time() - last_save > 1.0:  # at most one state write a second
                    save_state()
                    last_save = time.time()
                bar.update(len(ok))
                bar.set_postfix(skipped=len(skips), refresh=False)
                if on_chunk is not None:
                    on_chunk(finished, len(chunks))
        finally:  # an interrupted run keeps every chunk it finished
            save_state()
            bar.close()
            if pool is not None:
                pool.terminate()
    return _finish(out, source, meta, ok_flags, skips, stats, resumed, time.time() - t0)


def _bar(total, resumed_images, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=resumed_images, unit="img", desc="prepare", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


def _finish(out: Path, source: Source, meta: dict, ok_flags, skips, stats: PixelStats, resumed, seconds) -> dict:
    for name, s in source.splits.items():
        labels = np.where(ok_flags[name], np.asarray(s.labels, np.int64), -1)
        np.save(out / name / "labels.npy", labels)
    mean, pca = stats.result()
    np.save(out / "mean.npy", mean)
    (out / "pca.json").write_text(json.dumps(pca, indent=1))
    _save_mean_png(out / "mean.png", mean)
    with open(out / "skipped.tsv", "w") as f:
        f.write("split\tpath\treason\n")
        for split, path, reason in sorted(skips):
            f.write(f"{split}\t{path}\t{reason}\n")
    splits = {name: dict(total=len(s.items), used=int(ok_flags[name].sum())) for name, s in source.splits.items()}
    meta.update(complete=True, splits=splits, skipped=len(skips))
    atomic_write(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
    (out / STATE).unlink(missing_ok=True)
    meta["seconds"] = seconds
    meta["resumed_chunks"] = resumed
    return meta


def _save_mean_png(path: Path, mean: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.clip(np.round(mean), 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(path)


# ----------------------------------------------------------------------------------------------
# Reading


class PreparedStore:
    """Read side of a store: ``images[i]`` is (3, S, S) uint8; only usable rows are indexed."""

    def __init__(self, root, split: str = "train"):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise ReplicaError(f"{self.root}: not a prepared store (no meta.json); run 'replica prepare' first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ReplicaError(f"{meta_path}: unreadable ({_reason(e)}); run 'replica prepare' into a new "
                               "folder") from None
        if not self.meta.get("complete"):
            raise ReplicaError(f"{self.root}: preparation did not finish; run 'replica prepare' again to resume")
        if split not in self.meta["splits"]:
            raise ReplicaError(f"{self.root}: no {split!r} split (has {', '.join(self.meta['splits'])})")
        self.split = split
        self.size = self.meta["size"]
        self.classes = self.meta["classes"]
        self.names = self.meta.get("names")  # human-readable, where the source had them
        self.dataset = self.meta.get("dataset")  # "ilsvrc2012", "ilsvrc2010" or None
        try:
            labels = np.load(self.root / split / "labels.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ReplicaError(f"{self.root / split / 'labels.npy'}: unreadable ({_reason(e)}); the store is "
                               "damaged: run 'replica prepare' into a new folder") from None
        self.rows = np.flatnonzero(labels >= 0)  # skipped inputs never reach a batch
        self.labels = labels[self.rows]
        self.file = self.root / split / "images.u8"
        row_bytes = 3 * self.size * self.size
        try:
            have = self.file.stat().st_size // row_bytes
        except OSError as e:
            raise ReplicaError(f"{self.file}: {_reason(e)}; the store is damaged: run 'replica prepare' into a "
                               "new folder") from None
        # a truncated file (a disk that filled, a copy cut short) keeps its whole rows readable;
        # the rest are reported as bad inputs at the batch that asks for them
        self.readable = min(have, len(labels))
        self.truncated = int((self.rows >= self.readable).sum())
        shape = (self.readable, 3, self.size, self.size)
        self.images = np.memmap(self.file, np.uint8, "r", shape=shape) if self.readable else np.empty(shape, np.uint8)

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def splits_of(root) -> list[str]:
        meta = Path(root) / "meta.json"
        return list(json.loads(meta.read_text()).get("splits", {})) if meta.exists() else []

    def _split_bad(self, positions):
        """(positions with readable rows, their rows, bad entries (what, reason, index in batch))."""
        positions = np.asarray(positions)
        rows = self.rows[positions]
        ok = rows < self.readable
        bad = [(f"{self.file} row {int(r)}", "truncated store: the row lies beyond the end of the file", int(k))
               for k, r in zip(np.flatnonzero(~ok), rows[~ok])]
        return positions[ok], rows[ok], bad

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray, list]:
        """uint8 (B, 3, S, S), int64 (B,) labels and the bad rows, for positions 0…len−1."""
        positions, rows, bad = self._split_bad(positions)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), 3, self.size, self.size), np.uint8)
        out[order] = self.images[rows[order]]  # read in file order
        return out, self.labels[positions], bad

    def crops(self, positions, oy, ox, flips, size: int, out: np.ndarray) -> tuple[np.ndarray, list]:
        """Cut crop i of image positions[i] at (oy[i], ox[i]), mirrored where flips[i], into out[i].

        Reads only the crop's bytes from the file, in file order; returns (labels of the readable
        images, bad entries). Rows that cannot be read leave out[i] unwritten: drop them by ``bad``.
        """
        positions = np.asarray(positions)
        rows = self.rows[positions]
        _, _, bad = self._split_bad(positions)
        for i in np.argsort(rows, kind="stable").tolist():
            if rows[i] >= self.readable:
                continue
            y, x = int(oy[i]), int(ox[i])
            patch = self.images[rows[i], :, y:y + size, x:x + size]  # (3, size, size) view of the file
            out[i] = patch[:, :, ::-1] if flips[i] else patch
        return self.labels[positions[rows < self.readable]], bad

    def mean(self) -> np.ndarray:
        try:
            return np.load(self.root / "mean.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ReplicaError(f"{self.root / 'mean.npy'}: unreadable ({_reason(e)}); run 'replica prepare' "
                               "into a new folder") from None

    def pca(self) -> dict:
        try:
            return json.loads((self.root / "pca.json").read_text())
        except (OSError, ValueError) as e:
            raise ReplicaError(f"{self.root / 'pca.json'}: unreadable ({_reason(e)}); run 'replica prepare' "
                               "into a new folder") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120]


def describe_stats(root) -> str:
    """What ``replica stats`` prints."""
    st = PreparedStore(root, "train")
    pca, mean = st.pca(), st.mean()
    lines = [f"store {st.root}  (image {st.size}×{st.size}, {len(st.classes)} classes)"]
    for name, s in st.meta["splits"].items():
        lines.append(f"  {name:<6} {s['used']:>9,} images used of {s['total']:,}")
    lines.append(f"  skipped {st.meta.get('skipped', 0):,} (see skipped.tsv)")
    lines.append(f"mean image (3×{st.size}×{st.size}, 0–255): channel means R {mean[0].mean():.2f}  "
                 f"G {mean[1].mean():.2f}  B {mean[2].mean():.2f}  (picture: mean.png)")
    lines.append(f"RGB covariance over {pca['pixels']:,} training pixels (0–255² units):")
    for row in pca["covariance"]:
        lines.append("  " + "  ".join(f"{v:10.2f}" for v in row))
    lines.append("eigenvalues λ:   " + "  ".join(f"{v:10.2f}" for v in pca["eigenvalues"]))
    lines.append("√λ:              " + "  ".join(f"{v ** 0.5:10.3f}" for v in pca["eigenvalues"]))
    lines.append("eigenvectors (columns p1 p2 p3):")
    for row in pca["eigenvectors"]:
        lines.append("  " + "  ".join(f"{v:10.4f}" for v in row))
    return "\n".join(lines)
