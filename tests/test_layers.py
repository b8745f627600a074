"""The normalizations and dropout against formulas written out independently here."""
import os

import pytest
import torch
import torch.nn.functional as F

from replica.layers import (
    NonInvertedDropout,
    dropout_noninverted,
    local_response_norm,
    spatial_response_norm,
)

CL = torch.channels_last


def lrn_by_formula(a, n=5, alpha=1e-4, beta=0.75, k=2.0, groups=1):
    """b_f = a_f (k + α/n Σ_{j=max(0,f-2)}^{min(N-1,f+2)} a_j²)^-β, channel by channel, per group."""
    out = torch.empty_like(a)
    c = a.shape[1] // groups
    for g in range(groups):
        for f in range(c):
            lo, hi = max(0, f - n // 2), min(c - 1, f + n // 2)
            s = (a[:, g * c + lo:g * c + hi + 1] ** 2).sum(1)
            out[:, g * c + f] = a[:, g * c + f] * (k + alpha / n * s) ** (-beta)
    return out


def spatial_by_formula(x, size=5, scale=1e-3, beta=0.75):
    """out = x (1 + scale/size² Σ_{5×5 window, zero outside} x²)^-β, pixel by pixel."""
    n, c, h, w = x.shape
    r = size // 2
    sq = F.pad(x * x, (r, r, r, r))
    s = torch.zeros_like(x)
    for dy in range(size):
        for dx in range(size):
            s += sq[:, :, dy:dy + h, dx:dx + w]
    return x * (1 + scale / size**2 * s) ** (-beta)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("alpha", [1e-4, 5e-4])
def test_lrn_matches_formula(fmt, alpha):
    torch.manual_seed(0)
    x = (torch.randn(3, 12, 7, 6, dtype=torch.float64) * 60).contiguous(memory_format=fmt)
    got = local_response_norm(x, 5, alpha, 0.75, 2.0)
    torch.testing.assert_close(got, lrn_by_formula(x, alpha=alpha))
    assert got.is_contiguous(memory_format=fmt)


def test_lrn_equals_torch_lrn_per_group():
    torch.manual_seed(1)
    x = torch.randn(2, 96, 9, 9) * 40
    ref = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    want = torch.cat([ref(x[:, :48]), ref(x[:, 48:])], 1)
    for fmt in (torch.contiguous_format, CL):
        got = local_response_norm(x.contiguous(memory_format=fmt), 5, 1e-4, 0.75, 2.0, groups=2)
        # float32, two implementations (torch pools x² through avg_pool3d): ~80 ulps relative
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lrn_window_stays_inside_a_tower():
    """Channel 47 is the last of tower a's 48 maps: changing it moves 45-47, never 48."""
    torch.manual_seed(2)
    x = torch.randn(2, 96, 5, 5) * 50
    y0 = local_response_norm(x, groups=2)
    x2 = x.clone()
    x2[:, 47] *= 3.0
    y1 = local_response_norm(x2, groups=2)
    changed = (y1 - y0).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [45, 46, 47]
    # one 96-map window would have reached across: channels 48 and 49 would have changed
    z0, z1 = local_response_norm(x, groups=1), local_response_norm(x2, groups=1)
    assert ((z1 - z0).abs().amax(dim=(0, 2, 3)) > 0).nonzero().flatten().tolist() == [45, 46, 47, 48, 49]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_lrn_gradcheck(fmt):
    torch.manual_seed(3)
    x = (torch.randn(2, 8, 4, 3, dtype=torch.float64) * 30).contiguous(memory_format=fmt).requires_grad_()
    # a large α makes the cross-channel term of the gradient matter at these magnitudes
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 5, 1e-2, 0.75, 2.0, groups=2), (x,))


