"""ImageNet as users have it, in miniature: the official archives (packed and unpacked), the
Kaggle layout, ILSVRC-2010, and the mistakes people make with them.

Every image is one flat colour that encodes its true class (20 + 60·index in sorted-WNID
order), so after ``prepare`` each stored row's pixels say which label it must carry: labels are
checked image by image. The fake devkit numbers classes in an order that is not the sorted one.
"""
import io
import os
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from replica.cli import main
from replica.errors import ReplicaError
from replica.data.sources import find_source
from replica.data.store import PreparedStore
from replica.data.writer import prepare
from runs_helpers import NARROW

WNIDS = ["n01440764", "n01443537", "n02102040"]  # sorted: indices 0, 1, 2
IDS = {"n02102040": 1, "n01440764": 2, "n01443537": 3}  # the devkit's own numbering: not sorted
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n02102040": "English springer, English springer spaniel"}


def jpeg(label: int, fmt="JPEG", mode="RGB", size=(50, 40)) -> bytes:
    v = 20 + 60 * label
    img = Image.new("RGB", size, (v, v, v)).convert(mode)
    b = io.BytesIO()
    img.save(b, fmt, quality=95)
    return b.getvalue()


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def meta_mat(year="2012") -> bytes:
    import scipy.io

    dt = [(f"ILSVRC{year}_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
          ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(IDS[w], w, WORDS[w], "gloss", 0, np.zeros((0,)), 0, 2) for w in WNIDS]
    rows.append((4, "n00000001", "fish", "gloss", 2, np.array([2, 3]), 1, 0))  # an inner synset: not a class
    a = np.zeros((len(rows),), dtype=dt)
    for i, r in enumerate(rows):
        a[i] = r
    b = io.BytesIO()
    scipy.io.savemat(b, {"synsets": a})
    return b.getvalue()


VAL_TRUE = [2, 0, 1, 1, 0, 2]  # val image k's true class (sorted index)


def gt_lines(truth) -> bytes:
    return "".join(f"{IDS[WNIDS[t]]}\n" for t in truth).encode()


def make_2012(root, packed=True, extra_train=None):
    """ILSVRC2012_img_train.tar (inner tars), ILSVRC2012_img_val.tar, the devkit .tar.gz."""
    root.mkdir(parents=True, exist_ok=True)
    inner = {}
    for i, w in enumerate(WNIDS):
        b = io.BytesIO()
        with tarfile.open(fileobj=b, mode="w") as t:
            for k in range(2):
                add(t, f"{w}_{k}.JPEG", jpeg(i))
            for name, data in (extra_train or {}).get(w, []):
                add(t, name, data)
        inner[w] = b.getvalue()
    if packed:
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as t:
            for w, data in inner.items():
                add(t, f"{w}.tar", data)
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
            for k, c in enumerate(VAL_TRUE, 1):
                add(t, f"ILSVRC2012_val_{k:08d}.JPEG", jpeg(c))
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
            add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
            add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt_lines(VAL_TRUE))
    else:  # the outer tar unpacked once (inner tars left), val unpacked, devkit unpacked
        (root / "ILSVRC2012_img_train").mkdir()
        for w, data in inner.items():
            (root / "ILSVRC2012_img_train" / f"{w}.tar").write_bytes(data)
        (root / "ILSVRC2012_img_val").mkdir()
        for k, c in enumerate(VAL_TRUE, 1):
            (root / "ILSVRC2012_img_val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg(c))
        d = root / "ILSVRC2012_devkit_t12" / "data"
        d.mkdir(parents=True)
        (d / "meta.mat").write_bytes(meta_mat())
        (d / "ILSVRC2012_validation_ground_truth.txt").write_bytes(gt_lines(VAL_TRUE))
    return root


def check_labels(store, split, n):
    """Each stored row's flat colour names its class: the label must be that class."""
    st = PreparedStore(store, split)
    assert len(st) == n
    u8, labels, bad = st.batch(np.arange(len(st)))
    assert not bad
    seen = np.round((u8.reshape(len(st), -1).mean(1) - 20) / 60).astype(int)
    assert seen.tolist() == labels.tolist()
    return labels.tolist()


@pytest.mark.parametrize("packed,in_memory", [(True, 1 << 20), (True, 0), (False, 1 << 20)])
def test_official_2012_archives_labels_image_by_image(tmp_path, packed, in_memory, caplog, monkeypatch):
    """Packed (inner tars small enough to read whole, or walked in place as real 100 MB ones are)
    and unpacked once."""
    import logging

    import replica.data.tars as tars

    monkeypatch.setattr(tars, "INNER_IN_MEMORY", in_memory)
    root = make_2012(tmp_path / "in", packed=packed)
    with caplog.at_level(logging.INFO, logger="replica"):
        m = prepare(root, tmp_path / "st", workers=1, progress=False)
    assert m["kind"] == "ilsvrc2012-archives" and m["classes"] == WNIDS
    assert m["names"][0] == "tench, Tinca tinca" and m["dataset"] is None  # 3 classes, not ILSVRC's 1,000
    assert check_labels(tmp_path / "st", "train", 6) == [0, 0, 1, 1, 2, 2]
    assert check_labels(tmp_path / "st", "val", 6) == VAL_TRUE  # through meta.mat's IDs, not their order
    text = caplog.text
    assert "labels of val/test" in text and "meta.mat IDs" in text
    assert "not ILSVRC's 1,000" in text


def test_predict_names_the_class(tmp_path, capsys):
    root = make_2012(tmp_path / "in")
    prepare(root, tmp_path / "st", workers=1, progress=False)
    assert main(["train", "configs/alexnet-2gpu.yaml", f"data={tmp_path / 'st'}", "batch_size=3", "epochs=1",
                 "steps_per_epoch=1", "workers=0", "devices=cpu", "init=caffe", f"width={NARROW}",
                 "--out", str(tmp_path / "run")]) == 0
    img = tmp_path / "q.jpg"
    img.write_bytes(jpeg(0))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), str(img), "--topk", "3", "--devices", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "tench (n01440764) " in out and "goldfish (n01443537) " in out


