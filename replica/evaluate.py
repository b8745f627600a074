"""Top-1 and top-5 error, one view and ten views, in one pass. Never touches optimizer state."""
from __future__ import annotations

import numpy as np
import torch

from . import augment
from .runtime import autocast

TOP5_MIN_CLASSES = 6  # with 5 classes or fewer every label is in the top 5: top-5 error is 0 by construction


def topk_misses(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 misses, top-5 misses) of a batch of class probabilities, as a tensor on their
    device: counted there, read by nobody until the pass ends."""
    k = min(5, probs.shape[1])
    top = probs.topk(k, dim=1).indices  # (B, k)
    hit = top == labels.to(top.device, non_blocking=True)[:, None]
    return torch.stack([(~hit[:, 0]).sum(), (~hit.any(1)).sum()])


def topk_errors(probs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 misses in a batch of class probabilities."""
    m1, m5 = topk_misses(probs, labels).tolist()
    return m1, m5


@torch.no_grad()
def view_probs(model, u8: torch.Tensor, mean_crop: torch.Tensor, views: int = 1, crop: int = augment.CROP,
               bf16: bool = False, forward=None) -> torch.Tensor:
    """Softmax probabilities of each view: (B, 1, classes) for the centre view, (B, 10, classes)
    for the ten views (:data:`replica.augment.VIEW_OFFSETS`; view 2 is the centre, unflipped).

    ``bf16``: the forward pass under bfloat16 autocast, as a run trained with ``bf16=true`` was;
    the softmax stays in float32. ``forward``: a :class:`replica.steps.ForwardRunner` of the
    model (a CUDA graph per batch shape); by default the forward runs eagerly.
    """
    dev = model.devices[0]
    u8 = u8.to(dev, non_blocking=True)
    mean_crop = mean_crop.to(dev)
    if views == 1:
        x = augment.centre_view(u8, mean_crop, crop)[:, None]  # (B, 1, 3, h, w)
    else:
        # (B, 10, 3, h, w): one gather on a GPU (one kernel, channels last); on the CPU stacked
        # slices, 4.8× the gather's rate there (python tools/bench.py eval): the same values
        make = augment.ten_views_gathered if u8.device.type == "cuda" else augment.ten_views
        x = make(u8, mean_crop, crop)
    b, v = x.shape[:2]
    if forward is not None:
        return forward(x.flatten(0, 1)).view(b, v, -1)
    with autocast(model.devices, bf16):
        logits = model(x.flatten(0, 1))
    return torch.softmax(logits.float(), 1).view(b, v, -1)


@torch.no_grad()
def predict_probs(model, u8: torch.Tensor, mean_crop: torch.Tensor, views: int = 1, crop: int = augment.CROP,
                  bf16: bool = False):
    """Softmax probabilities (B, classes); with 10 views, the mean of the views' probabilities."""
    return view_probs(model, u8, mean_crop, views, crop, bf16).mean(1)  # probabilities, not logits (src/layer.cu:1809-1822)


class EvalBatches(torch.utils.data.Dataset):
    """Batch i of a dataset in order, read in a loader worker: (uint8 images, labels, bad).

    ``max_batches`` caps the images at that many batches, taken evenly spaced over the whole set
    (always the same ones): sets are stored class by class, and the first batches alone would
    measure only the first classes."""

    def __init__(self, images, batch: int, max_batches: int | None = None):
        self.images, self.batch = images, batch
        n = len(images)
        if max_batches and max_batches * batch < n:
            self.order = np.unique(np.linspace(0, n - 1, max_batches * batch).round().astype(np.int64))
        else:
            self.order = np.arange(n)
        self.starts = list(range(0, len(self.order), batch))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        a = self.starts[i]
        u8, labels, bad = self.images.batch(self.order[a:a + self.batch])
        return torch.from_numpy(u8), torch.as_tensor(labels), bad


@torch.no_grad()
def evaluate(model, images, mean_image, views=1, batch: int = 64, max_batches: int | None = None,
             crop: int = augment.CROP, progress: bool = False, bf16: bool = False, workers: int = 0,
             graph: bool = False, per_view: bool = False) -> dict:
    """top-1 / top-5 error of ``model`` on ``images`` (a store or file images).

    ``views``: 1, 10, or ``(1, 10)``: both from one pass of ten views, the one-view figure from
    the centre view's probabilities alone (the same crop the one-view path takes). Returns
    ``{"1-view": {...}, "10-view": {...}}`` for a tuple, the one figure's dict for an int.
    ``top5_err`` is None with fewer than 6 classes. Batches are read by ``workers`` loader
    processes (pinned memory for a GPU). ``bf16``: see :func:`view_probs`. ``graph``: on CUDA,
    the forward replayed from a graph per batch shape (:class:`replica.steps.ForwardRunner`).
    ``per_view`` (ten views only): each view's own figures as well, under ``"per_view"``.
    """
    out = evaluate_members([dict(model=model, mean=mean_image, bf16=bf16)], images, views, batch, max_batches,
                           crop, progress, workers, graph=graph, per_view=per_view)
    return out["members"][0]


