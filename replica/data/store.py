"""The prepared store: every image once, resized and centre-cropped, with its training stats.

Layout of a store folder::

    meta.json          classes (and names), splits, image size, format, source, dataset, version
    train/images.u8    raw: (N, 3, 256, 256) uint8, C-order: one raw image after another
    train/images.jpeg  jpeg: the images encoded once, one after another (any order)
    train/index.npy    jpeg: (N, 2) int64 byte offset and length of each image; -1: skipped
    train/labels.npy   (N,) int64; -1 marks a skipped input
    val/...            the same for the validation split (and test/, for ILSVRC-2010)
    mean.npy           (3, 256, 256) float64 training mean image, 0–255
    pca.json           RGB covariance of all training pixels, its eigenvalues and eigenvectors
    mean.png           the mean image, to look at
    skipped.tsv        split, path and reason for every input that could not be used

Two formats. Raw uint8 rows: a training batch costs a memory copy, not a decode, but 196,608
bytes an image, 252 GB for ImageNet's 1.28M training images, more than most nodes' RAM.
JPEG at quality 90: about 28 KB an image on ImageNet-like pictures (36 GB for ImageNet), decoded
by the loader workers (libjpeg-turbo, ~2,700 decode+crop/s per core) or as a batch on the GPU
(nvJPEG). ``format=auto`` takes JPEG from 50,000 images on. The mean image and PCA of a JPEG
store are those of the decoded pixels, the ones the net is trained on (JPEG's chroma
subsampling lowers the two smaller RGB eigenvalues by ~13% on such pictures: the colour noise
then matches what the net sees). ``tools/bench.py data`` measures all of it.

This module reads a store (:class:`PreparedStore`) and holds the pixel statistics; writing one
(``prepare``: the worker pool, the resume state, the lock) is :mod:`replica.data.writer`, which
a reader never imports.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import ReplicaError

log = logging.getLogger("replica")

FORMAT_VERSION = 1
STATE = ".prepare-state.npz"  # the writer's resume state: a store holding it did not finish
JPEG_QUALITY = 90  # 28 KB an image, 3,600 decodes/s per core, mean image within 0.28 of raw (docs/performance.md)
JPEG_FROM_IMAGES = 50_000  # format=auto: JPEG for sets this large (ImageNet: 36 GB, not 262), raw below


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
        self.image_sum += other.image_sum  # float64 += a chunk's whole-number sums (any dtype)
        self.s1 += other.s1
        self.s2 += other.s2
        self.images += other.images

    def arrays(self) -> dict:
        return dict(image_sum=self.image_sum, s1=self.s1, s2=self.s2, images=np.int64(self.images))

    @classmethod
    def from_arrays(cls, a) -> "PixelStats":
        st = cls(a["image_sum"].shape[-1])
        st.image_sum = a["image_sum"].astype(np.float64)  # a copy, whatever dtype it travelled in
        st.s1, st.s2, st.images = a["s1"].copy(), a["s2"].copy(), int(a["images"])
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
        self.format = self.meta.get("format", "raw")
        self.rows = np.flatnonzero(labels >= 0)  # skipped inputs never reach a batch
        self.labels = labels[self.rows]
        self.file = self.root / split / ("images.u8" if self.format == "raw" else "images.jpeg")
        try:
            nbytes = self.file.stat().st_size
        except OSError as e:
            raise ReplicaError(f"{self.file}: {_reason(e)}; the store is damaged: run 'replica prepare' into a "
                               "new folder") from None
        # a truncated file (a disk that filled, a copy cut short) keeps its whole rows readable;
        # the rest are reported as bad inputs at the batch that asks for them
        if self.format == "raw":
            self.readable_rows = min(nbytes // (3 * self.size * self.size), len(labels))
            self.ok_row = np.arange(len(labels)) < self.readable_rows
        else:
            try:
                self.index = np.load(self.root / split / "index.npy", allow_pickle=False)  # (N, 2): offset, bytes
            except (OSError, ValueError, EOFError) as e:
                raise ReplicaError(f"{self.root / split / 'index.npy'}: unreadable ({_reason(e)}); the store is "
                                   "damaged: run 'replica prepare' into a new folder") from None
            end = self.index[:, 0] + self.index[:, 1]
            self.ok_row = (self.index[:, 1] > 0) & (end <= nbytes)
        self.truncated = int((~self.ok_row[self.rows]).sum())
        self._data = None  # the file's mapping, opened in the process that reads it

    def __reduce__(self):
        # pickled as its path: a loader worker (spawn or forkserver, Python 3.14's default) opens
        # the file itself instead of receiving the whole mapping's content
        return PreparedStore, (str(self.root), self.split)

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            if self.format == "raw":
                n = self.readable_rows
                shape = (n, 3, self.size, self.size)
                self._data = np.memmap(self.file, np.uint8, "r", shape=shape) if n else np.empty(shape, np.uint8)
            else:
                self._data = np.memmap(self.file, np.uint8, "r") if self.file.stat().st_size else np.empty(0, np.uint8)
        return self._data

    @property
    def images(self) -> np.ndarray:
        """Every stored row as (N, 3, S, S) uint8 (raw: the mapping itself; jpeg: decoded, small sets only)."""
        if self.format == "raw":
            return self.data
        return self._decoded(np.arange(len(self)))[0]

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
        ok = self.ok_row[rows]
        bad = [(f"{self.file} row {int(r)}", "truncated store: the row lies beyond the end of the file", int(k))
               for k, r in zip(np.flatnonzero(~ok), rows[~ok])]
        return positions[ok], rows[ok], bad

    def encoded(self, positions):
        """JPEG store: each image's encoded bytes (uint8 tensors, for a batched decode where the
        batch is used, e.g. nvJPEG on the GPU), their labels, and the bad rows."""
        import torch

        positions, rows, bad = self._split_bad(positions)
        off = self.index[rows]
        data = self.data
        out = [torch.from_numpy(np.array(data[o:o + n])) for o, n in off.tolist()]  # copies: a worker sends them
        return out, self.labels[positions], bad

    def _decoded(self, positions, hwc: bool = False, alloc=np.empty):
        """(images in position order, their positions, bad) with undecodable JPEG entries reported
        as bad. ``hwc``: a JPEG store's images (B, S, S, 3) as the decoder writes them (no
        transposing copy); a raw store's are (B, 3, S, S) whatever ``hwc`` says. ``alloc(shape,
        dtype)`` makes the output (shared memory in a loader worker)."""
        if self.format == "raw":
            positions, rows, bad = self._split_bad(positions)
            order = np.argsort(rows, kind="stable")
            out = alloc((len(rows), 3, self.size, self.size), np.uint8)
            out[order] = self.data[rows[order]]  # read in file order
            return out, positions, bad
        import torch

        from .jpeg import decode_jpeg, device_failure, is_decode_failure

        all_pos = np.asarray(positions)
        keep, bad = [], []
        imgs = []
        rows = self.rows[all_pos]
        for k, (p, r) in enumerate(zip(all_pos.tolist(), rows.tolist())):
            if not self.ok_row[r]:
                bad.append((f"{self.file} row {r}", "truncated store: the entry lies beyond the end of the file", k))
                continue
            o, n = self.index[r].tolist()
            try:
                img = decode_jpeg(torch.from_numpy(np.array(self.data[o:o + n])))
                if img.shape != (3, self.size, self.size):
                    raise RuntimeError(f"decoded to {tuple(img.shape)}")
                img = (img.permute(1, 2, 0) if hwc else img).numpy()  # (its memory is HWC)
            except RuntimeError as e:
                if not is_decode_failure(e):
                    raise device_failure(e, "cpu") from None
                bad.append((f"{self.file} row {r}", f"corrupt JPEG entry ({str(e).splitlines()[0][:100]})", k))
                continue
            imgs.append(img)
            keep.append(p)
        out = alloc((len(imgs), *((self.size, self.size, 3) if hwc else (3, self.size, self.size))), np.uint8)
        if imgs:
            np.stack(imgs, out=out)
        return out, np.asarray(keep, np.int64), bad

    def whole(self, positions, alloc=np.empty) -> tuple[np.ndarray, np.ndarray, list, bool]:
        """Whole images for crops cut where the batch is used (``crop_on=device``): uint8 images,
        labels, bad rows, and whether the images are (B, S, S, 3) (a JPEG store's, as decoded)
        rather than (B, 3, S, S) (a raw store's rows)."""
        hwc = self.format == "jpeg"
        out, kept, bad = self._decoded(positions, hwc=hwc, alloc=alloc)
        return out, self.labels[kept], bad, hwc

    def batch(self, positions) -> tuple[np.ndarray, np.ndarray, list]:
        """uint8 (B, 3, S, S), int64 (B,) labels and the bad rows, for positions 0…len−1."""
        out, kept, bad = self._decoded(positions)
        return out, self.labels[kept], bad

    def crops(self, positions, oy, ox, flips, size: int, out: np.ndarray) -> tuple[np.ndarray, list]:
        """Cut crop i of image positions[i] at (oy[i], ox[i]), mirrored where flips[i], into out[i].

        Raw: reads only the crop's bytes from the file, in file order. JPEG: decodes each image
        (libjpeg-turbo via torchvision), then crops. Returns (labels of the readable images, bad
        entries). Rows that cannot be read leave out[i] unwritten: drop them by ``bad``.
        """
        positions = np.asarray(positions)
        if self.format == "jpeg":
            imgs, kept, bad = self._decoded(positions)
            skip = {k for _, _, k in bad}
            j = 0
            for i in range(len(positions)):
                if i in skip:
                    continue
                y, x = int(oy[i]), int(ox[i])
                patch = imgs[j, :, y:y + size, x:x + size]
                out[i] = patch[:, :, ::-1] if flips[i] else patch
                j += 1
            return self.labels[kept], bad
        rows = self.rows[positions]
        _, _, bad = self._split_bad(positions)
        data = self.data
        for i in np.argsort(rows, kind="stable").tolist():
            if not self.ok_row[rows[i]]:
                continue
            y, x = int(oy[i]), int(ox[i])
            patch = data[rows[i], :, y:y + size, x:x + size]  # (3, size, size) view of the file
            out[i] = patch[:, :, ::-1] if flips[i] else patch
        return self.labels[positions[self.ok_row[rows]]], bad

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
