"""ImageNet as users download it: the official ILSVRC-2012/2010 archives (read inside the tars,
nothing unpacked), the same files unpacked, and Kaggle's ImageNet Object Localization layout.

Classes are the sorted WordNet IDs (WNIDs), as ``torchvision.datasets.ImageNet`` orders them, so
class indices agree with other models. The devkit numbers classes by ``ILSVRC2012_ID`` (or
``ILSVRC2010_ID``), which is not that order: validation and test labels are mapped through the
devkit's ``meta.mat`` (its leaf synsets, ``num_children == 0``). Human-readable names come from
``meta.mat``'s ``words`` or Kaggle's ``LOC_synset_mapping.txt``.

The archives' members are listed by :mod:`replica.data.tars` (an image there is a
:class:`~replica.data.imageio.Member`: a byte range of the archive, read with one seek).
"""
from __future__ import annotations

import csv
import io
import logging
import re
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import ReplicaError
from .imageio import Member, is_image_name
from .tars import folder_of_tars, nested_tar_classes, tar_images

log = logging.getLogger("replica")

EVAL_NAME = re.compile(r"ILSVRC(2010|2012)_(val|test)_(\d{8})\.JPEG$", re.IGNORECASE)
WNID = re.compile(r"n\d{8}$")


# ----------------------------------------------------------------------------------------------
# Class folders


def by_class(per_class: dict) -> tuple[list, list, list]:
    """(sorted class names, items, labels) of a class → items mapping: labels index the sorted names."""
    classes = sorted(per_class)
    items, labels = [], []
    for i, c in enumerate(classes):
        items += per_class[c]
        labels += [i] * len(per_class[c])
    return classes, items, labels


def class_folders(folder: Path) -> dict[str, list[str]]:
    """Class name → its image files, for a folder of one sub-folder per class (WNID)."""
    return {d.name: sorted(str(p) for p in d.rglob("*") if p.is_file() and is_image_name(p.name))
            for d in sorted(folder.iterdir()) if d.is_dir()}


# ----------------------------------------------------------------------------------------------
# The devkit


class Devkit(NamedTuple):
    year: str  # "2012" or "2010"
    id_to_wnid: dict  # ILSVRC20xx_ID → WNID, leaf synsets only
    names: dict  # WNID → words
    ground_truth: dict  # split ("val", "test") → list of IDs, one per image in file order
    where: str


def _meta_mat(data: bytes, where: str):
    try:
        import scipy.io
    except ImportError:
        raise ReplicaError("reading the ImageNet devkit's meta.mat needs scipy: pip install scipy") from None
    try:
        syn = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        id_field = next(n for n in syn.dtype.names if n.endswith("_ID"))
        leaf = np.asarray([int(c) == 0 for c in syn["num_children"]])
        ids = [int(i) for i in syn[id_field][leaf]]
        wnids = [str(w) for w in syn["WNID"][leaf]]
        words = [str(w) for w in syn["words"][leaf]]
    except (KeyError, StopIteration, ValueError, TypeError) as e:
        raise ReplicaError(f"{where}: not an ILSVRC devkit meta.mat ({type(e).__name__}: {e})") from None
    return dict(zip(ids, wnids)), dict(zip(wnids, words))


def _gt(text: str, where: str) -> list[int]:
    try:
        return [int(line) for line in text.split()]
    except ValueError:
        raise ReplicaError(f"{where}: expected one class ID per line") from None


def find_devkit(root: Path, year: str) -> Devkit | None:
    """The devkit in ``root``: its .tar.gz as downloaded, or that archive unpacked; ground-truth
    files for val and test are also taken from ``root`` itself (2010's test labels come apart)."""
    files: dict[str, bytes] = {}
    where = None
    packed = [p for pat in (f"ILSVRC{year}_devkit*.tar.gz", f"ILSVRC{year}_devkit*.tgz", "devkit*.tar.gz")
              for p in sorted(root.glob(pat))]  # 2010's also travels as devkit-1.0.tar.gz
    for p in packed:
        where = str(p)
        try:
            with tarfile.open(p, "r:gz") as tf:
                for ti in tf:
                    base = Path(ti.name).name
                    if ti.isfile() and (base == "meta.mat" or base.endswith("_ground_truth.txt")):
                        files[base] = tf.extractfile(ti).read()
        except (tarfile.ReadError, EOFError, OSError) as e:
            raise ReplicaError(f"{p}: truncated or damaged devkit archive ({e}); download it again") from None
        break
    # an unpacked devkit folder too, even beside its .tar.gz: a ground-truth file released later
    # (ILSVRC-2010's test labels) is often dropped into the folder
    for d in sorted(root.glob(f"ILSVRC{year}_devkit*")) + sorted(root.glob("devkit*")):
        if d.is_dir():
            for p in d.rglob("*"):
                if p.is_file() and (p.name == "meta.mat" or p.name.endswith("_ground_truth.txt")):
                    files.setdefault(p.name, p.read_bytes())
            where = where or str(d)
            break
    for p in root.glob(f"ILSVRC{year}_*_ground_truth.txt"):  # beside the archives
        files.setdefault(p.name, p.read_bytes())
        where = where or str(root)
    if "meta.mat" not in files:
        return None
    id_to_wnid, names = _meta_mat(files["meta.mat"], f"{where}: meta.mat")
    gt = {}
    for split in ("val", "test"):
        key = next((k for k in files if k == f"ILSVRC{year}_{split}idation_ground_truth.txt" or
                    k == f"ILSVRC{year}_{split}_ground_truth.txt"), None)
        if key:
            gt[split] = _gt(files[key].decode(), f"{where}: {key}")
    return Devkit(year, id_to_wnid, names, gt, where)


