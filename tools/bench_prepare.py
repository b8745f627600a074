#!/usr/bin/env python
"""How fast ``replica prepare`` turns ImageNet-like JPEGs into a store, and what that means for
ILSVRC-2012's 1,281,167 training images.

    python tools/bench_prepare.py [--images 600] [--classes 6] [--workers 1 2]

Makes ImageNet-like JPEGs (500×375, quality 92, smooth content plus fine texture: ~100 KB each,
the size of an average ILSVRC-2012 training image), writes them both as the official archive
layout (``ILSVRC2012_img_train.tar`` holding one tar per class) and
as class folders, then times ``prepare`` on each with 1 and 2 worker processes. Prints images/s
in all and per worker, and the hours for 1.28 M images at that rate.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from replica.store import prepare  # noqa: E402

ILSVRC_TRAIN = 1_281_167


def realistic_jpeg(rng, w=500, h=375, quality=92) -> bytes:
    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    # texture as photos have it: mostly in brightness (one value for R, G, B), a little in colour
    a = np.asarray(img, dtype=np.int16) + rng.integers(-18, 19, (h, w, 1)) + rng.integers(-4, 5, (h, w, 3))
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality)
    return b.getvalue()


def add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make(root: Path, images: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + i:08d}" for i in range(classes)]
    per = images // classes
    arch, folders = root / "archives", root / "folders"
    arch.mkdir(parents=True)
    sizes = []
    with tarfile.open(arch / "ILSVRC2012_img_train.tar", "w") as outer:
        for w in wnids:
            b = io.BytesIO()
            (folders / "train" / w).mkdir(parents=True)
            with tarfile.open(fileobj=b, mode="w") as inner:
                for k in range(per):
                    data = realistic_jpeg(rng)
                    sizes.append(len(data))
                    add(inner, f"{w}_{k}.JPEG", data)
                    (folders / "train" / w / f"{w}_{k}.JPEG").write_bytes(data)
            add(outer, f"{w}.tar", b.getvalue())
    return per * classes, float(np.mean(sizes))


def timed(src, out, workers):
    t = time.perf_counter()
    m = prepare(src, out, workers=workers, progress=False)
    dt = time.perf_counter() - t
    return sum(v["used"] for v in m["splits"].values()) / dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        n, mean_bytes = make(d, args.images, args.classes)
        print(f"{n:,} JPEGs, 500×375 quality 92, mean {mean_bytes / 1000:.0f} KB; {cpus} CPUs usable")
        print(f"{'source':<34} {'workers':>7} {'img/s':>8} {'per worker':>11} {'1.28 M images':>14}")
        for label, src in (("official archive (read in the tar)", d / "archives"), ("class folders", d / "folders")):
            for w in args.workers:
                r = timed(src, d / f"st-{label[:4]}-{w}", w)
                print(f"{label:<34} {w:>7} {r:>8.0f} {r / w:>11.0f} {ILSVRC_TRAIN / r / 3600:>12.1f} h")


if __name__ == "__main__":
    raise SystemExit(main())
