"""Colour specificity of conv1 kernels (Fig. 3's measure), a pure function of the weights.

Per kernel w (3×h×w):

    colour specificity = 1 − 3·Σ_pixels m² / Σ w²,   m = the per-pixel mean over R, G, B

the fraction of the kernel's energy off the achromatic (grey) axis: 0 for a grey kernel, 1 for
a kernel whose channels cancel at every pixel. ``replica.filters`` draws and summarizes it;
the training loop records each tower's median every epoch (a few milliseconds).
"""
from __future__ import annotations

import numpy as np
import torch


def colour_specificity(kernels) -> np.ndarray:
    """(K, 3, h, w) kernels → (K,) fraction of energy off the grey axis."""
    w = torch.as_tensor(kernels).detach().to("cpu", torch.float64)
    m = w.mean(1)  # (K, h, w): the achromatic part
    total = w.square().sum((1, 2, 3))
    grey = 3 * m.square().sum((1, 2))
    return (1 - grey / total.clamp_min(1e-30)).numpy()


def tower_medians(model) -> dict:
    """Each tower's median conv1 colour specificity: {"a": …, "b": …} (one tower: "a" only)."""
    out = {}
    for t in ("a", "b"):
        tower = getattr(model, f"tower_{t}", None)
        if tower is not None:
            out[t] = float(np.median(colour_specificity(tower.conv1.weight)))
    return out
