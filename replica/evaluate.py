"""Top-1 and top-5 error, one view and ten views. Never touches optimizer state."""
from __future__ import annotations

import numpy as np
import torch

from . import augment
from .runtime import autocast


def topk_errors(probs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """Number of top-1 and top-5 misses in a batch of class probabilities."""
    k = min(5, probs.shape[1])
    top = probs.topk(k, dim=1).indices  # (B, k)
    hit = top == labels[:, None]
    return int((~hit[:, 0]).sum()), int((~hit.any(1)).sum())


@torch.no_grad()
def predict_probs(model, u8: torch.Tensor, mean_crop: torch.Tensor, views: int = 1, crop: int = augment.CROP,
                  bf16: bool = False):
    """Softmax probabilities (B, classes); with 10 views, the mean of the views' probabilities.

    ``bf16``: the forward pass under bfloat16 autocast, as a run trained with ``bf16=true`` was;
    the softmax and the averaging stay in float32.
    """
    dev = model.devices[0]
    u8 = u8.to(dev)
    mean_crop = mean_crop.to(dev)
    if views == 1:
        with autocast(model.devices, bf16):
            logits = model(augment.centre_view(u8, mean_crop, crop))
        return torch.softmax(logits.float(), 1)
    x = augment.ten_views(u8, mean_crop, crop)  # (B, 10, 3, h, w)
    b = x.shape[0]
    with autocast(model.devices, bf16):
        logits = model(x.flatten(0, 1))
    p = torch.softmax(logits.float(), 1)  # (B·10, classes)
    return p.view(b, 10, -1).mean(1)  # average probabilities, not logits (src/layer.cu:1809-1822)


@torch.no_grad()
def evaluate(model, images, mean_image, views: int = 1, batch: int = 64, max_batches: int | None = None,
             crop: int = augment.CROP, progress: bool = False, bf16: bool = False) -> dict:
    """top-1 / top-5 error of ``model`` on ``images`` (a store or file images); ``bf16``: see
    :func:`predict_probs`."""
    from tqdm import tqdm

    if views not in (1, 10):
        raise ValueError(f"views: expected 1 or 10, got {views}")
    was = model.training
    model.eval()
    mean_crop = augment.centre_crop_of(torch.as_tensor(mean_image), crop)
    n = e1 = e5 = 0
    bad = []
    starts = list(range(0, len(images), batch))[: max_batches or None]
    try:
        for a in tqdm(starts, desc=f"eval {views} view{'s' if views > 1 else ''}", disable=not progress,
                      unit="batch", leave=False):
            u8, labels, b = images.batch(np.arange(a, min(a + batch, len(images))))
            bad += b
            if len(u8) == 0:
                continue
            probs = predict_probs(model, torch.from_numpy(u8), mean_crop, views, crop, bf16)
            m1, m5 = topk_errors(probs.cpu(), torch.as_tensor(labels))
            n, e1, e5 = n + len(u8), e1 + m1, e5 + m5
    finally:
        model.train(was)
    return dict(views=views, images=n, top1_err=e1 / max(n, 1), top5_err=e5 / max(n, 1), skipped=len(bad))