@torch.no_grad()
def evaluate_members(members: list, images, views=1, batch: int = 64, max_batches: int | None = None,
                     crop: int = augment.CROP, progress: bool = False, workers: int = 0, weights=None,
                     graph: bool = False, graphs=None, per_view: bool = False) -> dict:
    """Several nets on the same images in one pass: each member's figures, and the ensemble's,
    whose probabilities are the members' averaged (weighted by ``weights``, Σ c_k·P_k, when
    given), view by view, as the 2012 code's avg-valid.py averaged its models' predictions.
    ``members``: dicts of ``model``, ``mean`` (its mean image) and ``bf16``. Returns
    ``{"members": [figures, …], "ensemble": figures}``, each as :func:`evaluate` returns them.
    ``graph`` (CUDA only): each member's forward replayed from graphs; ``graphs``: what captures
    and replays them (a CPU test's stand-in). ``per_view``: the ten-view figures also hold each
    view's own (``"per_view"``: :data:`replica.augment.VIEW_NAMES`, then each flipped), from the
    same pass: which views the average gains or loses by."""
    from tqdm import tqdm

    from .steps import ForwardRunner

    wanted = (views,) if isinstance(views, int) else tuple(views)
    if not wanted or any(v not in (1, 10) for v in wanted):
        raise ValueError(f"views: expected 1, 10 or (1, 10), got {views}")
    if per_view and 10 not in wanted:
        raise ValueError("per-view figures need the ten views")
    weights = [1 / len(members)] * len(members) if weights is None else list(weights)
    was = [m["model"].training for m in members]
    for m in members:
        m["model"].eval()
    # each mean crop on its net's device once: a copy at each batch would be a blocking one, a
    # wait for the device every batch
    crops = [augment.centre_crop_of(torch.as_tensor(m["mean"]), crop).to(m["model"].devices[0]) for m in members]
    cuda = members[0]["model"].devices[0].type == "cuda"
    runners = [ForwardRunner(m["model"], bf16=m["bf16"], graph=graph and (cuda or graphs is not None), graphs=graphs)
               for m in members]
    n, bad = 0, 0
    keys = list(range(len(members))) + (["ensemble"] if len(members) > 1 else [])  # one net: its own figures
    miss = {(k, v): 0 for k in keys for v in wanted}  # (top-1, top-5) misses, summed on the device
    view_miss = {k: 0 for k in keys}  # per_view: (10, 2) misses of each view alone
    pass_views = 10 if 10 in wanted else 1
    ds = EvalBatches(images, batch, max_batches)
    it = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=cuda,
                                     prefetch_factor=4 if workers else None)
    classes = None
    try:
        for u8, labels, b in tqdm(it, total=len(ds), desc=f"eval {'/'.join(map(str, wanted))} view(s)",
                                  disable=not progress, unit="batch", leave=False):
            bad += len(b)
            if len(u8) == 0:
                continue
            probs = [view_probs(m["model"], u8, mc, pass_views, crop, m["bf16"], forward=r)
                     for m, mc, r in zip(members, crops, runners)]
            if len(members) > 1:
                probs.append(sum(w * p.to(probs[0].device) for w, p in zip(weights, probs)))
            classes = probs[0].shape[-1]
            for k, p in zip(keys, probs):  # (B, V, classes), on the device
                for v in wanted:
                    pv = p.mean(1) if v == pass_views else p[:, 2]  # view 2: the centre, unflipped
                    miss[k, v] = miss[k, v] + topk_misses(pv, labels)  # no wait for the device: read once, below
                if per_view:
                    view_miss[k] = view_miss[k] + torch.stack([topk_misses(p[:, j], labels) for j in range(10)])
            n += len(u8)
    finally:
        for m, w in zip(members, was):
            m["model"].train(w)
    top5 = classes is None or classes >= TOP5_MIN_CLASSES

    def figures(k):
        out = {}
        for v in wanted:
            m1, m5 = miss[k, v].tolist() if torch.is_tensor(miss[k, v]) else (0, 0)
            out[f"{v}-view"] = dict(views=v, images=n, top1_err=m1 / max(n, 1),
                                    top5_err=m5 / max(n, 1) if top5 else None, skipped=bad)
        if per_view:
            each = view_miss[k].tolist() if torch.is_tensor(view_miss[k]) else [(0, 0)] * 10
            names = [*augment.VIEW_NAMES, *(f"{name}, flipped" for name in augment.VIEW_NAMES)]
            out["10-view"]["per_view"] = [dict(view=name, top1_err=m1 / max(n, 1),
                                               top5_err=m5 / max(n, 1) if top5 else None)
                                          for name, (m1, m5) in zip(names, each)]
        return out[f"{views}-view"] if isinstance(views, int) else out

    figs = [figures(k) for k in range(len(members))]
    return dict(members=figs, ensemble=figures("ensemble") if len(members) > 1 else figs[0])


def percent(err) -> str:
    """An error as a percentage, or n/a where it is not defined (top-5 with ≤ 5 classes)."""
    return "n/a" if err is None else f"{err:.2%}"
