"""Datasets and loaders: prepared store or image files → uint8 batches → augmented tensors.

Both dataset kinds answer ``batch(positions) → (uint8 (B, 3, S, S), labels, bad)``:
:class:`~replica.store.PreparedStore` reads raw rows; :class:`FileImages` decodes and resizes
files on the fly (small datasets: an ImageFolder tree, a txt index, CIFAR-10 batches), with
the same augmentation afterwards. Knows nothing about the model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .. import augment
from ..errors import ReplicaError
from ..fileio import atomic_write
from ..runtime import to_device
from .imageio import DEFAULT_MAX_PIXELS, BadImage, prepared_from_array, read_prepared
from .sources import Source, find_source
from .ring import BatchRing, Slot
from .store import PixelStats, PreparedStore

log = logging.getLogger("replica")


class FileImages:
    """One split of a :class:`~replica.sources.Source`, decoded and resized on the fly."""

    def __init__(self, source: Source, split: str = "train", size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS):
        if split not in source.splits:
            raise ReplicaError(f"{source.root}: no {split!r} split (has {', '.join(source.splits)})")
        self.source, self.split, self.size, self.max_pixels = source, split, size, max_pixels
        s = source.splits[split]
        self.items, self.labels, self.arrays = s.items, np.asarray(s.labels, np.int64), s.arrays
        self.classes = source.classes
        self.names, self.dataset = source.names, source.dataset

    def __len__(self) -> int:
        return len(self.items)

    def read(self, i: int) -> np.ndarray:
        if self.arrays is not None:
            return prepared_from_array(self.arrays[self.items[i]], self.size)
        return read_prepared(self.items[i], self.size, self.max_pixels)

    def batch(self, positions):
        """uint8 images, labels, and (path, reason, index in batch) for each file that failed."""
        imgs, labels, bad = [], [], []
        for k, p in enumerate(np.asarray(positions).tolist()):
            try:
                imgs.append(self.read(p))
                labels.append(self.labels[p])
            except BadImage as e:  # skipped and reported, never silently dropped
                bad.append((str(self.items[p]), str(e), k))
        out = np.stack(imgs) if imgs else np.empty((0, 3, self.size, self.size), np.uint8)
        return out, np.asarray(labels, np.int64), bad


def open_images(path, split: str = "train", size: int = 256):
    """A prepared store if ``path`` is one, else image files read on the fly."""
    path = Path(path)
    if (path / "meta.json").exists():
        return PreparedStore(path, split)
    return FileImages(find_source(path), split, size)


def open_heldout(path):
    """The validation split of a store or image source, or its only split if it has no other."""
    path = Path(path)
    if (path / "meta.json").exists():
        splits = PreparedStore.splits_of(path)
        return PreparedStore(path, "val" if "val" in splits else "train")
    src = find_source(path)
    return FileImages(src, "val" if "val" in src.splits else "train")


class _Relabelled:
    """A held-out set whose labels are re-indexed into the training classes (matched by name)."""

    def __init__(self, images, classes, mapping: np.ndarray):
        self.images, self.classes, self.mapping = images, list(classes), mapping
        self.size = images.size

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, positions):
        u8, labels, bad = self.images.batch(positions)
        return u8, self.mapping[labels], bad


def match_classes(images, classes, where) -> tuple:
    """``images`` with labels that index ``classes`` (the training classes), matched by name.

    Returns (images, None) when the class lists are the same, or (relabelled images, "K of the N
    classes") for a subset. A class that training never saw is an error naming it: labels would
    otherwise shift by one for every class after a missing one.
    """
    classes = list(classes)
    own = list(images.classes)
    if own == classes:
        return images, None
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in own if c not in index]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ReplicaError(f"{where}: class(es) {', '.join(map(repr, unknown[:5]))}{more} are not among the "
                           f"{len(classes)} training classes")
    mapping = np.asarray([index[c] for c in own], np.int64)
    return _Relabelled(images, classes, mapping), f"{len(own)} of the {len(classes)} classes"


def compute_stats(images, batch: int = 64, progress: bool = False) -> tuple[np.ndarray, dict]:
    """Mean image and RGB PCA of a dataset, by the same sums ``prepare`` keeps."""
    from tqdm import tqdm

    stats = PixelStats(images.size)
    for a in tqdm(range(0, len(images), batch), desc="stats", disable=not progress, unit="batch"):
        u8, _, _ = images.batch(np.arange(a, min(a + batch, len(images))))
        for img in u8:
            stats.add_image(img)
    return stats.result()


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one batch: augmentation depends on (seed, epoch, batch) and nothing else."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of positions for an epoch (a pure function of seed and epoch)."""
    g = torch.Generator().manual_seed(batch_seed(seed, epoch, -1))
    return torch.randperm(n, generator=g).numpy()


class TrainBatches(torch.utils.data.Dataset):
    """Batch ``i`` of an epoch: a map-style dataset of whole batches, for a DataLoader.

    Every batch is a pure function of (seed, epoch, i): the same images in the same order with
    the same crops, flips and colour shifts, whatever the number of workers, and after a resume
    from the middle of an epoch (``start``). Workers return uint8 crops and the colour shifts;
    :meth:`finish` turns them into the float batch where it is used (the main process, or the
    GPU after a uint8 transfer: a quarter of the bytes of float32).
    """

    def __init__(self, images, batch_size: int, mean_image: np.ndarray, pca: dict | None, *, seed: int = 0,
                 epoch: int = 0, start: int = 0, pca_mode: str = "as-run", noise: bool = True,
                 chunk: int | None = None, rank: int = 0, world: int = 1, crop: int = augment.CROP,
                 decode: str = "workers", crop_on: str = "workers"):
        if crop > images.size:
            raise ReplicaError(f"crop {crop} is larger than the {images.size}×{images.size} images")
        if batch_size < 1:
            raise ReplicaError(f"batch size: expected a positive integer, got {batch_size}")
        if len(images) < batch_size * world:
            raise ReplicaError(f"{len(images)} training images are fewer than one batch of {batch_size}"
                               f"{f' × {world} processes' if world > 1 else ''}")
        self.images, self.batch_size, self.seed, self.epoch, self.start = images, batch_size, seed, epoch, start
        self.crop = crop
        self.mean_crop = augment.centre_crop_of(torch.as_tensor(mean_image), crop)
        self.pca, self.pca_mode, self.noise, self.chunk = pca, pca_mode, noise, chunk
        self.rank, self.world = rank, world
        # "device": a JPEG store's batches leave the workers encoded (JpegBatch), for the GPU to decode
        self.decode = decode if hasattr(images, "encoded") and getattr(images, "format", "raw") == "jpeg" else "workers"
        # "device": whole images leave the workers (Uncropped), cut where the batch is used
        self.crop_on = crop_on
        self.ring = None  # a BatchRing: loader workers write their batches into its slots (Feed sets it)
        self.order = epoch_order(len(images), seed, epoch)
        self.batches = len(images) // (batch_size * world)  # drop the last partial batch

    def __len__(self) -> int:
        return self.batches - self.start

    def __getitem__(self, i: int):
        """(uint8 crops, shifts or None, labels, batch index, bad files) for batch start + i."""
        b = self.start + i
        g = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        positions = self.order[b * g: (b + 1) * g][mine]
        # draws are made for the whole global batch and sliced: N processes with batch B/N see
        # exactly the crops, flips and shifts that one process with batch B would
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, b))
        oy, ox, fl, shift = augment.draw_train(g, gen, pca=self.pca, pca_mode=self.pca_mode, noise=self.noise,
                                               chunk=self.chunk, border=self.images.size - self.crop)
        oy, ox, fl = oy[mine], ox[mine], fl[mine]
        shift = shift[mine] if shift is not None else None
        shape = (len(positions), 3, self.crop, self.crop)
        ring = self.ring if torch.utils.data.get_worker_info() is not None else None
        slot = ring.slot_of(b) if ring is not None else None

        def alloc(shape):  # a batch's memory: its ring slot in a loader worker, else shared memory
            return ring.take(b, shape) if ring is not None else _batch_tensor(shape)

        crops = alloc(shape) if self.decode != "device" and self.crop_on != "device" else None
        if self.decode == "device":  # encoded bytes out; decode, crop and flip where the batch is used
            datas, labels, bad = self.images.encoded(positions)
            keep = _keep(len(positions), bad)
            names = [f"{self.images.file} row {int(r)}" for r in self.images.rows[np.asarray(positions)][keep.numpy()]]
            crops = JpegBatch(datas, oy[keep], ox[keep], fl[keep], self.crop, names, self.images.size)
        elif self.crop_on == "device":  # whole images out: the crops are one gather where the batch is used
            if hasattr(self.images, "whole"):
                u8, labels, bad, hwc = self.images.whole(positions, alloc=lambda sh, dt: alloc(sh).numpy())
                images = Slot(slot, u8.shape) if ring is not None else torch.from_numpy(u8)
            else:
                u8, labels, bad = self.images.batch(positions)
                images, hwc = torch.from_numpy(u8), False
            keep = _keep(len(positions), bad)
            crops = Uncropped(images, oy[keep], ox[keep], fl[keep], self.crop, hwc)
        elif hasattr(self.images, "crops"):  # prepared store: read only the crops' bytes
            labels, bad = self.images.crops(positions, oy, ox, fl, self.crop, crops.numpy())
            keep = _keep(len(positions), bad)
            if ring is not None:  # the rows of bad images stay unwritten in the slot: left out where it is read
                crops = Slot(slot, shape, keep if bad else None)
            elif bad:
                crops = crops[keep]
        else:  # files on the fly: decode whole images, then crop
            u8, labels, bad = self.images.batch(positions)
            keep = _keep(len(positions), bad)  # each image keeps the draws made for its place
            crops = augment.crop(torch.from_numpy(u8), oy[keep], ox[keep], fl[keep], self.crop)
        if bad and shift is not None:  # bad inputs shorten the batch
            shift = shift[keep]
        if ring is not None:  # the few small tensors as arrays: they travel in the result's bytes, no file of their own
            if isinstance(crops, Slot) and crops.keep is not None:
                crops = Slot(crops.index, crops.shape, crops.keep.numpy())
            elif isinstance(crops, Uncropped):
                crops.oy, crops.ox, crops.flips = (np.asarray(t) for t in (crops.oy, crops.ox, crops.flips))
            return crops, None if shift is None else shift.numpy(), np.asarray(labels, np.int64), b, bad
        return crops, shift, torch.as_tensor(labels), b, bad

    def finish(self, crops: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """The float32 batch, on the crops' device."""
        return augment.finish(crops, self.mean_crop, shift, self.pca_mode)

    def batch(self, i: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``start + i`` as (float32 images, labels), in this process (decoded on ``device``
        if it left the workers encoded)."""
        crops, shift, labels, _, _ = self[i]
        crops, shift, labels, _ = decode_if_encoded(crops, shift, labels, device)
        return self.finish(crops, shift), labels


def _batch_tensor(shape) -> torch.Tensor:
    """An empty uint8 batch; in a loader worker, in shared memory: the batch then travels to the
    main process without a copy."""
    t = torch.empty(shape, dtype=torch.uint8)
    if torch.utils.data.get_worker_info() is not None:
        t.share_memory_()
    return t


class Uncropped:
    """Whole uint8 images with their crop draws (``crop_on=device``): the workers only read and
    decode; the crops and flips are one gather where the batch is used (:func:`replica.augment.cut`),
    the same pixels as the workers' crops (tests/test_data.py)."""

    def __init__(self, images: torch.Tensor, oy, ox, flips, crop: int, hwc: bool):
        self.images, self.oy, self.ox, self.flips, self.crop, self.hwc = images, oy, ox, flips, crop, hwc

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self, device=None) -> "Uncropped":
        """What a DataLoader's pin thread calls on a batch it does not know (torch's pin_memory)."""
        pinned = self.images.pin_memory() if device is None else self.images.pin_memory(device)
        return Uncropped(pinned, self.oy, self.ox, self.flips, self.crop, self.hwc)

    def cut(self, device) -> torch.Tensor:
        """(B, 3, crop, crop) uint8 on ``device``, channels_last in memory."""
        u8 = self.images.to(device, non_blocking=True)
        return augment.cut(u8, self.oy, self.ox, self.flips, self.crop, hwc=self.hwc)


def decode_if_encoded(crops, shift, labels, device):
    """A :class:`JpegBatch` decoded on ``device`` (dropping entries the decoder refuses, with
    their shifts and labels), an :class:`Uncropped` batch cut there; uint8 crops pass through.
    Returns (crops, shift, labels, bad)."""
    if isinstance(crops, Uncropped):
        return crops.cut(device), shift, labels, []
    if not isinstance(crops, JpegBatch):
        return crops, shift, labels, []
    out, keep, bad = crops.decode(device)
    if bad:
        labels = labels[keep]
        shift = shift[keep] if shift is not None else None
    return out, shift, labels, bad


class JpegBatch:
    """A batch still encoded, with its crop draws: decoded where the batch is used (nvJPEG on a
    GPU: ``torchvision.io.decode_jpeg(list, device="cuda")``), then cropped and flipped there."""

    def __init__(self, datas: list, oy, ox, flips, crop: int, names: list, size: int | None = None):
        # one tensor of bytes and their lengths: a loader worker hands over one shared buffer, not
        # one file descriptor per image (hundreds a batch exhaust the process's limit)
        self.blob = torch.cat(datas) if datas else torch.empty(0, dtype=torch.uint8)
        self.sizes = [len(d) for d in datas]
        self.oy, self.ox, self.flips, self.crop, self.names = oy, ox, flips, crop, names
        self.size = size  # the store's S: an entry that decodes to another shape is a bad input

    @property
    def datas(self) -> list:
        return list(torch.split(self.blob, self.sizes)) if self.sizes else []

    def __len__(self) -> int:
        return len(self.sizes)

    def decode(self, device, cuda=None) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(uint8 crops (B', 3, c, c) on ``device``, keep mask (B,), bad entries) for this batch.

        On CUDA the decode runs on a stream of its own (:func:`replica.jpeg.on_decode_stream`),
        so nvJPEG cannot write into memory that queued training kernels still read."""
        from .jpeg import on_decode_stream

        device = torch.device(device)
        if device.type == "cuda":
            return on_decode_stream(device, lambda: self._decode_here(device), cuda=cuda)
        return self._decode_here(device)

    def _decode_here(self, device) -> tuple[torch.Tensor, torch.Tensor, list]:
        from .jpeg import decode_jpeg, device_failure, is_decode_failure

        datas = self.datas
        try:
            imgs = decode_jpeg(datas, device=device) if datas else []
            ok = [True] * len(imgs)
        except RuntimeError as e:  # one corrupt entry fails the whole batched call: find it
            if not is_decode_failure(e):
                raise device_failure(e, device) from None
            imgs, ok = [], []
            for d in datas:
                try:
                    imgs.append(decode_jpeg(d, device=device))
                    ok.append(True)
                except RuntimeError as e1:
                    if not is_decode_failure(e1):
                        raise device_failure(e1, device) from None
                    imgs.append(None)
                    ok.append(False)
        c = self.crop
        good, bad = [], []
        for i, img in enumerate(imgs):
            if not ok[i] or img.shape[0] != 3 or (self.size and tuple(img.shape[1:]) != (self.size, self.size)):
                why = "the decoder refused it" if not ok[i] else f"decoded to {tuple(img.shape)}"
                bad.append((self.names[i], f"corrupt JPEG entry ({why})", i))
                ok[i] = False
                continue
            good.append(i)
        keep = torch.as_tensor(ok, dtype=torch.bool)
        if not good:
            return torch.empty((0, 3, c, c), dtype=torch.uint8, device=device), keep, bad
        if device.type == "cuda":  # one stack and one gather, not two launches an image
            whole = torch.stack([imgs[i] for i in good])
            return augment.cut(whole, self.oy[keep], self.ox[keep], self.flips[keep], c), keep, bad
        out = []  # the CPU: a copy per crop is far cheaper than a gather there (docs/performance.md)
        for i in good:
            y, x = int(self.oy[i]), int(self.ox[i])
            patch = imgs[i][:, y:y + c, x:x + c]
            out.append(patch.flip(-1) if self.flips[i] else patch)
        return torch.stack(out), keep, bad


def _keep(n: int, bad) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[[k for _, _, k in bad]] = False
    return keep


WORKER_NICE = 10  # CPU training: loader workers yield to the training threads (docs/performance.md)


def _yield_to_training(_worker_id: int) -> None:
    """Lower a loader worker's priority: on a machine whose cores all run the training step, a
    worker decoding at equal priority preempts one of its threads and stalls the others at their
    next join. Niced, it runs in the step's idle moments and while the step waits for a batch
    (then nothing else wants the cores), and still gets a share when both are busy."""
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICE)


def worker_deaths_at_next_batch() -> None:
    """From now on a loader worker's death raises in ``next()`` of its iterator, never in the
    middle of whatever the main thread is running.

    torch's DataLoader installs (once per process, with its first iterator) a SIGCHLD handler
    that raises "DataLoader worker … is killed by signal" wherever the main thread is when a
    worker dies: inside a training step's backward, or between two collectives, where one
    process of a job would leave the others waiting in DDP's all-reduce. With the default
    handler back, the iterator finds the death itself: each wait for a batch checks its
    workers every few seconds (torch's MP_STATUS_CHECK_INTERVAL, 5 s) and raises "DataLoader
    worker (pid(s) …) exited unexpectedly" there, where the loop reads batches and all the
    processes can agree to stop. Call it after the iterator exists (its creation installs the
    handler), from the main thread."""
    import signal
    import threading

    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _as_is(batch):
    """A batch as the dataset made it (torch's default would turn its arrays into tensors in the
    worker, each then sent through a shared-memory file of its own)."""
    return batch


def loader(ds: torch.utils.data.Dataset, workers: int = 0, pin_memory: bool = False, background: bool = False):
    """A DataLoader over whole batches (the dataset makes them; no collation). ``background``:
    workers at lower priority (:func:`_yield_to_training`), for training on the CPU."""
    # its own generator: a DataLoader otherwise draws a seed from the global RNG, which the
    # dropout masks also use, and a resumed run would see other masks
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       prefetch_factor=PREFETCH if workers else None,
                                       worker_init_fn=_yield_to_training if background and workers else None,
                                       collate_fn=_as_is,
                                       generator=torch.Generator().manual_seed(0))


PREFETCH = 2  # batches a loader worker prepares ahead


def slot_bytes(ds: TrainBatches) -> int:
    """The largest batch ``ds`` writes, in bytes: its crops, or with ``crop_on=device`` its whole images."""
    side = ds.images.size if ds.crop_on == "device" else ds.crop
    return ds.batch_size * 3 * side * side


class Feed:
    """Training batches from a loader to where the model is. With loader workers the batches
    come through ``ring`` (a :class:`~replica.data.ring.BatchRing`: no file and no pin thread a
    batch); to a GPU they travel on ``copy`` (a :class:`~replica.data.ring.CopyStream`), and
    their slot is given back once the copy's event completes; on the CPU once the step has read
    the batch (:meth:`done`). ``next()`` gives (crops, shift, labels, batch index, bad) as the
    dataset does, the tensors on ``device`` (or, on the CPU, where the worker left them)."""

    def __init__(self, ds: TrainBatches, workers: int, device, *, ring: BatchRing | None = None, copy=None,
                 background: bool = False):
        self.device, self.copy = torch.device(device), copy
        self.ring = ring if workers and ds.decode != "device" else None
        ds.ring = self.ring
        if self.ring is not None:
            self.ring.reset(ds.start)  # before the workers start
        pin = self.device.type == "cuda" and self.ring is None
        self.it = iter(loader(ds, workers, pin_memory=pin, background=background))
        self.held = None  # CPU: the batch being used, whose slot it holds

    def __iter__(self):
        return self

    def __next__(self):
        self.done()
        if self.ring is not None:
            self.ring.settle()
        crops, shift, labels, b, bad = next(self.it)
        if isinstance(labels, np.ndarray):  # from the ring's workers: arrays, not tensors in files of their own
            shift, labels = (None if shift is None else torch.from_numpy(shift)), torch.from_numpy(labels)
            if isinstance(crops, Slot) and crops.keep is not None:
                crops = Slot(crops.index, crops.shape, torch.from_numpy(crops.keep))
            elif isinstance(crops, Uncropped):
                crops.oy, crops.ox, crops.flips = (torch.from_numpy(t) for t in (crops.oy, crops.ox, crops.flips))
        slot = None
        if isinstance(crops, Slot):
            slot, crops = crops.index, self.ring.view(crops)
        elif isinstance(crops, Uncropped) and isinstance(crops.images, Slot):
            slot, crops.images = crops.images.index, self.ring.view(crops.images)
        if self.device.type == "cuda" and not isinstance(crops, JpegBatch):
            cut = isinstance(crops, Uncropped)  # its crop draws go too: pinned, non-blocking, not at the gather
            host = [crops.images if cut else crops, shift, labels] + ([crops.oy, crops.ox, crops.flips] if cut else [])
            move = lambda: [to_device(t, self.device) for t in host]  # noqa: E731
            if self.copy is not None:
                moved, event = self.copy(move)
            else:  # on the compute stream: the slot still waits for the copy's end
                moved = move()
                event = torch.cuda.Event() if slot is not None else None
                if event is not None:
                    event.record()
            whole, shift, labels = moved[:3]
            if cut:
                crops.images, (crops.oy, crops.ox, crops.flips) = whole, moved[3:]
            else:
                crops = whole
            if slot is not None:  # the slot passes on once its copy has left it
                self.ring.give_back(b, event)
                slot = None
        self.held = b if slot is not None else None
        return crops, shift, labels, b, bad

    def done(self) -> None:
        """The batch last given has been read (on the CPU: its slot may be written again)."""
        if self.held is not None:
            self.ring.give_back(self.held)
            self.held = None

    def close(self) -> None:
        """Stop the workers, then wait for the copies still reading the ring."""
        self.done()
        shutdown = getattr(self.it, "_shutdown_workers", None)  # torch's; a plain iterator has none
        if shutdown is not None:
            shutdown()
        del self.it
        if self.ring is not None:
            self.ring.reset()


# ----------------------------------------------------------------------------------------------
# A training run's data

# Image folders are read on the fly for small sets; past this many images, the statistics alone
# would take an hour in one thread before step 1: ``prepare`` does it once on every core.
STATS_ON_THE_FLY_MAX = 50_000


def open_training(data, val_data=None):
    """(train images, val images or None) of a run's ``data`` and ``val_data``.

    ``val_data``'s classes are matched to the training classes by name (a subset is allowed and
    logged; a class training never saw is an error). A validation split that holds no image is
    an error too: it would log 0.00% error and keep epoch 1 as the best."""
    if data is None:
        raise ReplicaError("data: required; give a prepared store or an image folder (data=PATH)")
    train = open_images(data, "train")
    where = val_data or data
    if val_data:
        val, subset = match_classes(open_heldout(val_data), train.classes, val_data)
        if subset:
            log.info("val_data %s: %s (labels matched to the training classes by name)", val_data, subset)
    else:
        try:
            val = open_images(data, "val")
        except ReplicaError:  # no validation split: train-loss-only metrics
            val = None
    if val is not None and len(val) == 0:
        raise ReplicaError(f"{where}: the validation split holds no images; prepare it again from class folders "
                           f"(val/<class>/<image>), or give val_data=PATH")
    return train, val


def data_stats(train, run: Path):
    """Mean image and PCA: the store's own, or computed once for files and kept in the run."""
    if isinstance(train, PreparedStore):
        return train.mean(), train.pca()
    cache = run / "stats.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["mean"], json.loads(str(z["pca"]))
    mean, pca = compute_stats(train, progress=True)
    atomic_write(cache, lambda f: np.savez(f, mean=mean, pca=np.array(json.dumps(pca))))
    return mean, pca


def check_stats_feasible(train, run: Path) -> None:
    """Image folders are fine on the fly when small; past STATS_ON_THE_FLY_MAX images the mean
    and PCA alone would take hours in one thread before step 1: say so (in every process, so
    none waits for rank 0's statistics alone)."""
    if isinstance(train, PreparedStore) or (run / "stats.npz").exists() or len(train) <= STATS_ON_THE_FLY_MAX:
        return
    hours = len(train) / 200 / 3600  # ~200 images/s decoded and resized in one thread
    root = train.source.root
    raise ReplicaError(f"data={root} holds {len(train):,} images: their mean image and PCA would take about "
                       f"{hours:.1f} h in one thread before step 1 (longer than a DDP timeout); run 'replica prepare "
                       f"{root} STORE' once (all cores, resumable) and train with data=STORE")
