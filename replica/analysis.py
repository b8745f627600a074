"""Reads runs, never trains: per-tower conv1 filters and their colour specificity (Fig. 3).

The paper (§6.1, Fig. 3): of the 96 conv1 kernels, one GPU's 48 are "largely colour-agnostic"
and the other's "largely colour-specific", "during every run … independent of any particular
random weight initialization (modulo a renumbering of the GPUs)". The measure used here, per
kernel w (3×11×11):

    colour specificity = 1 − 3·Σ_pixels m² / Σ w²,   m = the per-pixel mean over R, G, B

the fraction of the kernel's energy off the achromatic (grey) axis: 0 for a grey kernel, 1 for
a kernel whose channels cancel at every pixel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ReplicaError
from .runs import load_checkpoint

SEPARATION = 0.2  # towers "separate" when their median specificities differ by at least this


def colour_specificity(kernels) -> np.ndarray:
    """(K, 3, h, w) kernels → (K,) fraction of energy off the grey axis."""
    w = torch.as_tensor(kernels, dtype=torch.float64)
    m = w.mean(1)  # (K, h, w): the achromatic part
    total = w.square().sum((1, 2, 3))
    grey = 3 * m.square().sum((1, 2))
    return (1 - grey / total.clamp_min(1e-30)).numpy()


def tower_kernels(ckpt: dict) -> dict[str, np.ndarray]:
    out = {}
    for t in ("a", "b"):
        k = ckpt["model"].get(f"tower_{t}.conv1.weight")
        if k is not None:
            out[t] = k.float().numpy()
    return out


def summarize(spec: np.ndarray) -> dict:
    hist, _ = np.histogram(spec, bins=10, range=(0, 1))
    return dict(mean=float(spec.mean()), median=float(np.median(spec)), histogram=hist.tolist())


def tower_split(ckpt: dict) -> dict:
    """Specificity summary per tower, and whether (and which way) the towers separate."""
    kernels = tower_kernels(ckpt)
    towers = {t: summarize(colour_specificity(k)) for t, k in kernels.items()}
    out = dict(towers=towers)
    if len(towers) == 2:
        d = towers["b"]["median"] - towers["a"]["median"]
        out["separated"] = abs(d) >= SEPARATION
        out["colour_tower"] = ("b" if d > 0 else "a") if out["separated"] else None
    return out


def filter_image(kernels: dict[str, np.ndarray], scale: int = 4, cols: int = 8) -> np.ndarray:
    """One RGB picture: each tower's kernels in its own block, each kernel contrast-normalized."""
    blocks = []
    for t, k in kernels.items():
        n, _, h, w = k.shape
        rows = -(-n // cols)
        tile = (h * scale + 2, w * scale + 2)
        block = np.full((rows * tile[0] + 2, cols * tile[1] + 2, 3), 255, np.uint8)
        for i in range(n):
            x = k[i].transpose(1, 2, 0)
            x = (x - x.min()) / max(x.max() - x.min(), 1e-12)  # per-kernel contrast normalization
            x = np.kron(x, np.ones((scale, scale, 1)))  # enlarge for viewing
            r, c = divmod(i, cols)
            y0, x0 = 2 + r * tile[0], 2 + c * tile[1]
            block[y0:y0 + h * scale, x0:x0 + w * scale] = np.round(x * 255).astype(np.uint8)
        blocks.append(block)
    if len(blocks) == 2:
        gap = np.full((blocks[0].shape[0], 16, 3), 255, np.uint8)
        return np.concatenate([blocks[0], gap, blocks[1]], 1)
    return blocks[0]


def filters(runs, out=None) -> list[dict]:
    """Write each run's filters.png and return its per-tower colour-specificity summary."""
    from PIL import Image

    results = []
    for r in runs:
        p = Path(r)
        ck = load_checkpoint(p / "best.pt" if (p / "best.pt").exists() else p)
        kernels = tower_kernels(ck)
        if not kernels:
            raise ReplicaError(f"{r}: the checkpoint holds no conv1 kernels")
        dest = Path(out) / f"filters-{p.name if p.is_dir() else p.stem}.png" if out else \
            (p if p.is_dir() else p.parent) / "filters.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(filter_image(kernels)).save(dest)
        results.append(dict(run=str(r), png=str(dest), **tower_split(ck)))
    return results


def format_filters(results: list[dict]) -> str:
    lines = [f"{'run':<28} {'tower':<6} {'mean':>6} {'median':>7}  histogram 0–1 (10 bins)"]
    separated = 0
    for r in results:
        for t, s in r["towers"].items():
            lines.append(f"{Path(r['run']).name[:28]:<28} {t:<6} {s['mean']:6.3f} {s['median']:7.3f}  "
                         f"{' '.join(f'{h:2d}' for h in s['histogram'])}")
        if "separated" in r:
            separated += r["separated"]
            verdict = f"tower {r['colour_tower']} colour-specific" if r["separated"] else "no split"
            lines.append(f"{'':<28} split: {verdict} (medians differ by ≥ {SEPARATION}: {r['separated']})")
        else:
            lines.append(f"{'':<28} one tower: the split needs two towers")
        lines.append(f"{'':<28} picture: {r['png']}")
    two = [r for r in results if "separated" in r]
    if len(two) > 1:
        lines.append(f"towers separated in {separated} of {len(two)} runs")
    return "\n".join(lines)