def test_kaggle_layout(tmp_path, capsys):
    root = tmp_path / "kaggle"
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for i, w in enumerate(WNIDS):
        (data / "train" / w).mkdir(parents=True)
        for k in range(2):
            (data / "train" / w / f"{w}_{k}.JPEG").write_bytes(jpeg(i))
    (data / "val").mkdir()
    (data / "test").mkdir()
    (data / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(jpeg(0))
    rows = ["ImageId,PredictionString"]
    for k, c in enumerate(VAL_TRUE, 1):
        (data / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg(c))
        rows.append(f"ILSVRC2012_val_{k:08d},{WNIDS[c]} 1 2 30 40 {WNIDS[c]} 3 4 20 30")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in WNIDS))
    src = find_source(root)
    assert src.kind == "kaggle" and src.classes == WNIDS and "test: left out" in " ".join(src.notes)
    prepare(root, tmp_path / "st", workers=1, progress=False)
    assert check_labels(tmp_path / "st", "val", 6) == VAL_TRUE
    assert json.loads((tmp_path / "st" / "meta.json").read_text())["names"][2].startswith("English springer")
    # pointed one level too low, or too high: say where to point
    assert main(["prepare", str(root / "ILSVRC"), str(tmp_path / "x")]) == 2
    assert f"point at {root}" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path), str(tmp_path / "y")]) == 2
    assert f"one level down: point at {root}" in capsys.readouterr().err
    # a CSV naming an image that is not there
    (data / "val" / "ILSVRC2012_val_00000003.JPEG").unlink()
    with pytest.raises(ReplicaError, match="LOC_val_solution.csv names 1 images that are not in .*ILSVRC2012_val_00000003"):
        find_source(root)


def make_2010_images(root, test_true):
    """ILSVRC2010_images_train.tar (one inner tar per class) and ILSVRC2010_images_test.tar."""
    root.mkdir(parents=True)
    with tarfile.open(root / "ILSVRC2010_images_train.tar", "w") as t:
        for i, w in enumerate(WNIDS):
            b = io.BytesIO()
            with tarfile.open(fileobj=b, mode="w") as it:
                add(it, f"{w}_0.JPEG", jpeg(i))
            add(t, f"{w}.tar", b.getvalue())
    with tarfile.open(root / "ILSVRC2010_images_test.tar", "w") as t:
        for k, c in enumerate(test_true, 1):
            add(t, f"test/ILSVRC2010_test_{k:08d}.JPEG", jpeg(c))
    return root


def test_ilsvrc2010_archives_with_test_ground_truth(tmp_path):
    test_true = [1, 2, 0]
    root = make_2010_images(tmp_path / "in", test_true)
    with tarfile.open(root / "ILSVRC2010_images_val.tar", "w") as t:
        for k, c in enumerate(VAL_TRUE, 1):
            add(t, f"val/ILSVRC2010_val_{k:08d}.JPEG", jpeg(c))
    with tarfile.open(root / "ILSVRC2010_devkit-1.0.tar.gz", "w:gz") as t:
        add(t, "devkit-1.0/data/meta.mat", meta_mat("2010"))
        add(t, "devkit-1.0/data/ILSVRC2010_validation_ground_truth.txt", gt_lines(VAL_TRUE))
    (root / "ILSVRC2010_test_ground_truth.txt").write_bytes(gt_lines(test_true))  # a separate download
    m = prepare(root, tmp_path / "st", workers=1, progress=False)
    assert m["kind"] == "ilsvrc2010-archives" and sorted(m["splits"]) == ["test", "train", "val"]
    assert check_labels(tmp_path / "st", "test", 3) == test_true
    assert check_labels(tmp_path / "st", "val", 6) == VAL_TRUE
    from replica.data.imagenet import dataset_of

    assert dataset_of("ilsvrc2010-archives", "2010", [f"n{i:08d}" for i in range(1000)]) == "ilsvrc2010"
    assert dataset_of("ilsvrc2010-archives", "2010", WNIDS) is None  # a subset: no paper figures apply


