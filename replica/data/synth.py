"""A deterministic synthetic ImageFolder for the demo and the tests: nothing is downloaded.

Each class is a (shape, colour) pair. With n = 2k classes (k ≤ 5 shapes and colours), classes
i and i+k share shape i, and every colour is worn by two classes of different shapes, so
neither colour alone nor shape alone tells the classes apart (the demo has 6 classes;
tests/test_synth.py checks this with a colour-histogram classifier). Position, scale, tilt,
shading, the background's colour field and the lighting vary per image, so crops, flips and
colour noise have something to do, and both colour-agnostic and colour-specific filters are
useful. Same arguments, same bytes.

Generator 2 (the demo's since session 6) draws large objects near the centre with a small tilt
and no clutter: the as-run net learns it in a few hundred steps (docs/demo.md has the search).
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ReplicaError

SHAPES = ("disk", "cross", "triangle", "square", "ring")  # the first three: the most unlike (the demo's 6 classes)
COLOURS = {
    "red": (215, 45, 40),
    "green": (45, 170, 65),
    "blue": (45, 85, 215),
    "yellow": (225, 200, 45),
    "magenta": (195, 55, 195),
}
SIZE = 256
QUALITY = 90
SPLITS = {"train": 0, "val": 1}
GENERATOR = 2  # 1: smaller objects (radius 0.17–0.30), any rotation, clutter; see docs/demo.md


def class_spec(i: int, n: int = 10) -> tuple[str, str]:
    """Class i of n → (shape, colour). With k = n/2 shapes and k colours (k ≤ 5): shape i mod k
    worn in colour (i mod k + i // k) mod k, so each shape and each colour belongs to two classes
    (6 classes: 3 shapes × 3 colours; 10: 5 × 5; beyond 10, further Latin rows of the 5 × 5)."""
    k = min(len(SHAPES), max(2, (n + 1) // 2))
    names = list(COLOURS)
    return SHAPES[i % k], names[(i % k + i // k) % k]


def class_names(n: int) -> list[str]:
    return [f"{i:02d}_{colour}_{shape}" for i, (shape, colour) in ((i, class_spec(i, n)) for i in range(n))]


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Distance to the shape's edge in units of its radius; negative inside."""
    if shape == "disk":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8
    if shape == "triangle":
        d = None
        for k in range(3):
            a = 2 * np.pi * k / 3 + np.pi / 2
            e = u * np.cos(a) + v * np.sin(a) - 0.5
            d = e if d is None else np.maximum(d, e)
        return d
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "ring":  # an outline, its hole 0.6 of its radius: nothing like a filled disk
        return np.abs(np.sqrt(u * u + v * v) - 0.8) - 0.2
    raise ValueError(shape)


def _window(cx, cy, half):
    """Integer bounds of the square of half-width ``half`` around (cx, cy), inside the image."""
    x0, x1 = max(0, int(cx - half)), min(SIZE, int(cx + half) + 2)
    y0, y1 = max(0, int(cy - half)), min(SIZE, int(cy + half) + 2)
    return y0, y1, x0, x1


def render(cls: int, rng: np.random.Generator, classes: int = 10) -> np.ndarray:
    """One (256, 256, 3) uint8 image of class ``cls`` of ``classes``. Work is done only where a mark lands."""
    shape, colour = class_spec(cls, classes)
    # background: a smooth, low-saturation colour field plus grain
    grid = rng.uniform(70, 190, (4, 4, 1)) + rng.uniform(-25, 25, (4, 4, 3))
    bg = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    img = np.asarray(bg, np.float32) + 3 * rng.standard_normal((SIZE, SIZE, 1), dtype=np.float32)
    # the object: position, scale, a tilt of up to ±17°, shading. Large and near the centre:
    # every crop holds most of it, though the largest can reach past a corner view's edge
    # (0.58 + 0.40 of the image ≈ 250 px against 224; docs/demo.md measures each view's error)
    r = rng.uniform(0.28, 0.40) * SIZE
    cx, cy = rng.uniform(0.42, 0.58) * SIZE, rng.uniform(0.42, 0.58) * SIZE
    th = rng.uniform(-0.3, 0.3)
    y0, y1, x0, x1 = _window(cx, cy, 1.5 * r + 2)  # every shape lies within 1.5 radii
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / r
    v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / r
    alpha = np.clip(0.5 - _signed_distance(shape, u, v) * r, 0, 1)
    base = np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.8, 1.1) + rng.uniform(-12, 12, 3)
    shade = 1.0 + 0.12 * (u * np.cos(th) + v * np.sin(th))[..., None]  # a soft light from one side
    patch = img[y0:y1, x0:x1]
    patch += alpha[..., None] * (base * shade - patch)
    # lighting: brightness, contrast and a colour cast over the whole image
    contrast, brightness, cast = rng.uniform(0.8, 1.15), rng.uniform(0.85, 1.15), rng.uniform(-10, 10, 3)
    img *= contrast  # (img − 128)·contrast + 128·brightness + cast, in two passes
    img += (128 * (brightness - contrast) + cast).astype(np.float32)
    return np.clip(img, 0, 255, out=img).astype(np.uint8)


def _make(args):
    out, split, cls, idx, seed, name, classes = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], cls, idx]))
    buf = io.BytesIO()
    Image.fromarray(render(cls, rng, classes)).save(buf, "JPEG", quality=QUALITY)
    path = Path(out) / split / name / f"{idx:05d}.jpg"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return 1


def synth(out, classes: int = 10, train_per_class: int = 100, val_per_class: int = 20, seed: int = 0,
          workers: int | None = None, progress: bool = True) -> dict:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg``; reuse a finished run."""
    if not 2 <= classes <= len(SHAPES) * len(COLOURS):
        raise ReplicaError(f"classes: expected 2 to {len(SHAPES) * len(COLOURS)}, got {classes}")
    for name, v in (("train-per-class", train_per_class), ("val-per-class", val_per_class)):
        if v < 0:
            raise ReplicaError(f"{name}: expected a count ≥ 0, got {v}")
    out = Path(out)
    spec = dict(generator=GENERATOR, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                seed=seed, size=SIZE, quality=QUALITY)
    marker = out / "synth.json"
    if marker.exists():
        if json.loads(marker.read_text()) == spec:
            return dict(spec, reused=True, path=str(out))
        raise ReplicaError(f"{out} holds a synthetic set made with other settings; choose a new folder")
    names = class_names(classes)
    jobs = []
    for split, per in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(names):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            jobs += [(str(out), split, c, i, seed, name, classes) for i in range(per)
                     if not (out / split / name / f"{i:05d}.jpg").exists()]  # resume
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    with tqdm(total=len(jobs), unit="img", desc="synth", disable=not progress, dynamic_ncols=True) as bar:
        if workers > 1 and len(jobs) > 64:
            with mp.get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(_make, jobs, chunksize=32):
                    bar.update(n)
        else:
            for j in jobs:
                bar.update(_make(j))
    marker.write_text(json.dumps(spec, indent=1))
    return dict(spec, reused=False, path=str(out))
