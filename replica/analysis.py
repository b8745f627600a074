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

from .colour import colour_specificity  # noqa: F401  (re-exported: replica.analysis.colour_specificity)
from .errors import ReplicaError
from .runs import load_checkpoint, run_checkpoint

SEPARATION = 0.2  # towers "separate" when their median specificities differ by at least this


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


PAPER_STEPS = 450_000  # run 145: about 90 epochs of 1.28 M images at batch 128 (SPEC.md §5)
NEAR_START_STEPS = 5_000  # below this many steps conv1 is still close to its random draw (the demo: 222)


def filter_caption(ckpt: dict, split: dict) -> list[str]:
    """What the picture shows, and, for a short run, why it cannot show the paper's split yet."""
    step = int(ckpt.get("progress", {}).get("step") or 0)
    towers = split["towers"]
    med = ", ".join(f"{t} {s['median']:.2f}" for t, s in towers.items())
    order = "tower a (left), tower b (right)" if len(towers) == 2 else "one tower"
    lines = [f"conv1 kernels, {order}, after {step:,} steps; median colour specificity {med} "
             f"(0 grey, 1 colour-only)"]
    if len(towers) == 2 and step < PAPER_STEPS // 10:
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


def filters(runs, out=None) -> list[dict]:
    """Write each run's filters.png (captioned: what it shows, and whether the run is long enough
    to show Fig. 3's split) and return its per-tower colour-specificity summary."""
    from PIL import Image

    results = []
    for r in runs:
        p = Path(r)
        ck = load_checkpoint(run_checkpoint(p))
        kernels = tower_kernels(ck)
        if not kernels:
            raise ReplicaError(f"{r}: the checkpoint holds no conv1 kernels")
        dest = Path(out) / f"filters-{p.name if p.is_dir() else p.stem}.png" if out else \
            (p if p.is_dir() else p.parent) / "filters.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        split = tower_split(ck)
        caption = filter_caption(ck, split)
        Image.fromarray(captioned(filter_image(kernels), caption)).save(dest)
        results.append(dict(run=str(r), png=str(dest), caption=caption, step=ck.get("progress", {}).get("step"),
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


# ----------------------------------------------------------------------------------------------
# Reports: curves, tables, config differences, and the paper's numbers beside them

# SPEC.md §5: ILSVRC top-1 / top-5 error (%), 10 views, from the original run logs, and the
# paper's claimed effect of each ablation (how much better the baseline is).
PAPER = [  # (dataset, config, original run log, paper)
    ("ilsvrc2012", "baseline, run 145 (ILSVRC-2012 val)", "40.66 / 18.21", "Table 2 '1 CNN' 40.7 / 18.2"),
    ("ilsvrc2010", "baseline, run 145-2010 (ILSVRC-2010 test)", "37.47 / 17.00; centre view 39.02 / 18.30",
     "Table 1 37.5 / 17.0"),
    ("ilsvrc2010", "one-gpu-half, run 145-half (ILSVRC-2010 test)", "39.17 / 18.23", "two GPUs better by 1.7 / 1.2"),
    ("ilsvrc2012", "no-norm, run 148 (ILSVRC-2012 val)", "42.03 / 19.36", "LRN better by 1.4 / 1.2"),
    ("ilsvrc2012", "no-overlap, run 147 (ILSVRC-2012 val)", "41.06 / 18.51", "overlap better by 0.4 / 0.3"),
    ("ilsvrc2012", "no-pca", "—", "PCA better by > 1 top-1"),
    ("ilsvrc2012", "no-dropout", "—", "'substantial overfitting'"),
]
DATASETS = {"ilsvrc2012": "ILSVRC-2012", "ilsvrc2010": "ILSVRC-2010"}
CLAIMS = {  # config change → the paper's claimed (top-1, top-5) gain of the baseline over it
    ("variant", "one-gpu-half"): ("two GPUs", 1.7, 1.2),
    ("norm", False): ("LRN", 1.4, 1.2),
    ("overlap", False): ("overlapping pooling", 0.4, 0.3),
    ("pca_noise", False): ("PCA noise", 1.0, None),
    ("dropout", False): ("dropout", None, None),
}


def _run_summary(run: Path) -> dict:
    import json

    import yaml

    from .config import load_config
    from .runs import read_metrics

    cfg = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    defaults = load_config(None, {}).to_dict()
    diff = {k: v for k, v in cfg.items() if k in defaults and v != defaults[k] and k not in ("data", "val_data")}
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    return dict(run=run, name=run.name, metrics=read_metrics(run), config=cfg, diff=diff, eval=ev)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _pair(d) -> str:
    """top-1 / top-5 in %, n/a where top-5 is undefined (≤ 5 classes)."""
    return f"{_pct(d['top1_err'])} / {_pct(d['top5_err'])}"


def _network(ev: dict) -> str:
    kind = {"last": "final", "best": "best-on-val", "file": "file"}.get(ev.get("network"), "?")
    return f"{kind}, epoch {ev.get('epoch')}"


def _basis(ev: dict, views: int):
    """What a figure is comparable on: views, checkpoint rule, split, images, data."""
    if not ev or f"{views}-view" not in ev:
        return None
    return (views, ev.get("network"), ev.get("split", "val"), ev[f"{views}-view"]["images"], ev.get("data"))


def _last_epoch(s: dict) -> str:
    m = [r for r in s["metrics"] if "val_top1_err" in r]
    if not m:
        return "—"
    r = m[-1]
    n = f", {r['val_images']:,} images" if r.get("val_images") is not None else ""
    return f"{_pct(r['val_top1_err'])} / {_pct(r.get('val_top5_err'))} (epoch {r['epoch']}{n})"


def plot_curves(summaries, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for s in summaries:
        m = s["metrics"]
        if not m:
            continue
        ep = [r["epoch"] for r in m]
        ax[0].plot(ep, [r["train_loss"] if r["train_loss"] is not None else float("nan") for r in m],
                   label=s["name"])
        if "val_top1_err" in m[0]:
            ax[1].plot(ep, [100 * r["val_top1_err"] for r in m], label=f"{s['name']} top-1")
            if any(r.get("val_top5_err") is not None for r in m):
                ax[1].plot(ep, [100 * r["val_top5_err"] if r.get("val_top5_err") is not None else float("nan")
                                for r in m], "--", label=f"{s['name']} top-5")
        ax[2].semilogy(ep, [r["lr"]["weight"] for r in m], label=f"{s['name']} weights")
        for t, style in (("a", "-"), ("b", "--")):
            vals = [(r.get("colour_specificity") or {}).get(t) for r in m]
            if any(v is not None for v in vals):
                ax[3].plot(ep, [v if v is not None else float("nan") for v in vals], style,
                           label=f"{s['name']} tower {t}")
    titles = ("train loss", "validation error, one view (%)", "learning rate",
              "conv1 colour specificity, median per tower")
    for a, t in zip(ax, titles):
        a.set_title(t)
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    ax[3].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def report(runs, out=None) -> Path:
    """Markdown + PNG: curves, final tables, config differences, the paper's numbers, ablations.

    Final figures come from each run's eval.json (``replica eval``), with the network, views and
    images they were measured on; the last epoch's validation error (one view, possibly a
    ``val_batches`` sample) is shown apart, never in their place. Ablations compare only figures
    measured alike: the same views, checkpoint rule, split, images and data as the baseline's.
    """
    summaries = [_run_summary(Path(r)) for r in runs]
    names = [s["name"] for s in summaries]
    for s in summaries:
        if names.count(s["name"]) > 1:  # runs/a/run and runs/b/run: name them by their parent too
            s["name"] = f"{s['run'].parent.name}/{s['name']}"
    for s in summaries:
        if not s["metrics"] and not s["eval"]:
            raise ReplicaError(f"{s['run']}: no metrics.jsonl or eval.json: not a finished run folder")
    out = Path(out) if out else summaries[0]["run"]
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(summaries, out / "curves.png")
    lines = ["# replica report", "", "![learning curves and conv1 colour specificity](curves.png)", "",
             "## Final errors (top-1 / top-5, %, from `replica eval`)", "",
             "| run | one view | ten views | network | images | last epoch's validation (one view) |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        ev = s["eval"]
        one, ten = ev.get("1-view"), ev.get("10-view")
        if ev:
            first = one or ten
            images = f"{first['images']:,} {ev.get('images_of', 'images')}"
            lines.append(f"| {s['name']} | {_pair(one) if one else '—'} | {_pair(ten) if ten else '—'} | "
                         f"{_network(ev)} | {images} | {_last_epoch(s)} |")
        else:
            lines.append(f"| {s['name']} | not evaluated | not evaluated | — | — | {_last_epoch(s)} |")
    missing = [s for s in summaries if not s["eval"]]
    if missing:
        lines += ["", "Not evaluated: " + ", ".join(f"`replica eval {s['run']}`" for s in missing)]
    if any((s["eval"].get(k) or {}).get("top5_err", 0) is None for s in summaries for k in ("1-view", "10-view")):
        lines += ["", "top-5 is n/a with 5 classes or fewer: every label is then in the top 5."]
    lines += ["", "How each figure was measured:", ""]
    from .inference import describe_eval

    for s in summaries:
        lines.append(f"- {s['name']}: {describe_eval(s['eval']) if s['eval'] else 'no eval.json'}")
    lines += ["", "## Differences from the as-run preset", ""]
    for s in summaries:
        d = ", ".join(f"`{k}={v}`" for k, v in s["diff"].items()) or "none"
        lines.append(f"- {s['name']}: {d}")
    if len(summaries) > 1:
        lines += _ablations(summaries)
    lines += _paper_table(summaries)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _paper_table(summaries) -> list[str]:
    """SPEC.md §5's figures for the datasets these runs were evaluated on, and only those."""
    present = [d for d in DATASETS if any(s["eval"].get("dataset") == d for s in summaries)]
    if not present:
        return ["", "## The paper and the original run", "",
                "Not shown: no run here was evaluated on ILSVRC-2012 or ILSVRC-2010 (eval.json names no such "
                "dataset), so their figures would not compare. `replica prepare` records the dataset when it "
                "reads ImageNet's archives or the Kaggle layout with all 1,000 classes."]
    lines = ["", f"## The paper and the original run (SPEC.md §5, {' and '.join(DATASETS[d] for d in present)}, "
                 f"ten views)", "", "| config | original run log | paper |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for d, a, b, c in PAPER if d in present]
    return lines


def _ablations(summaries) -> list[str]:
    base = summaries[0]
    views = 10 if "10-view" in base["eval"] else 1
    basis = _basis(base["eval"], views)
    if basis is None:
        return ["", f"## Ablations against {base['name']}", "",
                f"The baseline has no evaluation: run `replica eval {base['run']}` (and the same for each run) "
                f"to compare them."]
    b = base["eval"][f"{views}-view"]
    what = (f"{'ten views' if views == 10 else 'one view'}, {_network(base['eval']).split(',')[0]} network, "
            f"{basis[3]:,} {base['eval'].get('images_of', 'images')} of {basis[4]}")
    lines = ["", f"## Ablations against {base['name']} ({what})", "",
             "| run | top-1 / top-5 | baseline better by | the paper's claim |", "|---|---|---|---|"]
    for s in summaries[1:]:
        claim = next((f"{n}: {c1 if c1 is not None else '?'} / {c5 if c5 is not None else '?'}"
                      for (k, v), (n, c1, c5) in CLAIMS.items() if s["diff"].get(k) == v), "—")
        mine = _basis(s["eval"], views)
        if not s["eval"]:
            lines.append(f"| {s['name']} | not evaluated (`replica eval {s['run']}`) | — | {claim} |")
            continue
        if mine != basis:
            why = "no such view count" if mine is None else ", ".join(
                n for n, x, y in zip(("views", "network", "split", "images", "data"), mine, basis) if x != y)
            lines.append(f"| {s['name']} | not comparable ({why} differ) | — | {claim} |")
            continue
        e = s["eval"][f"{views}-view"]
        d5 = "n/a" if e["top5_err"] is None or b["top5_err"] is None else f"{100 * (e['top5_err'] - b['top5_err']):+.2f}"
        delta = f"{100 * (e['top1_err'] - b['top1_err']):+.2f} / {d5}"
        lines.append(f"| {s['name']} | {_pair(e)} | {delta} | {claim} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Fig. 4: nearest neighbours by fc7 features


class NearestK:
    """The k nearest pool rows of each query, kept while the pool streams past in chunks: memory
    is the queries, k candidates each, and one chunk, never the whole pool (ImageNet's 1.28 M
    fc7 features are 21 GB)."""

    def __init__(self, queries: torch.Tensor, k: int):
        self.q, self.k, self.seen = queries.double(), k, 0
        self.best_d = torch.full((len(queries), 0), float("inf"), dtype=torch.float64)
        self.best_i = torch.zeros((len(queries), 0), dtype=torch.long)

    def add(self, chunk: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Pool rows ``chunk`` with their ``indices`` (default: continuing from the previous chunk's)."""
        if indices is None:
            indices = torch.arange(self.seen, self.seen + len(chunk))
        d = torch.cdist(self.q, chunk.double())  # (Q, chunk)
        d_all = torch.cat([self.best_d, d], 1)
        i_all = torch.cat([self.best_i, torch.as_tensor(indices, dtype=torch.long).expand(len(self.q), -1)], 1)
        self.best_d, pos = d_all.topk(min(self.k, d_all.shape[1]), dim=1, largest=False)
        self.best_i = i_all.gather(1, pos)
        self.seen += len(chunk)


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and Euclidean distances of the k nearest rows of ``pool`` for each query row."""
    top = NearestK(queries, k)
    for a in range(0, len(pool), chunk):
        top.add(pool[a:a + chunk])
    return top.best_i, top.best_d


@torch.no_grad()
def feature_batches(model, images, mean_image, batch: int = 64, crop: int = 224, progress: bool = False,
                    workers: int = 0):
    """(fc7 features after ReLU, their positions) of every image's centre view, one batch at a
    time, the images read by ``workers`` loader processes; unreadable images are left out."""
    from tqdm import tqdm

    from . import augment
    from .evaluate import EvalBatches

    model.eval()
    dev = model.devices[0]
    mean_crop = augment.centre_crop_of(torch.as_tensor(mean_image), crop).to(dev)
    ds = EvalBatches(images, batch)
    it = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, pin_memory=dev.type == "cuda",
                                     prefetch_factor=2 if workers else None)
    for i, (u8, _, bad) in enumerate(tqdm(it, total=len(ds), desc="fc7 features", disable=not progress,
                                          unit="batch")):
        a = ds.starts[i]
        keep = np.ones(min(batch, len(images) - a), bool)
        keep[[k for _, _, k in bad]] = False
        if not keep.any():
            continue
        x = augment.centre_view(u8.to(dev, non_blocking=True), mean_crop, crop)
        yield model.features(x).float().cpu(), torch.from_numpy(np.flatnonzero(keep) + a)


def features_of(model, images, mean_image, batch: int = 64, crop: int = 224, progress: bool = False):
    """fc7 features of every image's centre view, all at once (small sets)."""
    return torch.cat([f for f, _ in feature_batches(model, images, mean_image, batch, crop, progress)])


def neighbors(run, queries: int = 8, k: int = 6, data=None, out=None, devices="auto", seed: int = 0,
              workers: int = 2) -> Path:
    """A PNG grid: each row a validation image, then its k nearest training images by fc7 distance."""
    from PIL import Image

    from .data import open_heldout, open_images
    from .inference import model_from_checkpoint

    run = Path(run)
    ck = load_checkpoint(run_checkpoint(run))
    data = data or ck["config"].get("data")
    if data is None:
        raise ReplicaError("no --data given and the checkpoint names none")
    model = model_from_checkpoint(ck, devices)
    mean = ck["mean"].numpy()
    crop = ck["meta"].get("crop", 224)
    train, val = open_images(data, "train"), open_heldout(ck["config"].get("val_data") or data)
    picks = np.sort(np.random.default_rng(seed).choice(len(val), min(queries, len(val)), replace=False))
    q = features_of(model, _Subset(val, picks), mean, crop=crop)
    top = NearestK(q, k)
    for feats, positions in feature_batches(model, train, mean, crop=crop, progress=True, workers=workers):
        top.add(feats, positions)  # streamed: memory is one batch of features, not the training set's
    idx = top.best_i
    size = 96
    names = ck["meta"].get("names") or ck["meta"]["classes"]
    name = lambda lab: str(names[int(lab)]).split(",")[0]  # noqa: E731  ("tench, Tinca tinca" → tench)
    sheet = np.full((len(picks) * (size + 4), (k + 1) * (size + 4) + 8, 3), 255, np.uint8)
    legend = []
    for r, p in enumerate(picks):
        (q, ql, _), found = val.batch([p]), [train.batch([int(i)]) for i in idx[r]]
        row = [q[0]] + [f[0][0] for f in found]
        legend.append(f"row {r + 1}: {name(ql[0])} → " + ", ".join(name(f[1][0]) for f in found))
        for c, img in enumerate(row):
            t = np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR))
            x0 = c * (size + 4) + (8 if c else 0)  # a gap after the query column
            sheet[r * (size + 4):r * (size + 4) + size, x0:x0 + size] = t
    dest = Path(out) if out else (run / "neighbors.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(dest)
    dest.with_suffix(".txt").write_text("\n".join(legend) + "\n")  # each row's classes, by name
    return dest


class _Subset:
    def __init__(self, images, positions):
        self.images, self.positions = images, np.asarray(positions)
        self.size = images.size

    def __len__(self):
        return len(self.positions)

    def batch(self, positions):
        return self.images.batch(self.positions[np.asarray(positions)])