def test_archive_mistakes_get_one_line_errors(tmp_path, capsys):
    root = make_2012(tmp_path / "in")
    # the ground truth does not match the val images
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as t:
        add(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        add(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt_lines(VAL_TRUE[:5]))
    assert main(["prepare", str(root), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "the val ground truth has 5 lines but" in err and "holds 6 val images" in err and "Traceback" not in err
    # no devkit at all
    (root / "ILSVRC2012_devkit_t12.tar.gz").unlink()
    assert main(["prepare", str(root), str(tmp_path / "b")]) == 2
    assert "val images with no labels: their labels are in the devkit" in capsys.readouterr().err
    # a truncated archive
    make_2012(tmp_path / "in2")
    val = tmp_path / "in2" / "ILSVRC2012_img_val.tar"
    data = val.read_bytes()
    val.write_bytes(data[: len(data) // 2])
    assert main(["prepare", str(tmp_path / "in2"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "ILSVRC2012_img_val.tar: truncated" in err and "Traceback" not in err


def test_train_folder_of_class_tars_and_a_txt_val(tmp_path):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for i, w in enumerate(WNIDS):
        with tarfile.open(src / "train" / f"{w}.tar", "w") as t:
            add(t, f"{w}_0.JPEG", jpeg(i))
    s = find_source(src)
    assert s.classes == WNIDS and len(s.splits["train"].items) == 3  # read, not "holds no image files"
    (tmp_path / "v").mkdir()
    lines = []
    for k, c in enumerate([2, 0]):
        p = tmp_path / "v" / f"{k}.jpg"
        p.write_bytes(jpeg(c))
        lines.append(f"{p} {c}")
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    prepare(src, tmp_path / "st", val=tmp_path / "val.txt", workers=1, progress=False)  # a traceback before
    assert check_labels(tmp_path / "st", "val", 2) == [2, 0]


def test_bad_images_inside_archives_are_skipped_or_converted(tmp_path):
    extra = {WNIDS[0]: [("trunc.JPEG", jpeg(0)[:200]), ("empty.JPEG", b""),
                        ("cmyk.JPEG", jpeg(0, mode="CMYK")), ("grey.JPEG", jpeg(0, mode="L")),
                        ("png.JPEG", jpeg(0, fmt="PNG"))]}  # the real train set has a PNG named .JPEG
    root = make_2012(tmp_path / "in", extra_train=extra)
    m = prepare(root, tmp_path / "st", workers=1, progress=False)
    assert m["skipped"] == 2 and m["splits"]["train"] == dict(total=11, used=9)
    skipped = (tmp_path / "st" / "skipped.tsv").read_text()
    assert "ILSVRC2012_img_train.tar:n01440764.tar/trunc.JPEG" in skipped and "empty.JPEG" in skipped
    check_labels(tmp_path / "st", "train", 9)


def test_kaggle_val_sorted_into_class_folders(tmp_path):
    """valprep.sh moves Kaggle's val images into val/<WNID>/: the folders are then the labels."""
    root = tmp_path / "kaggle"
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    for i, w in enumerate(WNIDS):
        (data / "train" / w).mkdir(parents=True)
        (data / "train" / w / f"{w}_0.JPEG").write_bytes(jpeg(i))
    for k, c in enumerate(VAL_TRUE, 1):
        d = data / "val" / WNIDS[c]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg(c))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {WORDS[w]}\n" for w in WNIDS))
    src = find_source(root)
    assert "sorted into" in " ".join(src.notes)
    prepare(root, tmp_path / "st", workers=1, progress=False)
    assert sorted(check_labels(tmp_path / "st", "val", 6)) == sorted(VAL_TRUE)


def test_archive_headers_are_scanned_once_then_read_from_the_index(tmp_path, monkeypatch):
    """The second open of the same archives reads their member index from the cache (counted,
    not timed); a changed archive (its size or mtime) is scanned again; an unlabelled test tar is
    dropped without a scan."""
    import replica.data.tars as tars

    monkeypatch.setenv("REPLICA_CACHE", str(tmp_path / "cache"))
    root = make_2012(tmp_path / "in")
    with tarfile.open(root / "ILSVRC2012_img_test.tar", "w") as t:  # released without labels
        add(t, "ILSVRC2012_test_00000001.JPEG", jpeg(0))
    scanned = []
    real = tars._tar_members
    monkeypatch.setattr(tars, "_tar_members", lambda path, *a, **k: scanned.append(Path(str(path)).name) or
                        real(path, *a, **k))
    first = find_source(root)
    assert "ILSVRC2012_img_test.tar" not in scanned and "test: ILSVRC2012_img_test.tar left out" in " ".join(
        first.notes)
    assert {"ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"} <= set(scanned)
    scanned.clear()
    second = find_source(root)
    assert scanned == []  # every header from the index
    assert {k: (v.items, v.labels) for k, v in second.splits.items()} == \
        {k: (v.items, v.labels) for k, v in first.splits.items()}
    os.utime(root / "ILSVRC2012_img_val.tar", ns=(1, 1))  # the archive changed: its index no longer applies
    find_source(root)
    assert scanned == ["ILSVRC2012_img_val.tar"]
    prepare(root, tmp_path / "st", workers=1, progress=False)
    assert check_labels(tmp_path / "st", "val", 6) == VAL_TRUE


def test_a_ground_truth_file_in_the_unpacked_devkit_counts_beside_its_archive(tmp_path):
    """ILSVRC-2010's test labels, added later into the unpacked devkit folder while the .tar.gz
    is still there, are read."""
    root = make_2010_images(tmp_path / "in", [2, 0, 1])
    with tarfile.open(root / "ILSVRC2010_devkit-1.0.tar.gz", "w:gz") as t:
        add(t, "devkit-1.0/data/meta.mat", meta_mat("2010"))
    (root / "devkit-1.0" / "data").mkdir(parents=True)
    (root / "devkit-1.0" / "data" / "ILSVRC2010_test_ground_truth.txt").write_bytes(gt_lines([2, 0, 1]))
    src = find_source(root)
    assert "test" in src.splits and src.splits["test"].labels == [2, 0, 1]


def test_layouts_and_sources_import_one_way():
    """replica.data.sources reads the ImageNet layouts; replica.data.imagenet never imports it."""
    import ast
    import replica.data.imagenet as im

    tree = ast.parse(Path(im.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "sources" not in imported and "replica.sources" not in imported


def test_adding_the_2010_test_labels_later_prepares_the_test_split_alone(tmp_path, monkeypatch):
    """ILSVRC-2010's test ground truth came after the images: added to a prepared store's source,
    it prepares the test split alone; the training split's files and statistics stay as they were,
    and the store equals one prepared with the labels from the start."""
    import replica.data.chunks as chunks

    test_true = [2, 0, 1]
    root = make_2010_images(tmp_path / "in", test_true)
    with tarfile.open(root / "ILSVRC2010_devkit-1.0.tar.gz", "w:gz") as t:
        add(t, "devkit-1.0/data/meta.mat", meta_mat("2010"))
    st = tmp_path / "st"
    m = prepare(root, st, workers=1, progress=False)
    assert sorted(m["splits"]) == ["train"]  # no test labels yet: the test tar is left out
    before = {p: (st / p).stat().st_mtime_ns for p in ("train/images.u8", "train/labels.npy", "mean.npy", "pca.json")}
    (root / "ILSVRC2010_test_ground_truth.txt").write_bytes(gt_lines(test_true))  # downloaded later
    prepared = []
    real = chunks._worker_chunk
    monkeypatch.setattr(chunks, "_worker_chunk", lambda task: prepared.append(task[0]) or real(task))
    m = prepare(root, st, workers=1, progress=False)
    assert sorted(m["splits"]) == ["test", "train"] and set(prepared) == {"test"}
    assert {p: (st / p).stat().st_mtime_ns for p in before} == before  # train untouched
    assert check_labels(st, "test", 3) == test_true
    monkeypatch.undo()
    fresh = prepare(root, tmp_path / "fresh", workers=1, progress=False)
    assert fresh["splits"] == m["splits"]
    for split in ("train", "test"):
        a, b = PreparedStore(st, split), PreparedStore(tmp_path / "fresh", split)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.load(st / "mean.npy"), np.load(tmp_path / "fresh" / "mean.npy"))
    # a changed training split (one more image) is another store, as before
    with tarfile.open(root / "ILSVRC2010_images_train.tar", "w") as t:
        for i, w in enumerate(WNIDS):
            b = io.BytesIO()
            with tarfile.open(fileobj=b, mode="w") as it:
                for k in range(2 if i == 0 else 1):
                    add(it, f"{w}_{k}.JPEG", jpeg(i))
            add(t, f"{w}.tar", b.getvalue())
    with pytest.raises(ReplicaError, match="holds a store prepared from other inputs"):
        prepare(root, st, workers=1, progress=False)
