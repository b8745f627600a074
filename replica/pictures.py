"""The pictures a run and a report draw: Fig. 3's conv1 kernels with their caption, and the
learning curves. Drawing only: nothing here reads a run folder or a checkpoint, so the training
loop (replica.live) and the reports (replica.report, replica.filters) share it without either
reaching the other.

Fig. 3's measure (replica.colour): of the 96 conv1 kernels, the paper (§6.1) finds one GPU's 48
"largely colour-agnostic" and the other's "largely colour-specific"; each tower's median colour
specificity says which, and the towers "separate" when the medians differ by ``SEPARATION``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .colour import colour_specificity
from .fileio import atomic_write

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



def plot_curves(groups, dest: Path, title: str | None = None) -> None:
    """Each config's mean curve over its seeds, with the spread (min to max) as a band; written to
    a temporary file and renamed over ``dest``. ``groups``: ``[dict(name=…, runs=[dict(metrics=
    metrics.jsonl's records), …]), …]``: the report's groups across seeds, or one run as it trains
    (replica.live redraws its own each epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4))

    def band(a, per_run, label, style="-"):
        rows = [r for r in per_run if any(v is not None for v in r.values())]
        if not rows:
            return
        xs = sorted({e for r in rows for e in r})
        vals = [[r.get(e) for r in rows if r.get(e) is not None] for e in xs]
        keep = [(x, v) for x, v in zip(xs, vals) if v]
        xs, vals = [x for x, _ in keep], [v for _, v in keep]
        mean = [sum(v) / len(v) for v in vals]
        (line,) = a.plot(xs, mean, style, label=f"{label} (n={len(rows)})")
        if len(rows) > 1:
            a.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)

    for g in groups:
        runs = [s["metrics"] for s in g["runs"] if s["metrics"]]
        if not runs:
            continue
        series = lambda f: [{r["epoch"]: f(r) for r in m} for m in runs]  # noqa: E731
        band(ax[0], series(lambda r: r.get("train_loss")), g["name"])
        band(ax[1], series(lambda r: 100 * r["val_top1_err"] if r.get("val_top1_err") is not None else None),
             f"{g['name']} top-1")
        band(ax[2], series(lambda r: max((v for k, v in (r.get("lr") or {}).items() if k.endswith("weight")),
                                         default=None)), g["name"])  # as-run: the weights'; a table: its largest
        spec = lambda r, f: f((r.get("colour_specificity") or {}).values()) if len(  # noqa: E731
            (r.get("colour_specificity") or {})) == 2 else None
        band(ax[3], series(lambda r: spec(r, max)), f"{g['name']} colour-specific tower")
        band(ax[3], series(lambda r: spec(r, min)), f"{g['name']} other tower", "--")
    if ax[2].lines:
        ax[2].set_yscale("log")
    titles = ("train loss", "validation error, one view (%)", "learning rate (weights; the largest group's)",
              "conv1 colour specificity, median per tower")
    for a, t in zip(ax, titles):
        a.set_title(t)
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    ax[3].set_ylim(0, 1)
    fig.suptitle(title or "mean over seeds; band: lowest to highest seed", fontsize=9)
    fig.tight_layout()
    atomic_write(Path(dest), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
