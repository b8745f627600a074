"""The normalizations and the dropout of the 2012 net, each with a fast autograd path.

Every function here states its formula, and ``tests/test_layers.py`` checks each one against
an independent reference (forward, and ``gradcheck`` in float64).

- :func:`local_response_norm`: cross-map LRN (paper §3.3, ``cmrnorm`` in the 2012 code).
- :func:`spatial_response_norm`: the within-map 5×5 norm after layer 2 (``rnorm``; as-run only).
- :func:`dropout_noninverted`: dropout with a 0/1 mask in training and ×keep at test (§4.2).

Why custom autograd functions: ``torch.nn.LocalResponseNorm`` builds its window sum from
``pad`` + ``avg_pool3d`` and lets autograd differentiate every step, which keeps many
intermediates alive; ``tools/bench_model.py`` prints how much slower that is. The backward
pass below is closed-form: with ``d = k + c·S(x²)`` and ``y = x·d^-β``,

    ∂L/∂x_i = g_i·d_i^-β − 2βc·x_i·S(g·y/d)_i

where ``S`` is the same (symmetric, zero-padded) window sum used in the forward pass. That is
two window sums and a handful of in-place elementwise passes, forward and backward together.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "local_response_norm",
    "spatial_response_norm",
    "dropout_noninverted",
    "LocalResponseNorm",
    "SpatialResponseNorm",
    "NonInvertedDropout",
]


def _channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _as_format_of(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in ``like``'s memory format: elementwise ops on mixed formats take a slow path."""
    fmt = torch.channels_last if _channels_last(like) else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def _shift_sum(t: Tensor, size: int, dim: int, base: float = 0.0) -> Tensor:
    """base + Σ_{j=i-r}^{i+r} t_j along ``dim``, zero outside (r = size // 2): 2r shifted adds."""
    s = t + base if base else t.clone()
    n = t.shape[dim]
    for k in range(1, min(size // 2, n - 1) + 1):
        s.narrow(dim, k, n - k).add_(t.narrow(dim, 0, n - k))
        s.narrow(dim, 0, n - k).add_(t.narrow(dim, k, n - k))
    return s


def _band(c: int, size: int, like: Tensor) -> Tensor:
    """The (c, c) 0/1 matrix with ones where |i − j| ≤ size // 2: a window sum as a product."""
    i = torch.arange(c, device=like.device)
    return ((i[:, None] - i[None, :]).abs() <= size // 2).to(like.dtype)


def _band_sum(t: Tensor, size: int, dim: int, base: float = 0.0) -> Tensor:
    """The same sum as :func:`_shift_sum`, as one matrix product with :func:`_band` (symmetric).

    For bfloat16/float16 (autocast): elementwise adds in those types are slow on CPU (each one
    converts), while a matrix product runs natively and accumulates in float32.
    ``tools/bench_model.py`` prints the difference.
    """
    band = _band(t.shape[dim], size, t)
    s = t @ band if dim == t.dim() - 1 else band @ t
    return s.add_(base) if base else s


def _channel_window_sum(x: Tensor, size: int, groups: int, base: float = 0.0) -> Tensor:
    """base + Σ_{j=f-r}^{f+r} x_j over channels, clipped at each group's edges (r = size // 2).

    ``x`` is (N, C, H, W); the C channels are ``groups`` independent blocks (one per tower),
    and a window never reaches across a block boundary. Works in either memory format.
    Float32/64: shifted adds, exact. Half types: a banded matrix product (see :func:`_band_sum`).
    """
    n, c, h, w = x.shape
    cg = c // groups
    wsum = _band_sum if x.dtype in (torch.bfloat16, torch.float16) else _shift_sum
    if _channels_last(x):
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w * groups, cg)  # channels innermost
        return wsum(rows, size, 1, base).view(n, h, w, c).permute(0, 3, 1, 2)  # NCHW view, channels_last
    planes = x.contiguous().view(n, groups, cg, h * w)  # (N, G, C/G, HW): a shift moves whole maps
    return wsum(planes, size, 2, base).view(n, c, h, w)


def _spatial_window_sum(x: Tensor, size: int, base: float = 0.0) -> Tensor:
    """base + Σ over a size×size window of each map, zero-padded: a depthwise conv with ones."""
    c = x.shape[1]
    box = torch.ones(c, 1, size, size, dtype=x.dtype, device=x.device)
    s = F.conv2d(x, box, padding=size // 2, groups=c)
    return s.add_(base) if base else s


def _neg_pow(d: Tensor, beta: float) -> Tensor:
    """d^-β; for the net's β = 0.75 as rsqrt(d)·√rsqrt(d), three cheap passes instead of pow."""
    if beta == 0.75:
        r = torch.rsqrt(d)
        return r.mul_(torch.sqrt(r))
    return d.pow(-beta)


def _window(t: Tensor, kind: str, size: int, groups: int, base: float) -> Tensor:
    if kind == "channel":
        return _channel_window_sum(t, size, groups, base)
    return _spatial_window_sum(t, size, base)


def _norm_forward(x: Tensor, kind: str, size: int, groups: int, k: float, c: float, beta: float):
    """(y, d, d^-β) with d = k + c·S(x²) and y = x·d^-β."""
    d = _window(torch.addcmul(x.new_zeros(()), x, x, value=c), kind, size, groups, k)
    scale = _neg_pow(d, beta)
    return x * scale, d, scale


def _norm_backward(g: Tensor, x: Tensor, d: Tensor, scale: Tensor, kind: str, size: int, groups: int,
                   c: float, beta: float) -> Tensor:
    """∂L/∂x = g·d^-β − 2βc·x·S(g·y/d)."""
    gs = _as_format_of(g, x) * scale  # g·d^-β
    t = _window((gs * x).div_(d), kind, size, groups, 0.0).mul_(x)  # x·S(g·y/d)
    return gs.add_(t, alpha=-2.0 * beta * c)


class _WindowNorm(torch.autograd.Function):
    """y = x · (k + c·S(x²))^-β for a symmetric window sum S (over channels or within a map)."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, size: int, groups: int, k: float, c: float, beta: float) -> Tensor:
        y, d, scale = _norm_forward(x, kind, size, groups, k, c, beta)
        ctx.save_for_backward(x, d, scale)
        ctx.spec = (kind, size, groups, c, beta)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, d, scale = ctx.saved_tensors
        return (_norm_backward(g, x, d, scale, *ctx.spec),) + (None,) * 6


def local_response_norm(
    x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, groups: int = 1
) -> Tensor:
    """Cross-map LRN with torch's α convention, per channel group.

        b_f = a_f · (k + (α/n)·Σ_{j=max(0,f−n//2)}^{min(N−1,f+n//2)} a_j²)^(−β)

    This equals ``torch.nn.LocalResponseNorm(size, alpha, beta, k)`` applied to each of the
    ``groups`` channel blocks separately. as-run (run 145): n=5, α=1e-4 (2e-5 per square, the
    parser's ``scale /= size``, layer.py:1183), β=0.75, k=2 (``minDiv``,
    layer-params-145.cfg:140). paper-text reads the printed formula literally: α=5e-4.
    """
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")

    return _WindowNorm.apply(x, "channel", size, groups, k, alpha / size, beta)


def spatial_response_norm(x: Tensor, size: int = 5, scale: float = 1e-3, beta: float = 0.75) -> Tensor:
    """Within-map response norm (``rnorm``, ``cnorm2a/b`` of layers-145.cfg:107-117).

        out = x · (1 + (scale/size²)·Σ_{size×size window, zero-padded} x²)^(−β)

    i.e. ``x * (1 + scale*avg_pool2d(x*x, size, 1, size//2, count_include_pad=True))**-β``.
    k is hard-coded to 1 by the 7-argument kernel (cuda-convnet v1 conv_util.cu:1011).
    """
    if x.dim() != 4:
        raise ValueError(f"spatial_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")

    return _WindowNorm.apply(x, "spatial", size, 1, 1.0, scale / (size * size), beta)


def dropout_noninverted(x: Tensor, keep: float = 0.5, training: bool = True, generator=None) -> Tensor:
    """Dropout as the paper and the 2012 ``hs`` layer do it (src/layer.cu:1126-1135).

    Training: ``x · m`` with m ~ Bernoulli(keep), no 1/keep rescale. Test: ``x · keep``.
    torch's ``nn.Dropout`` is inverted instead, which trains like 2× init and 4× lr on the
    next layer's weights.
    """
    if not training:
        return x * keep
    mask = torch.empty_like(x).bernoulli_(keep, generator=generator)
    return x * mask


class LocalResponseNorm(nn.Module):
    """Module form of :func:`local_response_norm`."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, groups: int = 1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: Tensor) -> Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


class SpatialResponseNorm(nn.Module):
    """Module form of :func:`spatial_response_norm`."""

    def __init__(self, size: int = 5, scale: float = 1e-3, beta: float = 0.75):
        super().__init__()
        self.size, self.scale, self.beta = size, scale, beta

    def forward(self, x: Tensor) -> Tensor:
        return spatial_response_norm(x, self.size, self.scale, self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, beta={self.beta}"


class NonInvertedDropout(nn.Module):
    """Module form of :func:`dropout_noninverted`; ``keep=1`` turns it off entirely."""

    def __init__(self, keep: float = 0.5):
        super().__init__()
        self.keep = keep

    def forward(self, x: Tensor) -> Tensor:
        if self.keep >= 1.0:
            return x
        return dropout_noninverted(x, self.keep, self.training)

    def extra_repr(self) -> str:
        return f"keep={self.keep}"
