"""Fig. 3: each tower's conv1 filters, their colour specificity, and the picture (``replica filters``).

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

from .colour import colour_specificity
from .errors import ReplicaError
from .runs import describe_source, load_checkpoint, run_checkpoint

SEPARATION = 0.2  # towers "separate" when their median specificities differ by at least this


def tower_kernels(state: dict) -> dict[str, np.ndarray]:
    """Each tower's conv1 kernels from a state_dict (a checkpoint's ``model``)."""
    out = {}
    for t in ("a", "b"):
        k = state.get(f"tower_{t}.conv1.weight")
        if k is not None:
            out[t] = k.float().numpy()
    return out


def summarize(spec: np.ndarray) -> dict:
    hist, _ = np.histogram(spec, bins=10, range=(0, 1))
    return dict(mean=float(spec.mean()), median=float(np.median(spec)), histogram=hist.tolist())


def tower_split(state: dict) -> dict:
    """Specificity summary per tower, and whether (and which way) the towers separate."""
    kernels = tower_kernels(state)
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


PAPER_STEPS = 450_000  # run 145: about 90 epochs of 1.28 M images at batch 128 (docs/spec.md §5)
NEAR_START_STEPS = 5_000  # below this many steps conv1 is still close to its random draw (the demo: 222)


def filter_caption(step: int, split: dict, imported: str | None = None) -> list[str]:
    """What the picture shows, and, for a short run, why it cannot show the paper's split yet.
    ``imported``: weights trained elsewhere (``replica import``), said instead of a step count."""
    step = int(step or 0)
    towers = split["towers"]
    med = ", ".join(f"{t} {s['median']:.2f}" for t, s in towers.items())
    order = "tower a (left), tower b (right)" if len(towers) == 2 else "one tower"
    when = imported or f"after {step:,} steps"
    lines = [f"conv1 kernels, {order}, {when}; median colour specificity {med} (0 grey, 1 colour-only)"]
    if len(towers) == 2 and step < PAPER_STEPS // 10 and not imported:
        lines.append(f"A short run: Fig. 3's split (one tower colour-agnostic, the other colour-specific) "
                     f"came after {PAPER_STEPS:,} steps of ImageNet;")
        lines.append("this run is too short to show it" + (
            ", and its kernels are still close to their random start (noise)." if step < NEAR_START_STEPS else "."))
    return lines


def captioned(img: np.ndarray, lines: list[str]) -> np.ndarray:
    """The picture with a white strip of text above it (PIL's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h = 13
    width = max([img.shape[1]] + [int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font)) + 12
                                  for t in lines])
    canvas = Image.new("RGB", (width, img.shape[0] + line_h * len(lines) + 10), "white")
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(lines):
        draw.text((6, 4 + line_h * i), t, fill=(0, 0, 0), font=font)
    canvas.paste(Image.fromarray(img), (0, line_h * len(lines) + 8))
    return np.asarray(canvas)


def picture(state: dict, step: int, imported: str | None = None) -> tuple[np.ndarray, list[str], dict]:
    """(the captioned filter picture as an RGB array, its caption, the towers' split) of a
    state_dict's conv1 kernels: what ``replica filters`` draws and a run redraws each epoch."""
    split = tower_split(state)
    caption = filter_caption(step, split, imported)
    return captioned(filter_image(tower_kernels(state)), caption), caption, split


def filters(runs, out=None) -> list[dict]:
    """Write each run's filters.png (captioned: what it shows, and whether the run is long enough
    to show Fig. 3's split) and return its per-tower colour-specificity summary."""
    from PIL import Image

    results = []
    for r in runs:
        p = Path(r)
        ck = load_checkpoint(run_checkpoint(p))
        if not tower_kernels(ck.model):
            raise ReplicaError(f"{r}: the checkpoint holds no conv1 kernels")
        dest = Path(out) / f"filters-{p.name if p.is_dir() else p.stem}.png" if out else \
            (p if p.is_dir() else p.parent) / "filters.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        img, caption, split = picture(ck.model, ck.progress.step, describe_source(ck.source) if ck.source else None)
        Image.fromarray(img).save(dest)
        results.append(dict(run=str(r), png=str(dest), caption=caption, step=ck.progress.step,
                            **split))
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
        if len(r.get("caption", ())) > 1:
            lines.append(f"{'':<28} note: a short run ({r['step'] or 0:,} steps): too short for Fig. 3's split, "
                         f"which came after {PAPER_STEPS:,} steps of ImageNet")
    two = [r for r in results if "separated" in r]
    if len(two) > 1:
        lines.append(f"towers separated in {separated} of {len(two)} runs")
    return "\n".join(lines)
