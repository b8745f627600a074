"""The normalizations and the dropout of the 2012 net, each with a fast autograd path.

Every function here states its formula, and ``tests/test_layers.py`` checks each one against
an independent reference (forward, and ``gradcheck`` in float64).

- :func:`local_response_norm`: cross-map LRN (paper §3.3, ``cmrnorm`` in the 2012 code).
- :func:`spatial_response_norm`: the within-map 5×5 norm after layer 2 (``rnorm``; as-run only).
- :func:`dropout_noninverted`: dropout with a 0/1 mask in training and ×keep at test (§4.2).

Why custom autograd functions: ``torch.nn.LocalResponseNorm`` builds its window sum from
``pad`` + ``avg_pool3d`` and lets autograd differentiate every step, which keeps many
intermediates alive; ``tools/bench.py model`` prints how much slower that is. The backward
pass below is closed-form: with ``d = k + c·S(x²)`` and ``y = x·d^-β``,

    ∂L/∂x_i = g_i·d_i^-β − 2βc·x_i·S(g·y/d)_i

where ``S`` is the same (symmetric, zero-padded) window sum used in the forward pass. That is
two window sums and a handful of in-place elementwise passes, forward and backward together.
``fused=True`` runs the same formula as compiled, fused loops instead (below).
"""
from __future__ import annotations

import getpass
import os
import re
import tempfile
import types

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
    "fused_norms_available",
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
    ``tools/bench.py model`` prints the difference.
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


# -- fused path: the same math as one generated loop per pass (torch.compile / inductor) ---------
#
# Eager PyTorch runs each norm as ~20 memory-bound passes over its activation (forward and
# backward). Written as pure functions of channels-last (N, H, W, C) tensors, the forward and
# the backward each compile to two fused loops (C++ on CPU, Triton on CUDA). Same formula;
# tests/test_layers.py checks it against the float64 reference and the eager path. Asked for
# per call (``fused=True``; the model passes its ``fused_norms``, which ``replica train`` sets
# from the config key); if compiling fails (no C++ compiler, say), it warns once and the eager
# path runs from then on, in the whole process. Figures and what was tried: docs/performance.md.

_BROKEN: dict = {"why": None}  # why compiling failed in this process, once it has
_COMPILED: dict = {}


def fused_norms_available() -> bool:
    """False once compiling the fused norms has failed in this process (they then run eagerly)."""
    return _BROKEN["why"] is None


def _padded(t: Tensor, kind: str, size: int, groups: int) -> Tensor:
    """``t`` (N, H, W, C) zero-padded where its window reaches: channels per group, or H and W."""
    r = size // 2
    if kind == "channel":
        return F.pad(t.reshape(*t.shape[:3], groups, t.shape[3] // groups), (r, r))
    return F.pad(t, (0, 0, r, r, r, r))


def _window_of_padded(tp: Tensor, kind: str, size: int, shape) -> Tensor:
    """The window sum of the tensor that :func:`_padded` padded, back in ``shape``: in-range
    shifted slices only, so the generated loops carry no bounds masks."""
    if kind == "channel":
        n = tp.shape[-1] - (size - 1)
        s = tp[..., 0:n]
        for j in range(1, size):
            s = s + tp[..., j:j + n]
        return s.reshape(shape)
    h, w = shape[1], shape[2]
    s = tp[:, 0:h]
    for j in range(1, size):
        s = s + tp[:, j:j + h]
    u = s[:, :, 0:w]
    for j in range(1, size):
        u = u + s[:, :, j:j + w]
    return u


def _own_code(f, tag: str):
    """``f`` with a code object of its own. Dynamo keeps its compiled variants, and counts them
    against its recompile limit (8), per code object: closures made by one ``def`` share one, so
    3 layer shapes × 2 devices × 2 dtypes × a batch-size change would pass the limit, after
    which Dynamo runs the function eagerly with a warning only: the "fused" norms would then be
    the slow unfused loops. A code object per key keeps each key at 1-2 variants."""
    code = f.__code__.replace(co_name=f"{f.__name__}_{tag}")
    return types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)


_BACKEND = "inductor"  # torch.compile's backend (the tests count recompiles with "eager": no C++ compile)


def _cache_per_kernel_set() -> None:
    """A cache of compiled loops of its own while torch is held to a kernel set (ATEN_CPU_CAPABILITY).

    Inductor builds its C++ loops for that vector width, but its on-disk cache does not keep the
    two apart: on the AVX-512 development VM, loops from the cache that native runs had filled
    gave 1e35s and NaNs under ``ATEN_CPU_CAPABILITY=avx2`` (6 fused-norm tests failed; with a
    fresh cache they pass). So a held setting gets ``<torch's default cache>-<capability>``,
    unless TORCHINDUCTOR_CACHE_DIR names one. Paths as torch's own ``default_cache_dir``.
    """
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if not cap or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):
        user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}-{cap}")


