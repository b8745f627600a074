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
from .runs import best_or_last, load_checkpoint

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
        ck = load_checkpoint(best_or_last(p))
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


# ----------------------------------------------------------------------------------------------
# Reports: curves, tables, config differences, and the paper's numbers beside them

# SPEC.md §5: ILSVRC top-1 / top-5 error (%), 10 views, from the original run logs, and the
# paper's claimed effect of each ablation (how much better the baseline is).
PAPER = [
    ("baseline, run 145 (ILSVRC-2012 val)", "40.66 / 18.21", "Table 2 '1 CNN' 40.7 / 18.2"),
    ("baseline, run 145-2010 (2010 test)", "37.47 / 17.00; centre view 39.02 / 18.30", "Table 1 37.5 / 17.0"),
    ("one-gpu-half, run 145-half (2010 test)", "39.17 / 18.23", "two GPUs better by 1.7 / 1.2"),
    ("no-norm, run 148 (2012 val)", "42.03 / 19.36", "LRN better by 1.4 / 1.2"),
    ("no-overlap, run 147 (2012 val)", "41.06 / 18.51", "overlap better by 0.4 / 0.3"),
    ("no-pca", "—", "PCA better by > 1 top-1"),
    ("no-dropout", "—", "'substantial overfitting'"),
]
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


def _errors(s: dict):
    """(top-1, top-5) in %, one view and ten views, from eval.json or the last epoch."""
    ev = s["eval"]
    one = ev.get("1-view") or {}
    ten = ev.get("10-view") or {}
    if not one and s["metrics"] and "val_top1_err" in s["metrics"][-1]:
        one = dict(top1_err=s["metrics"][-1]["val_top1_err"], top5_err=s["metrics"][-1]["val_top5_err"])
    f = lambda d: (100 * d["top1_err"], 100 * d["top5_err"]) if d else (None, None)  # noqa: E731
    return f(one), f(ten)


def _fmt(p):
    return "—" if p[0] is None else f"{p[0]:.2f} / {p[1]:.2f}"