# ----------------------------------------------------------------------------------------------
# Layouts


def is_archive_root(root: Path) -> str | None:
    """'2012' or '2010' if ``root`` holds ILSVRC archives (packed or unpacked), else None."""
    for year in ("2012", "2010"):
        if any(root.glob(f"ILSVRC{year}_im*_train*")) or any(root.glob(f"ILSVRC{year}_im*_val*")):
            return year
    return None


def is_kaggle_root(root: Path) -> bool:
    return (root / "LOC_synset_mapping.txt").exists() or (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir()


def misplaced_root(root: Path) -> str | None:
    """Where to point instead, when ``root`` is inside or just above a layout this module reads."""
    for up in (root.parent, root.parent.parent, root.parent.parent.parent):
        if up != root and (up / "LOC_synset_mapping.txt").exists() and root.resolve() != up.resolve():
            if "ILSVRC" in root.parts or "CLS-LOC" in root.parts or root.name in ("Data", "train", "val"):
                return f"{root} is inside the Kaggle ImageNet layout: point at {up} (it holds LOC_synset_mapping.txt)"
    kids = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")] if root.is_dir() else []
    if 1 <= len(kids) <= 3:
        for k in kids:
            if is_kaggle_root(k) or is_archive_root(k):
                return f"{root} holds an ImageNet layout one level down: point at {k}"
    return None


def _eval_number(name: str) -> int | None:
    m = EVAL_NAME.search(Path(name).name)
    return int(m.group(3)) if m else None


def _labelled_eval(images: list, devkit: Devkit, split: str, classes: list[str], where: str):
    """Items and labels of a flat val/test set, in image-number order, labelled from the devkit."""
    numbered = sorted(((n, it) for it in images if (n := _eval_number(it.name if isinstance(it, Member) else it))
                       is not None), key=lambda t: t[0])
    gt = devkit.ground_truth.get(split)
    if gt is None:
        raise ReplicaError(f"{where}: {len(numbered):,} {split} images but no ILSVRC{devkit.year}_{split}"
                           f"{'idation' if split == 'val' else ''}_ground_truth.txt in {devkit.where} or beside "
                           f"the archives")
    if len(gt) != len(numbered):
        raise ReplicaError(f"{devkit.where}: the {split} ground truth has {len(gt):,} lines but {where} holds "
                           f"{len(numbered):,} {split} images")
    index = {w: i for i, w in enumerate(classes)}
    items, labels = [], []
    for n, it in numbered:
        wnid = devkit.id_to_wnid.get(gt[n - 1])
        if wnid is None:
            raise ReplicaError(f"{devkit.where}: {split} image {n} has class ID {gt[n - 1]}, which meta.mat does "
                               f"not list as a leaf synset")
        if wnid in index:  # a training subset: images of other classes are left out
            items.append(it)
            labels.append(index[wnid])
    return items, labels


def archives(root: Path, year: str):
    """(classes, names, {split: (items, labels)}, notes) of the official archives in ``root``."""
    notes = []
    train_tar = next(iter(sorted(root.glob(f"ILSVRC{year}_im*_train*.tar"))), None)
    train_dir = next((p for p in sorted(root.glob(f"ILSVRC{year}_im*_train*")) if p.is_dir()), None)
    if train_tar is not None:
        per_class = nested_tar_classes(train_tar)
        notes.append(f"train: {train_tar.name} read in place ({len(per_class):,} inner tars)")
    elif train_dir is not None:
        per_class = folder_of_tars(train_dir)
        if per_class:
            notes.append(f"train: the per-class tars in {train_dir.name}/")
        else:
            per_class = class_folders(train_dir)
            notes.append(f"train: the class folders in {train_dir.name}/")
    else:
        raise ReplicaError(f"{root}: ILSVRC{year} files but no training archive (ILSVRC{year}_img_train.tar, or "
                           f"it unpacked as ILSVRC{year}_img_train/)")
    classes, items, labels = by_class(per_class)
    splits = {"train": (items, labels)}
    devkit = find_devkit(root, year)
    names = {}
    if devkit is not None:
        names = devkit.names
        notes.append(f"labels of val/test: {Path(devkit.where).name} (meta.mat IDs → WNIDs; classes in sorted "
                     f"WNID order)")
    for split in ("val", "test"):
        packed = next(iter(sorted(root.glob(f"ILSVRC{year}_im*_{split}*.tar"))), None)
        unpacked = next((p for p in sorted(root.glob(f"ILSVRC{year}_im*_{split}*")) if p.is_dir()), None)
        if packed is None and unpacked is None:
            continue
        if devkit is not None and split == "test" and split not in devkit.ground_truth:  # before any scan
            notes.append(f"test: {(packed or unpacked).name} left out (no ILSVRC{year}_test_ground_truth.txt)")
            continue
        if packed is not None:
            imgs = tar_images(packed)
            where = packed.name
        else:
            imgs = sorted(str(p) for p in unpacked.rglob("*") if p.is_file())
            where = f"{unpacked.name}/"
        if devkit is None:
            raise ReplicaError(f"{root / where}: {split} images with no labels: their labels are in the devkit "
                               f"(ILSVRC{year}_devkit_t12.tar.gz for 2012): put it in {root}")
        if split == "test" and split not in devkit.ground_truth:
            notes.append(f"test: {where} left out (no ILSVRC{year}_test_ground_truth.txt)")
            continue
        splits[split] = _labelled_eval(imgs, devkit, split, classes, str(root / where))
        notes.append(f"{split}: {where} ({len(splits[split][0]):,} images)")
    return classes, [names.get(w, w) for w in classes], splits, notes


def kaggle(root: Path):
    """(classes, names, {split: (items, labels)}, notes) of the Kaggle ImageNet Object Localization layout."""
    mapping = root / "LOC_synset_mapping.txt"
    if not mapping.exists():
        raise ReplicaError(f"{root}: Kaggle layout without LOC_synset_mapping.txt (WNID and names, one line each)")
    names = {}
    for line in mapping.read_text(encoding="utf-8").splitlines():
        if line.strip():
            w, _, words = line.strip().partition(" ")
            names[w] = words
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    train_dir = data / "train"
    if not train_dir.is_dir():
        raise ReplicaError(f"{root}: no {train_dir.relative_to(root)}/ (one folder per WNID)")
    classes, items, labels = by_class(class_folders(train_dir))
    index = {w: i for i, w in enumerate(classes)}
    splits = {"train": (items, labels)}
    notes = [f"train: {train_dir.relative_to(root)}/ ({len(classes):,} WNID folders)"]
    sol = root / "LOC_val_solution.csv"
    val_dir = data / "val"
    sorted_val = [d for d in val_dir.iterdir() if d.is_dir() and d.name in index] if val_dir.is_dir() else []
    if sorted_val:  # val already moved into WNID folders (the common valprep.sh): the folders are the labels
        vi, vl = [], []
        for d in sorted(sorted_val):
            for p in sorted(d.iterdir()):
                if p.is_file() and is_image_name(p.name):
                    vi.append(str(p))
                    vl.append(index[d.name])
        splits["val"] = (vi, vl)
        notes.append(f"val: {val_dir.relative_to(root)}/ sorted into {len(sorted_val):,} WNID folders (as valprep.sh "
                     f"leaves it): labels from the folders")
    elif val_dir.is_dir():
        if not sol.exists():
            raise ReplicaError(f"{val_dir}: validation images with no labels: LOC_val_solution.csv is missing "
                               f"from {root}")
        present = {p.stem: str(p) for p in val_dir.iterdir() if p.is_file() and is_image_name(p.name)}
        vi, vl, missing = [], [], []
        with open(sol, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    image, first = row["ImageId"], row["PredictionString"].split()[0]
                except (KeyError, IndexError, AttributeError):
                    raise ReplicaError(f"{sol}: expected the columns ImageId,PredictionString") from None
                if image not in present:
                    missing.append(image)
                    continue
                if first in index:
                    vi.append(present[image])
                    vl.append(index[first])
        if missing:
            raise ReplicaError(f"{sol} names {len(missing):,} images that are not in {val_dir} (first: "
                               f"{', '.join(missing[:3])})")
        order = np.argsort(vi, kind="stable")
        splits["val"] = ([vi[i] for i in order], [vl[i] for i in order])
        notes.append(f"val: {val_dir.relative_to(root)}/ labelled by LOC_val_solution.csv (first label of each "
                     f"PredictionString)")
    if (data / "test").is_dir():
        notes.append("test: left out (Kaggle's test images have no labels)")
    return classes, [names.get(w, w) for w in classes], splits, notes


def warn_if_not_ilsvrc(classes: list[str], where) -> None:
    """WordNet-ID classes that are not ILSVRC's 1,000: a subset, legitimate, but say so."""
    if classes and all(WNID.match(c) for c in classes) and len(classes) != 1000:
        log.warning("%s: %d classes named by WordNet IDs, not ILSVRC's 1,000: a subset (the paper's figures are "
                    "for all 1,000)", where, len(classes))


def dataset_of(kind: str, year: str | None, classes: list[str]) -> str | None:
    """Which benchmark a source is: 'ilsvrc2012', 'ilsvrc2010', or None (no paper figures apply)."""
    if year and len(classes) == 1000:
        return f"ilsvrc{year}"
    return None