_cache_per_kernel_set()  # at import: before any compile here (or compile=true's) fixes torch's cache path


def _fused_fns(kind: str, size: int, groups: int, k: float, c: float, beta: float, shape=(), dtype=None,
               device=None):
    # One compiled set per key, each with its own code objects (_own_code): a layer shape
    # (C, H, W), dtype and device. A new batch size recompiles once with a dynamic batch
    # dimension; a new key never turns another key's loops dynamic or uses up its limit.
    key = (kind, size, groups, k, c, beta, tuple(shape[1:]), str(dtype), str(device))
    if key not in _COMPILED:
        def neg_pow(d):
            if beta == 0.75:
                r = torch.rsqrt(d)
                return r * torch.sqrt(r)
            return d.pow(-beta)

        def squares(x):  # x², padded
            return _padded(x * x, kind, size, groups)

        def forward(x, sq):  # (y, d)
            d = k + c * _window_of_padded(sq, kind, size, x.shape)
            return x * neg_pow(d), d

        def inner(g, x, d):  # t = g·y/d, padded
            return _padded(g * x * neg_pow(d) / d, kind, size, groups)

        def backward(g, x, d, t):  # g·d^-β − 2βc·x·S(t)
            return g * neg_pow(d) - (2.0 * beta * c) * x * _window_of_padded(t, kind, size, x.shape)

        # Each window sum reads a padded tensor written by the loop before it: fused into one
        # loop, every tap of the window needs a bounds mask, and every output element recomputes
        # t (a division and two roots) at each tap; both cost more than the extra write
        # (docs/performance.md, "Fused norms, second try").
        tag = f"k{len(_COMPILED)}"
        _COMPILED[key] = tuple(torch.compile(_own_code(f, tag), backend=_BACKEND)
                               for f in (squares, forward, inner, backward))
    return _COMPILED[key]