def test_lrn_gradient_matches_autograd_of_formula():
    torch.manual_seed(4)
    x = torch.randn(2, 10, 5, 5, dtype=torch.float64) * 40
    g = torch.randn_like(x)
    a = x.clone().requires_grad_()
    local_response_norm(a, 5, 1e-3, 0.75, 2.0).backward(g)
    b = x.clone().requires_grad_()
    lrn_by_formula(b, alpha=1e-3).backward(g)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_bfloat16_path_matches_formula(fmt, groups, monkeypatch):
    """Under bf16 autocast the window sum is a banded matrix product: same values, same gradient
    (to bf16 precision), and the window still stops at the tower boundary.

    Does not depend on native bf16: bf16 tensors are computed by oneDNN's emulation where the CPU
    has no AVX512_BF16, and the bounds (1-2% of the largest value) are bf16's own 8-bit precision."""
    import replica.layers as layers

    def no_shifts(*a, **k):
        raise AssertionError("bf16 input took the shifted-add window sum")

    monkeypatch.setattr(layers, "_shift_sum", no_shifts)  # the product path must be the one that runs
    torch.manual_seed(5)
    x = (torch.randn(3, 24, 6, 5) * 60).to(torch.bfloat16).contiguous(memory_format=fmt)
    g = torch.randn(x.shape).to(torch.bfloat16)
    a = x.clone().requires_grad_()
    y = local_response_norm(a, 5, 1e-2, 0.75, 2.0, groups=groups)
    y.backward(g)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=fmt)
    ref_in = x.double().requires_grad_()
    want = lrn_by_formula(ref_in, alpha=1e-2, groups=groups)
    want.backward(g.double())
    assert (y.double() - want).abs().max() <= 0.01 * want.abs().max()
    assert (a.grad.double() - ref_in.grad).abs().max() <= 0.02 * ref_in.grad.abs().max()
    # the cross-channel term is large here: a per-channel-only norm would miss by far more
    assert (want - lrn_by_formula(ref_in.detach(), n=1, alpha=1e-2 / 5, groups=groups)).abs().max() > 0.1 * want.abs().max()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_spatial_norm_matches_formula_and_avg_pool(fmt):
    torch.manual_seed(5)
    x = (torch.randn(2, 4, 8, 7, dtype=torch.float64) * 50).contiguous(memory_format=fmt)
    got = spatial_response_norm(x)
    torch.testing.assert_close(got, spatial_by_formula(x))
    pooled = x * (1 + 1e-3 * F.avg_pool2d(x * x, 5, 1, 2, count_include_pad=True)) ** -0.75  # docs/spec.md §1
    torch.testing.assert_close(got, pooled)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
def test_spatial_norm_gradcheck(fmt):
    torch.manual_seed(6)
    x = (torch.randn(2, 3, 6, 5, dtype=torch.float64) * 30).contiguous(memory_format=fmt).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: spatial_response_norm(t, 5, 1.0, 0.75), (x,))


def test_dropout_is_not_inverted():
    torch.manual_seed(7)
    x = torch.rand(200, 500) + 0.5
    y = dropout_noninverted(x, 0.5, training=True)
    kept = y != 0
    assert 0.47 < kept.float().mean().item() < 0.53
    torch.testing.assert_close(y[kept], x[kept])  # survivors are not rescaled by 1/keep
    torch.testing.assert_close(dropout_noninverted(x, 0.5, training=False), x * 0.5)


def test_dropout_module_eval_and_off():
    x = torch.rand(4, 10) + 1
    m = NonInvertedDropout(0.5).eval()
    torch.testing.assert_close(m(x), 0.5 * x)
    assert torch.equal(NonInvertedDropout(1.0).train()(x), x)


def test_lrn_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N, C, H, W"):
        local_response_norm(torch.randn(3, 4))
    with pytest.raises(ValueError, match="groups"):
        local_response_norm(torch.randn(1, 5, 2, 2), groups=2)


# -- the fused (compiled) norms ------------------------------------------------------------------

