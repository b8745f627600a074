"""Fig. 4: the training images nearest to a validation image by fc7 features (``replica neighbors``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ReplicaError
from .runs import load_checkpoint, run_checkpoint


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

    from .data.loaders import open_heldout, open_images
    from .inference import model_from_checkpoint

    run = Path(run)
    ck = load_checkpoint(run_checkpoint(run))
    data = data or ck.config.get("data")
    if data is None:
        raise ReplicaError("no --data given and the checkpoint names none")
    model = model_from_checkpoint(ck, devices)
    mean, crop = ck.mean.numpy(), ck.crop
    train, val = open_images(data, "train"), open_heldout(ck.config.get("val_data") or data)
    picks = np.sort(np.random.default_rng(seed).choice(len(val), min(queries, len(val)), replace=False))
    q = features_of(model, _Subset(val, picks), mean, crop=crop)
    top = NearestK(q, k)
    for feats, positions in feature_batches(model, train, mean, crop=crop, progress=True, workers=workers):
        top.add(feats, positions)  # streamed: memory is one batch of features, not the training set's
    idx = top.best_i
    size = 96

    def namer(images):  # an image's label indexes ITS data's class list, never the run's
        names = getattr(images, "names", None) or images.classes
        return lambda lab: str(names[int(lab)]).split(",")[0]  # "tench, Tinca tinca" → tench

    vname, tname = namer(val), namer(train)
    sheet = np.full((len(picks) * (size + 4), (k + 1) * (size + 4) + 8, 3), 255, np.uint8)
    legend = []
    for r, p in enumerate(picks):
        (q, ql, _), found = val.batch([p]), [train.batch([int(i)]) for i in idx[r]]
        row = [q[0]] + [f[0][0] for f in found]
        legend.append(f"row {r + 1}: {vname(ql[0])} → " + ", ".join(tname(f[1][0]) for f in found))
        for c, img in enumerate(row):
            t = np.asarray(Image.fromarray(img.transpose(1, 2, 0)).resize((size, size), Image.BILINEAR))
            x0 = c * (size + 4) + (8 if c else 0)  # a gap after the query column
            sheet[r * (size + 4):r * (size + 4) + size, x0:x0 + size] = t
    dest = Path(out) if out else (run / "neighbors.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(dest)
    same = list(ck.classes) == list(train.classes)
    head = (f"classes: {data}'s" + ("" if same else f" (the run was trained on other classes: {len(ck.classes)} of its "
                                                  f"own; these names are the data's, not the net's outputs)"))
    dest.with_suffix(".txt").write_text(head + "\n" + "\n".join(legend) + "\n")  # each row's classes, by name
    return dest


class _Subset:
    def __init__(self, images, positions):
        self.images, self.positions = images, np.asarray(positions)
        self.size = images.size

    def __len__(self):
        return len(self.positions)

    def batch(self, positions):
        return self.images.batch(self.positions[np.asarray(positions)])
