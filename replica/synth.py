"""A deterministic synthetic ImageFolder for the demo and the tests: nothing is downloaded.

Each class is a (shape, colour) pair. With 10 classes, classes i and i+5 share shape i, and
every colour is worn by two classes of different shapes, so neither colour alone nor shape
alone tells the classes apart (tests/test_synth.py checks this with a colour-histogram
classifier). Position, scale, rotation, background texture, clutter and lighting vary per
image, so crops, flips and colour noise have something to do, and both colour-agnostic and
colour-specific filters are useful. Same arguments, same bytes.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ReplicaError

SHAPES = ("disk", "square", "triangle", "cross", "ring")
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


def class_spec(i: int) -> tuple[str, str]:
    """Class i → (shape, colour): shape i mod 5 worn in colour (i + i // 5) mod 5."""
    names = list(COLOURS)
    return SHAPES[i % len(SHAPES)], names[(i % len(SHAPES) + i // len(SHAPES)) % len(names)]


def class_names(n: int) -> list[str]:
    return [f"{i:02d}_{colour}_{shape}" for i, (shape, colour) in ((i, class_spec(i)) for i in range(n))]


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
    if shape == "ring":
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28
    raise ValueError(shape)


def _window(cx, cy, half):
    """Integer bounds of the square of half-width ``half`` around (cx, cy), inside the image."""
    x0, x1 = max(0, int(cx - half)), min(SIZE, int(cx + half) + 2)
    y0, y1 = max(0, int(cy - half)), min(SIZE, int(cy + half) + 2)
    return y0, y1, x0, x1


def render(cls: int, rng: np.random.Generator) -> np.ndarray:
    """One (256, 256, 3) uint8 image of class ``cls``. Work is done only where a mark lands."""
    shape, colour = class_spec(cls)
    # background: a smooth, low-saturation colour field plus grain
    grid = rng.uniform(70, 190, (4, 4, 1)) + rng.uniform(-25, 25, (4, 4, 3))
    bg = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    img = np.asarray(bg, np.float32) + rng.normal(0, 7, (SIZE, SIZE, 1)).astype(np.float32)
    # clutter: thin line segments and small dots in random colours
    for _ in range(rng.integers(3, 9)):
        c = rng.uniform(30, 230, 3).astype(np.float32)
        cx, cy = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
        if rng.random() < 0.5:
            ang, length, width = rng.uniform(0, np.pi), rng.uniform(20, 90), rng.uniform(1.0, 2.5)
            y0, y1, x0, x1 = _window(cx, cy, length + 3)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dist = np.abs((xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang))
            along = np.abs((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang))
            m = np.clip(width - dist, 0, 1) * (along < length)
        else:
            r = rng.uniform(3, 9)
            y0, y1, x0, x1 = _window(cx, cy, r + 2)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            m = np.clip(r - np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2), 0, 1)
        patch = img[y0:y1, x0:x1]
        patch += m[..., None] * (c - patch)
    # the object: position, scale, rotation, shading
    r = rng.uniform(0.17, 0.30) * SIZE
    cx, cy = rng.uniform(0.32, 0.68) * SIZE, rng.uniform(0.32, 0.68) * SIZE
    th = rng.uniform(0, 2 * np.pi)
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
    img = (img - 128) * rng.uniform(0.8, 1.15) + 128 * rng.uniform(0.85, 1.15) + rng.uniform(-10, 10, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make(args):
    out, split, cls, idx, seed, name = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], cls, idx]))
    buf = io.BytesIO()
    Image.fromarray(render(cls, rng)).save(buf, "JPEG", quality=QUALITY)
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
    spec = dict(generator=1, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
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
            jobs += [(str(out), split, c, i, seed, name) for i in range(per)
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
