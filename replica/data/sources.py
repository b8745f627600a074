"""Where images come from: a class-folder tree, a ``path label`` txt index, or CIFAR-10 batches.

Each source yields, per split, a list of items and the sorted class names. Nothing here
decodes an image; :mod:`replica.imageio` does that.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ReplicaError
from . import imagenet
from .imageio import IMAGE_EXTS, is_image_name
from .imagenet import by_class, dataset_of, warn_if_not_ilsvrc
from .tars import folder_of_tars

TRAIN_DIRS = ("train", "train_data", "training")
VAL_DIRS = ("val", "valid", "validation", "test", "test_data")
CIFAR_DIR = "cifar-10-batches-py"


@dataclass
class Split:
    """One split: ``items`` are file paths (str) or, for CIFAR, row indices into ``arrays``."""

    items: list
    labels: list[int]
    arrays: np.ndarray | None = None  # CIFAR: (N, 3, 32, 32) uint8


@dataclass
class Source:
    kind: str  # "folder", "index", "cifar10", "ilsvrc2012-archives", "ilsvrc2010-archives" or "kaggle"
    root: str
    classes: list[str]
    splits: dict[str, Split] = field(default_factory=dict)
    names: list[str] | None = None  # human-readable class names, where the source has them
    dataset: str | None = None  # "ilsvrc2012", "ilsvrc2010", or None: no paper figures apply
    notes: list[str] = field(default_factory=list)  # what was recognized, where labels came from

    def describe(self) -> str:
        parts = ", ".join(f"{name} {len(s.items):,}" for name, s in self.splits.items())
        return f"{self.kind} source {self.root}: {len(self.classes)} classes; {parts}"


def find_classes(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` (torchvision's ImageFolder rule)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _folder_split(root: Path, classes: list[str]) -> Split:
    items, labels = [], []
    index = {c: i for i, c in enumerate(classes)}
    for c in find_classes(root):
        if c not in index:
            raise ReplicaError(f"{root / c}: class {c!r} is not among the training classes {classes}")
        for dirpath, dirnames, filenames in os.walk(root / c, followlinks=True):
            dirnames.sort()
            for f in sorted(filenames):
                if is_image_name(f):
                    items.append(os.path.join(dirpath, f))
                    labels.append(index[c])
    return Split(items, labels)


def read_index(path: Path, num_classes: int | None = None) -> Split:
    """A txt index of ``PATH LABEL`` lines (the seed's generate_txt_file output).

    Relative paths are taken from the index's folder first, then from the current folder;
    Windows separators are accepted. A malformed line is an error naming file and line.
    """
    items, labels = [], []
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ReplicaError(f"{path}: not a text file ({e.reason})") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # the path may hold spaces; the label is the last field
        if len(parts) != 2:
            raise ReplicaError(f"{path}:{n}: expected 'PATH LABEL', got {line!r}")
        p, lab = parts
        try:
            label = int(lab)
        except ValueError:
            raise ReplicaError(f"{path}:{n}: label {lab!r} is not an integer") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            limit = f" (classes.txt lists {num_classes})" if num_classes is not None else ""
            raise ReplicaError(f"{path}:{n}: label {label} is out of range{limit}")
        p = p.replace("\\", "/")
        if not os.path.isabs(p):
            cand = base / p
            if not cand.exists() and Path(p).exists():
                cand = Path(p)
            p = str(cand)
        items.append(p)
        labels.append(label)
    if not items:
        raise ReplicaError(f"{path}: the index holds no 'PATH LABEL' lines")
    return Split(items, labels)


def _index_classes(path: Path, labels: list[int]) -> list[str]:
    names = path.parent / "classes.txt"
    if names.exists():
        classes = [c for c in names.read_text(encoding="utf-8").splitlines() if c.strip()]
        if max(labels) >= len(classes):
            raise ReplicaError(f"{path}: label {max(labels)} but {names} names only {len(classes)} classes")
        return classes
    return [str(i) for i in range(max(labels) + 1)]


# What CIFAR-10's python batches are made of, and all an unpickler of them may build: numpy
# arrays (reconstructed, or from a buffer under pickle protocol 5), their dtypes and scalars, and
# Python 2's byte strings (``_codecs.encode(text, "latin1")``). A pickle names any callable it
# likes; these files are downloaded, so anything else is refused, never called.
_CIFAR_ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")} | \
    {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
    {("numpy", "ndarray"), ("numpy", "dtype")}


def _latin1(text, encoding="utf-8", errors="strict"):
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"a byte string in encoding {encoding!r}, not latin1")
    return text.encode("latin1", errors)


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) in _CIFAR_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which CIFAR-10's batches never hold; "
                                     f"refused, nothing was run")


# what a damaged or foreign file raises on its way through the unpickler and the lookups after it
_NOT_CIFAR = (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError, IndexError, AttributeError)


def read_cifar_pickle(path: Path):
    """A CIFAR-10 python file (a batch or batches.meta), read with :class:`_CifarUnpickler`."""
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()


def _load_cifar_batch(path: Path):
    try:
        d = read_cifar_pickle(path)
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return data, [int(v) for v in d[b"labels"]]
    except _NOT_CIFAR as e:
        raise ReplicaError(f"{path}: not a CIFAR-10 python batch ({e})") from None


def _cifar(root: Path) -> Source:
    train = [root / f"data_batch_{i}" for i in range(1, 6) if (root / f"data_batch_{i}").exists()]
    arrays, labels = zip(*(_load_cifar_batch(p) for p in train))
    tr = Split(list(range(sum(len(a) for a in arrays))), sum(labels, []), np.concatenate(arrays))
    classes = [f"class{i}" for i in range(10)]
    meta = root / "batches.meta"
    if meta.exists():
        try:
            classes = [n.decode() for n in read_cifar_pickle(meta)[b"label_names"]]
        except _NOT_CIFAR as e:
            raise ReplicaError(f"{meta}: not CIFAR-10's batches.meta ({e})") from None
    src = Source("cifar10", str(root), classes, {"train": tr})
    if (root / "test_batch").exists():
        a, lab = _load_cifar_batch(root / "test_batch")
        src.splits["val"] = Split(list(range(len(a))), lab, a)
    return src


def find_source(src, val=None) -> Source:
    """Work out what ``src`` is and list its images.

    ``src`` may be: a folder with ``train/`` (or ``train_data/``) and ``val/`` (or ``val_data``,
    ``test/``, ``test_data/``) class-folder trees; one class-folder tree (all training); a txt
    index (``val`` may name a second one); or CIFAR-10's python batches.
    """

    src = Path(src)
    if not src.exists():
        raise ReplicaError(f"{src}: no such file or folder")
    if src.is_dir() and (year := imagenet.is_archive_root(src)):
        return _imagenet(src, f"ilsvrc{year}-archives", *imagenet.archives(src, year), year=year)
    if src.is_dir() and imagenet.is_kaggle_root(src):
        return _imagenet(src, "kaggle", *imagenet.kaggle(src), year="2012")
    if src.is_dir() and (hint := imagenet.misplaced_root(src)):
        raise ReplicaError(hint)
    if src.is_file():
        if src.suffix.lower() != ".txt":
            raise ReplicaError(f"{src}: expected a folder or a txt index of 'PATH LABEL' lines")
        tr = read_index(src)
        classes = _index_classes(src, tr.labels)
        out = Source("index", str(src), classes, {"train": tr})
        if val is not None:
            out.splits["val"] = read_index(Path(val), len(classes))
        return _nonempty(out)
    if (src / CIFAR_DIR / "data_batch_1").exists():
        return _cifar(src / CIFAR_DIR)
    if (src / "data_batch_1").exists():
        return _cifar(src)
    train_dir = next((src / d for d in TRAIN_DIRS if (src / d).is_dir()), None)
    if train_dir is not None:
        if not find_classes(train_dir) and any(train_dir.glob("*.tar")):  # one tar per class, not unpacked
            return _class_tars(src, train_dir, val)
        classes = find_classes(train_dir)
        out = Source("folder", str(src), classes, {"train": _folder_split(train_dir, classes)})
        val_dir = Path(val) if val else next((src / d for d in VAL_DIRS if (src / d).is_dir()), None)
        if val_dir is not None:
            out.splits["val"] = _val_split(val_dir, classes)
        return _nonempty(out)
    classes = find_classes(src)
    if classes:
        out = Source("folder", str(src), classes, {"train": _folder_split(src, classes)})
        if val:
            out.splits["val"] = _val_split(Path(val), classes)
        return _nonempty(out)
    if (src / "train.txt").exists():
        other = next((src / n for n in ("val.txt", "test.txt") if (src / n).exists()), None)
        return find_source(src / "train.txt", val or other)
    flat = _flat_images(src)
    if flat:  # the labels are what is missing, not the images
        raise ReplicaError(f"{src}: {flat:,} image files but no labels: put each class's images in a folder named "
                           f"after the class ({src}/<class>/<image>), or give a 'path label' txt index")
    raise ReplicaError(f"{src}: found no images: expected class folders, train/ and val/ folders, "
                       "a txt index or CIFAR-10 batches")


def _val_split(val: Path, classes: list[str]) -> Split:
    """A held-out split for training classes from class folders: a folder tree, or a txt index
    whose labels index the training classes (sorted folder names)."""
    if val.is_file():
        if val.suffix.lower() != ".txt":
            raise ReplicaError(f"{val}: expected a folder of class folders or a txt index of 'PATH LABEL' lines")
        return read_index(val, len(classes))
    if not val.is_dir():
        raise ReplicaError(f"{val}: no such file or folder")
    return _labelled(_folder_split(val, classes), val)


def _class_tars(src: Path, train_dir: Path, val) -> Source:
    """A train/ of per-class tars (``<class>.tar``), read in place."""

    classes, items, labels = by_class(folder_of_tars(train_dir))
    out = Source("folder", str(src), classes, {"train": Split(items, labels)},
                 notes=[f"train: {len(classes):,} per-class tars in {train_dir.name}/, read in place"])
    val_dir = Path(val) if val else next((src / d for d in VAL_DIRS if (src / d).is_dir()), None)
    if val_dir is not None:
        out.splits["val"] = _val_split(val_dir, classes)
    return _nonempty(out)


def _imagenet(src: Path, kind: str, classes, names, splits, notes, year: str) -> Source:

    out = Source(kind, str(src), classes, {k: Split(list(i), list(l)) for k, (i, l) in splits.items()},
                 names=list(names), dataset=dataset_of(kind, year, classes), notes=notes)
    for k, s in out.splits.items():
        if k != "train" and not s.items:
            raise ReplicaError(f"{src}: the {k} split has no image of the training classes")
    return _nonempty(out)


def _flat_images(folder: Path) -> int:
    """Image files directly in ``folder``, not in class folders: images without labels."""
    return sum(1 for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))


def _labelled(split: Split, folder: Path) -> Split:
    """A held-out folder that yields no labelled image is an error, not an empty split (a flat
    folder of JPEGs, as ILSVRC-2012's val tar unpacks, would otherwise score 0.00% error)."""
    if split.items:
        return split
    flat = _flat_images(folder)
    found = f"{flat:,} image files directly in it but no class folders" if flat else "no image files"
    raise ReplicaError(f"{folder}: this split has no labelled image ({found}); expected one folder per "
                       f"class holding its images ({folder}/<class>/<image>), named as the training classes "
                       f"(ILSVRC-2012's val images can be sorted so with the devkit's labels, e.g. valprep.sh)")


def _nonempty(src: Source) -> Source:

    if not src.splits["train"].items:
        raise ReplicaError(f"{src.root}: the training split holds no image files "
                           f"(extensions: {', '.join(sorted(IMAGE_EXTS))})")
    warn_if_not_ilsvrc(src.classes, src.root)
    return src