def _nhwc(t: Tensor) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _nchw(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


def _fused_failed(err: Exception) -> None:
    import warnings

    _BROKEN["why"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    warnings.warn(f"fused norms unavailable ({_BROKEN['why'][:200]}); running the eager norms instead",
                  RuntimeWarning, stacklevel=3)


class _WindowNorm(torch.autograd.Function):
    """y = x · (k + c·S(x²))^-β for a symmetric window sum S (over channels or within a map)."""

    @staticmethod
    def forward(ctx, x: Tensor, kind: str, size: int, groups: int, k: float, c: float, beta: float,
                fused: bool) -> Tensor:
        ctx.spec = (kind, size, groups, c, beta)
        ctx.fused = None
        # On CPU under bf16 the generated loops are no faster than the eager path's banded
        # product (docs/performance.md), so there the fused path takes float32 only.
        if fused and fused_norms_available() and _channels_last(x) and (x.is_cuda or x.dtype == torch.float32):
            fns = _fused_fns(kind, size, groups, k, c, beta, x.shape, x.dtype, x.device)
            xl = _nhwc(x)
            try:
                y, d = fns[1](xl, fns[0](xl))
            except Exception as err:  # compiling failed: say so once, then run eager
                _fused_failed(err)
            else:
                ctx.save_for_backward(x, _nchw(d))
                ctx.fused = fns[2:]
                return _nchw(y)
        y, d, scale = _norm_forward(x, kind, size, groups, k, c, beta)
        ctx.save_for_backward(x, d, scale)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.fused is not None:
            x, d = ctx.saved_tensors
            if fused_norms_available():
                inner, backward = ctx.fused
                gl, xl, dl = _nhwc(g), _nhwc(x), _nhwc(d)
                try:
                    return (_nchw(backward(gl, xl, dl, inner(gl, xl, dl))),) + (None,) * 7
                except Exception as err:
                    _fused_failed(err)
            scale = _neg_pow(d, ctx.spec[4])
        else:
            x, d, scale = ctx.saved_tensors
        return (_norm_backward(g, x, d, scale, *ctx.spec),) + (None,) * 7


@torch.library.custom_op("replica::lrn", mutates_args=())
def _lrn_op(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """LRN as one operator, for an export only (``replica export``: ONNX's ``LRN``, whose α and
    window are torch's): what :func:`local_response_norm` becomes while
    ``torch.compiler.is_exporting()``. Eager, it is torch's own LRN, the same formula."""
    return F.local_response_norm(x, size, alpha, beta, k)


@_lrn_op.register_fake
def _(x, size, alpha, beta, k):
    return torch.empty_like(x)


def exporting() -> bool:
    """Whether torch is tracing for an export (``replica export``); False on torch < 2.5."""
    f = getattr(torch.compiler, "is_exporting", None)  # torch ≥ 2.5
    return bool(f and f())


def local_response_norm(
    x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, groups: int = 1,
    fused: bool = False,
) -> Tensor:
    """Cross-map LRN with torch's α convention, per channel group.

        b_f = a_f · (k + (α/n)·Σ_{j=max(0,f−n//2)}^{min(N−1,f+n//2)} a_j²)^(−β)

    This equals ``torch.nn.LocalResponseNorm(size, alpha, beta, k)`` applied to each of the
    ``groups`` channel blocks separately. as-run (run 145): n=5, α=1e-4 (2e-5 per square, the
    parser's ``scale /= size``, layer.py:1183), β=0.75, k=2 (``minDiv``,
    layer-params-145.cfg:140). paper-text reads the printed formula literally: α=5e-4.
    ``fused``: the same formula as compiled loops, for channels_last input in float32 (any
    dtype on CUDA); otherwise, or if compiling fails, the eager path.
    """
    if x.dim() != 4:
        raise ValueError(f"local_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels do not split into {groups} groups")
    if groups == 1 and exporting():
        return torch.ops.replica.lrn(x, size, alpha, beta, k)
    return _WindowNorm.apply(x, "channel", size, groups, k, alpha / size, beta, fused)


def spatial_response_norm(x: Tensor, size: int = 5, scale: float = 1e-3, beta: float = 0.75,
                          fused: bool = False) -> Tensor:
    """Within-map response norm (``rnorm``, ``cnorm2a/b`` of layers-145.cfg:107-117).

        out = x · (1 + (scale/size²)·Σ_{size×size window, zero-padded} x²)^(−β)

    i.e. ``x * (1 + scale*avg_pool2d(x*x, size, 1, size//2, count_include_pad=True))**-β``.
    k is hard-coded to 1 by the 7-argument kernel (cuda-convnet v1 conv_util.cu:1011).
    ``fused``: as in :func:`local_response_norm`.
    """
    if x.dim() != 4:
        raise ValueError(f"spatial_response_norm expects (N, C, H, W), got shape {tuple(x.shape)}")

    return _WindowNorm.apply(x, "spatial", size, 1, 1.0, scale / (size * size), beta, fused)


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