@pytest.fixture
def fused(monkeypatch):
    """replica.layers, with any earlier compile failure forgotten (and restored after the test)."""
    import replica.layers as layers

    monkeypatch.setitem(layers._BROKEN, "why", None)
    return layers


def _no_eager(*a, **k):
    raise AssertionError("the eager norm ran")


FUSED_CASES = {  # name: (norm, float64 reference, shape); α and scale large enough that the window matters
    "lrn": (lambda t: local_response_norm(t, 5, 1e-2, 0.75, 2.0, fused=True),
            lambda t: lrn_by_formula(t, alpha=1e-2), (3, 12, 7, 6)),
    "lrn-2-groups": (lambda t: local_response_norm(t, 5, 1e-2, 0.75, 2.0, groups=2, fused=True),
                     lambda t: lrn_by_formula(t, alpha=1e-2, groups=2), (2, 16, 5, 6)),
    "spatial": (lambda t: spatial_response_norm(t, 5, 1e-3, 0.75, fused=True),
                lambda t: spatial_by_formula(t, 5, 1e-3, 0.75), (2, 6, 8, 7)),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_norms_match_formula(case, fused, monkeypatch, cxx):
    """float32 channels_last input: the compiled loops run (the eager path is made to fail), and
    value and gradient match the float64 formula."""
    monkeypatch.setattr(fused, "_norm_forward", _no_eager)
    monkeypatch.setattr(fused, "_norm_backward", _no_eager)
    norm, formula, shape = FUSED_CASES[case]
    torch.manual_seed(7)
    x = (torch.randn(shape) * 60).contiguous(memory_format=CL)
    g = torch.randn(shape)
    a = x.clone().requires_grad_()
    y = norm(a)
    y.backward(g)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    ref = x.double().requires_grad_()
    want = formula(ref)
    want.backward(g.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(a.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())
    # the window term is large here: a norm without it would miss by far more than the tolerance
    assert (want - x.double()).abs().max() > 0.1 * want.abs().max()


def test_a_held_kernel_set_compiles_into_a_cache_of_its_own(fused, monkeypatch):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: loops cached natively gave 1e35s and NaNs when
    loaded so (seen here); held, the compiled loops go to a cache of their own."""
    import tempfile

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    fused._cache_per_kernel_set()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # not held: torch's own default
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    fused._cache_per_kernel_set()
    got = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    assert got.startswith(os.path.join(tempfile.gettempdir(), "torchinductor_")) and got.endswith("-avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/chosen")
    fused._cache_per_kernel_set()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/chosen"  # the user's choice stands


def test_fused_norms_skip_nchw_and_cpu_bf16(fused, monkeypatch):
    """Asked for the fused path, NCHW input and bfloat16 on the CPU (no faster there) still take
    the eager path."""
    def no_compile(*a, **k):
        raise AssertionError("the fused path was taken")

    monkeypatch.setattr(fused, "_fused_fns", no_compile)
    x = torch.randn(2, 12, 5, 5) * 60
    torch.testing.assert_close(local_response_norm(x, 5, 1e-2, fused=True), lrn_by_formula(x, alpha=1e-2))
    xb = x.to(torch.bfloat16).contiguous(memory_format=CL)
    assert local_response_norm(xb, 5, 1e-2, fused=True).dtype == torch.bfloat16


def test_fused_norms_fall_back_to_eager_when_compiling_fails(fused, monkeypatch):
    """No compiler (or any compile error): one warning, then the eager path gives the same answer."""
    calls = []

    def broken(*a, **k):
        def fail(*t):
            calls.append(1)
            raise RuntimeError("C++ compile error: no working compiler")
        return fail, fail, fail, fail

    monkeypatch.setattr(fused, "_fused_fns", broken)
    x = (torch.randn(2, 12, 5, 5) * 60).contiguous(memory_format=CL).requires_grad_()
    with pytest.warns(RuntimeWarning, match="fused norms unavailable.*no working compiler"):
        y = local_response_norm(x, 5, 1e-2, fused=True)
    torch.testing.assert_close(y, lrn_by_formula(x.detach(), alpha=1e-2))
    y.sum().backward()
    assert x.grad is not None and not fused.fused_norms_available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only; later calls go straight to the eager path
        local_response_norm(x.detach(), 5, 1e-2, fused=True)
    assert len(calls) == 1


def test_fused_norms_backward_failure_falls_back_mid_step(fused, monkeypatch, cxx):
    """The forward compiled, the backward's compile fails: the step still finishes, eagerly."""
    real = fused._fused_fns

    def half_broken(*a, **k):
        squares, forward = real(*a, **k)[:2]

        def fail(*t):
            raise RuntimeError("backward compile failed")
        return squares, forward, fail, fail

    monkeypatch.setattr(fused, "_fused_fns", half_broken)
    x = (torch.randn(3, 12, 7, 6) * 60).contiguous(memory_format=CL)  # the "lrn" case's shape: compiled already
    a = x.clone().requires_grad_()
    g = torch.randn(x.shape)
    y = local_response_norm(a, 5, 1e-2, fused=True)  # forward compiled
    with pytest.warns(RuntimeWarning, match="backward compile failed"):
        y.backward(g)
    ref = x.double().requires_grad_()
    lrn_by_formula(ref, alpha=1e-2).backward(g.double())
    torch.testing.assert_close(a.grad.double(), ref.grad, rtol=1e-4, atol=1e-5 * ref.grad.abs().max().item())
    assert not fused.fused_norms_available()


def test_fused_norms_stay_within_dynamos_recompile_limit(fused, monkeypatch):
    """What a two-GPU bf16 run asks of the compiled norms: 3 layer shapes (layer-1 LRN, layer-2
    LRN, layer-2 spatial norm) × 2 dtypes on one device and a key on the other, at 2 batch sizes.
    Each key gets its own code objects, so none passes Dynamo's recompile limit (8 per code
    object), where Dynamo would fall back to running the loops eagerly with only a warning
    (with the code objects shared, these 7 keys pass it: checked). Counted with Dynamo's "eager"
    backend (the same caching and guards, no C++ compile), a limit hit made fatal."""
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    monkeypatch.setattr(fused, "_BACKEND", "eager")
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    layers = [("channel", 5, 1, 2.0, 2e-5, (48, 13, 13)), ("channel", 5, 1, 2.0, 2e-5, (128, 7, 7)),
              ("spatial", 5, 1, 1.0, 1e-3 / 25, (128, 7, 7))]
    # the keys a two-device run makes (the tensors stay on the CPU): every layer and dtype on the
    # first device; on the second, one layer in one dtype shows that the device is in the key
    # (the others are the same loops again: 5 s more of tracing on 2 cores)
    keys = [(dev, dtype, layer) for dev in ("cuda:0",) for dtype in (torch.float32, torch.bfloat16)
            for layer in layers] + [("cuda:1", torch.float32, layers[0])]
    for batch in (2, 3):
        for device, dtype, (kind, size, groups, k, c, shape) in keys:
            x = torch.randn(batch, *shape).to(dtype)
            fns = fused._fused_fns(kind, size, groups, k, c, 0.75, x.shape, dtype, device)
            xl = fused._nhwc(x)
            y, d = fns[1](xl, fns[0](xl))
            fns[3](xl, xl, d, fns[2](xl, xl, d))
    assert len(fused._COMPILED) == 3 * 2 + 1
    codes = {id(f._torchdynamo_orig_callable.__code__): f._torchdynamo_orig_callable.__code__
             for fns in fused._COMPILED.values() for f in fns}
    assert len(codes) == 4 * 7  # a code object per function per key
    entries = [len(_debug_get_cache_entry_list(code)) for code in codes.values()]
    assert max(entries) <= 2, entries  # static, then one dynamic-batch variant
    assert fused.fused_norms_available()
    torch._dynamo.reset()
