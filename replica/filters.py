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

from .errors import ReplicaError
from .pictures import PAPER_STEPS, SEPARATION, picture, tower_kernels
from .pictures import filter_image, tower_split  # noqa: F401  (replica.filters' names, as before)
from .runs import describe_source, load_checkpoint, run_checkpoint


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