def plot_curves(summaries, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for s in summaries:
        m = s["metrics"]
        if not m:
            continue
        ep = [r["epoch"] for r in m]
        ax[0].plot(ep, [r["train_loss"] if r["train_loss"] is not None else float("nan") for r in m],
                   label=s["name"])
        if "val_top1_err" in m[0]:
            ax[1].plot(ep, [100 * r["val_top1_err"] for r in m], label=f"{s['name']} top-1")
            ax[1].plot(ep, [100 * r["val_top5_err"] for r in m], "--", label=f"{s['name']} top-5")
        ax[2].semilogy(ep, [r["lr"]["weight"] for r in m], label=f"{s['name']} weights")
    for a, t in zip(ax, ("train loss", "validation error, one view (%)", "learning rate")):
        a.set_title(t)
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def report(runs, out=None) -> Path:
    """Markdown + PNG: curves, final tables, config differences, the paper's numbers, ablations."""
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
    lines = ["# replica report", "", "![learning curves](curves.png)", "",
             "## Final errors (top-1 / top-5, %)", "",
             "| run | one view | ten views | epochs |", "|---|---|---|---|"]
    for s in summaries:
        one, ten = _errors(s)
        lines.append(f"| {s['name']} | {_fmt(one)} | {_fmt(ten)} | {len(s['metrics'])} |")
    lines += ["", "## Differences from the as-run preset", ""]
    for s in summaries:
        d = ", ".join(f"`{k}={v}`" for k, v in s["diff"].items()) or "none"
        lines.append(f"- {s['name']}: {d}")
    if len(summaries) > 1:
        base = summaries[0]
        b1, b5 = _errors(base)[1] if _errors(base)[1][0] is not None else _errors(base)[0]
        lines += ["", f"## Ablations against {base['name']} (ten views where measured)", "",
                  "| run | top-1 / top-5 | baseline better by | the paper's claim |", "|---|---|---|---|"]
        for s in summaries[1:]:
            e = _errors(s)[1] if _errors(s)[1][0] is not None else _errors(s)[0]
            delta = "—" if e[0] is None or b1 is None else f"{e[0] - b1:+.2f} / {e[1] - b5:+.2f}"
            claim = next((f"{n}: {c1 if c1 is not None else '?'} / {c5 if c5 is not None else '?'}"
                          for (k, v), (n, c1, c5) in CLAIMS.items() if s["diff"].get(k) == v), "—")
            lines.append(f"| {s['name']} | {_fmt(e)} | {delta} | {claim} |")
    lines += ["", "## The paper and the original run (SPEC.md §5, ILSVRC, ten views)", "",
              "| config | original run log | paper |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in PAPER]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


# ----------------------------------------------------------------------------------------------
# Fig. 4: nearest neighbours by fc7 features


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and Euclidean distances of the k nearest rows of ``pool`` for each query row.

    The pool is scanned in chunks, so tens of thousands of 4096-d features fit in memory.
    """
    best_d = torch.full((len(queries), 0), float("inf"))
    best_i = torch.zeros((len(queries), 0), dtype=torch.long)
    q = queries.double()
    for a in range(0, len(pool), chunk):
        p = pool[a:a + chunk].double()
        d = torch.cdist(q, p)  # (Q, chunk)
        d_all = torch.cat([best_d, d], 1)
        i_all = torch.cat([best_i, torch.arange(a, a + len(p)).expand(len(q), -1)], 1)
        best_d, pos = d_all.topk(min(k, d_all.shape[1]), dim=1, largest=False)
        best_i = i_all.gather(1, pos)
    return best_i, best_d


@torch.no_grad()
def features_of(model, images, mean_image, batch: int = 64, crop: int = 224, progress: bool = False):
    """fc7 features (after ReLU) of every image's centre view, computed in batches."""
    from tqdm import tqdm

    from . import augment

    model.eval()
    mean_crop = augment.centre_crop_of(torch.as_tensor(mean_image), crop).to(model.devices[0])
    feats = []
    for a in tqdm(range(0, len(images), batch), desc="fc7 features", disable=not progress, unit="batch"):
        u8, _, _ = images.batch(np.arange(a, min(a + batch, len(images))))
        x = augment.centre_view(torch.from_numpy(u8).to(model.devices[0]), mean_crop, crop)
        feats.append(model.features(x).float().cpu())
    return torch.cat(feats)


def neighbors(run, queries: int = 8, k: int = 6, data=None, out=None, devices="auto", seed: int = 0) -> Path:
    """A PNG grid: each row a validation image, then its k nearest training images by fc7 distance."""
    from PIL import Image

    from .data import open_heldout, open_images
    from .predict import model_from_checkpoint

    run = Path(run)
    ck = load_checkpoint(best_or_last(run))
    data = data or ck["config"].get("data")
    if data is None:
        raise ReplicaError("no --data given and the checkpoint names none")
    model = model_from_checkpoint(ck, devices)
    mean = ck["mean"].numpy()
    crop = ck["meta"].get("crop", 224)
    train, val = open_images(data, "train"), open_heldout(ck["config"].get("val_data") or data)
    picks = np.sort(np.random.default_rng(seed).choice(len(val), min(queries, len(val)), replace=False))
    q = features_of(model, _Subset(val, picks), mean, crop=crop)
    pool = features_of(model, train, mean, crop=crop, progress=True)
    idx, _ = nearest(q, pool, k)
    size = 96
    sheet = np.full((len(picks) * (size + 4), (k + 1) * (size + 4) + 8, 3), 255, np.uint8)
    for r, p in enumerate(picks):
        row = [val.batch([p])[0][0]] + [train.batch([int(i)])[0][0] for i in idx[r]]
        for c, img in enumerate(row):
            t = np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR))
            x0 = c * (size + 4) + (8 if c else 0)  # a gap after the query column
            sheet[r * (size + 4):r * (size + 4) + size, x0:x0 + size] = t
    dest = Path(out) if out else (run / "neighbors.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(dest)
    return dest


class _Subset:
    def __init__(self, images, positions):
        self.images, self.positions = images, np.asarray(positions)
        self.size = images.size

    def __len__(self):
        return len(self.positions)

    def batch(self, positions):
        return self.images.batch(self.positions[np.asarray(positions)])
