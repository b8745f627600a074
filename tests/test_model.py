"""The model: sizes, parameter counts, connectivity, init, and equivalence to a grouped reference."""

import pytest
import torch
import torch.nn.functional as F

import replica.model as model_mod
from replica import AlexNet, ReplicaError, count_parameters
from replica.model import output_sizes

def needs_cuda(f):
    """Marked ``cuda`` (``pytest -m cuda`` selects them; tools/gpu_check.sh runs them) and skipped without one."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(f))


def images(n=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 224, 224, generator=g) * 50).to(dtype)  # mean-subtracted 0–255 scale


# ---------------------------------------------------------------------------------------------
# An independent formulation: one device, conv2/4/5 grouped, conv3 and fc dense (Caffe's form),
# torch's own LocalResponseNorm on each half, the spatial norm through avg_pool2d.


def grouped_reference(p, x, preset="as-run", norm=True, overlap=True, dropout=True, six_conv=False):
    """Eval-mode logits of the two-tower net from a dict of parameters (tower_a.* / tower_b.*)."""
    def cat(name):
        return torch.cat([p[f"tower_a.{name}"], p[f"tower_b.{name}"]])

    alpha = 5e-4 if preset == "paper-text" else 1e-4
    caffe = preset == "caffe"  # Caffe's bvlc_alexnet: k = 1, the window across all maps, no pad, ceil pools
    lrn = torch.nn.LocalResponseNorm(5, alpha=alpha, beta=0.75, k=1.0 if caffe else 2.0)

    def halves(h):  # LRN never crosses from tower a's maps into tower b's (except in Caffe's net)
        if caffe:
            return lrn(h)
        c = h.shape[1] // 2
        return torch.cat([lrn(h[:, :c]), lrn(h[:, c:])], 1)

    k, s, ceil = (3, 2, caffe) if overlap else (2, 2, True)
    pool = lambda h: F.max_pool2d(h, k, s, ceil_mode=ceil)
    pad2, pad5 = (2, 1) if overlap else (1, 0)
    keep = 0.5 if dropout else 1.0

    h = F.conv2d(x if caffe else F.pad(x, (0, 3, 0, 3)), cat("conv1.weight"), cat("conv1.bias"), stride=4)
    if not norm:
        h = pool(F.relu(h))
    elif preset == "as-run":
        h = F.relu(pool(halves(h)))
    else:
        h = pool(halves(F.relu(h)))
    h = F.relu(F.conv2d(h, cat("conv2.weight"), cat("conv2.bias"), padding=pad2, groups=2))
    if norm:
        h = halves(h)
        if preset == "as-run":
            h = h * (1 + 1e-3 * F.avg_pool2d(h * h, 5, 1, 2, count_include_pad=True)) ** -0.75
    h = pool(h)
    h = F.relu(F.conv2d(h, cat("conv3.weight"), cat("conv3.bias"), padding=1))
    h = F.relu(F.conv2d(h, cat("conv4.weight"), cat("conv4.bias"), padding=1, groups=2))
    h = pool(F.relu(F.conv2d(h, cat("conv5.weight"), cat("conv5.bias"), padding=pad5, groups=2)))
    if six_conv:  # run 146 (layers-146-2012-2011.cfg): conv6 over both towers' pool5, 3×3 pad 1, ReLU
        h = F.relu(F.conv2d(h, cat("conv6.weight"), cat("conv6.bias"), padding=1))
    h = F.relu(F.linear(h.flatten(1), cat("fc6.weight"), cat("fc6.bias"))) * keep
    h = F.relu(F.linear(h, cat("fc7.weight"), cat("fc7.bias"))) * keep
    return F.linear(h, p["fc8.weight"], p["fc8.bias"])


@pytest.mark.parametrize("preset,norm,overlap,variant", [
    ("as-run", True, True, "two-tower"), ("paper-text", True, True, "two-tower"), ("as-run", False, True, "two-tower"),
    ("as-run", True, False, "two-tower"), ("caffe", True, True, "two-tower"), ("as-run", True, True, "six-conv"),
])
def test_matches_grouped_reference_logits_and_gradients(preset, norm, overlap, variant):
    torch.manual_seed(0)
    m = AlexNet(10, devices="cpu", preset=preset, norm=norm, overlap=overlap, variant=variant).double().eval()
    x = images(2, dtype=torch.float64)
    if preset == "caffe":  # a 227 crop, and activations where the window's k = 1 term does not dominate
        x = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="replicate") * 4
    out = m(x)
    out.square().sum().backward()
    params = {k: v.detach().clone().requires_grad_() for k, v in m.named_parameters()}
    ref = grouped_reference(params, x, preset, norm, overlap, six_conv=variant == "six-conv")
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, msg=lambda s: f"{name}: {s}")


def test_the_caffe_preset_lrn_crosses_the_towers_and_the_reference_can_tell(monkeypatch):
    """Within-tower LRN in the caffe preset gives other logits: the reference sees the boundary."""
    torch.manual_seed(0)
    m = AlexNet(10, devices=("cpu", "cpu"), preset="caffe", width=0.25).double().eval()
    with torch.no_grad():  # He's init, biases 0: activations keep their scale, α/n·Σa² near k = 1
        for name, p in m.named_parameters():
            p.normal_(0, (2 / p[0].numel()) ** 0.5) if p.dim() > 1 else p.zero_()
    x = torch.nn.functional.pad(images(2, dtype=torch.float64), (0, 3, 0, 3), mode="replicate")
    params = {k: v.detach() for k, v in m.named_parameters()}
    calls, real = [], model_mod.cross
    monkeypatch.setattr(model_mod, "cross", lambda t, d: calls.append(tuple(t.shape)) or real(t, d))
    with torch.no_grad():
        ref, out = grouped_reference(params, x, "caffe"), m(x)
        torch.testing.assert_close(out, ref)
    # the boundary maps go through the one cross-device helper, 2 each way after conv1 and conv2
    assert sorted(s for s in calls if s[2:] in ((55, 55), (27, 27))) == [(2, 2, 27, 27)] * 2 + [(2, 2, 55, 55)] * 2
    assert len(calls) == 9 + 4  # the two-tower joins (input, conv3, fc6, fc7 both ways, fc8), and those 4
    monkeypatch.setattr(model_mod, "cross", real)
    with torch.no_grad():
        monkeypatch.setattr(type(m.opts), "lrn_across_towers", property(lambda self: False))
        inside = m(x)
    assert (inside - ref).abs().max() > 1e-3 * ref.abs().max()


def test_one_device_and_two_devices_agree_through_the_cross_helper(monkeypatch):
    calls = []
    real = model_mod.cross

    def counting_cross(x, device):
        calls.append((tuple(x.shape), str(device)))
        return real(x, device)

    monkeypatch.setattr(model_mod, "cross", counting_cross)
    torch.manual_seed(1)
    one = AlexNet(10, devices="cpu")
    two = AlexNet(10, devices=("cpu", "cpu"))
    assert list(one.state_dict()) == list(two.state_dict())
    two.load_state_dict(one.state_dict())
    x = images(3)

    calls.clear()
    one.eval(), two.eval()
    torch.testing.assert_close(one(x), two(x))
    # input ×2, conv3 ×2, fc6 ×2, fc7 ×2, fc8 ×1: every join passes through cross()
    assert len(calls) == 2 * 9
    shapes = sorted({s for s, _ in calls})
    assert shapes == sorted({(3, 3, 227, 227), (3, 128, 13, 13), (3, 4608), (3, 2048)})  # input padded once

    one.train(), two.train()
    for m in (one, two):
        torch.manual_seed(7)  # the same dropout masks
        F.cross_entropy(m(x), torch.tensor([1, 2, 3])).backward()
    for (name, p), q in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda s: f"{name}: {s}")


def test_parameter_counts():
    assert count_parameters(AlexNet(devices="cpu")) == 60_965_224
    assert count_parameters(AlexNet(devices="cpu", preset="paper-text")) == 60_965_224
    half = AlexNet(devices="cpu", variant="one-gpu-half")
    assert count_parameters(half) == 59_798_312
    assert half.tower_b is None
    assert count_parameters(AlexNet(10, devices="cpu")) == 60_965_224 - 990 * 4097


@pytest.mark.parametrize("variant", ["two-tower", "one-gpu-half"])
def test_a_narrow_net_is_the_same_net_with_fewer_filters(variant):
    """width scales every layer's filters and units (at least 1): the same layers, connectivity
    and sizes, counted here from the layer sizes written out (not from the model's code)."""
    half = variant == "one-gpu-half"
    full = AlexNet(devices="cpu", variant=variant)
    assert count_parameters(AlexNet(devices="cpu", variant=variant, width=1)) == count_parameters(full)
    m = AlexNet(10, devices="cpu", variant=variant, width=1 / 16, init="caffe")
    c1, c2, c3, c4, c5, fc = (3, 8, 12, 12, 16, 256) if half else (3, 8, 12, 12, 8, 128)  # 48/16, 128/16, ...
    towers = 1 if half else 2
    conv3_in = c2 * towers  # two towers: conv3 reads both (the cross-GPU link)
    per_tower = ((3 * 121 + 1) * c1 + (c1 * 25 + 1) * c2 + (conv3_in * 9 + 1) * c3 + (c3 * 9 + 1) * c4
                 + (c4 * 9 + 1) * c5 + (towers * c5 * 36 + 1) * fc + (towers * fc + 1) * fc)
    assert count_parameters(m) == towers * per_tower + (towers * fc + 1) * 10
    assert (m.tower_b is None) == half
    for overlap in (True, False):
        m = AlexNet(10, devices="cpu", variant=variant, width=1 / 16, overlap=overlap)
        assert m(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    with pytest.raises(ReplicaError, match="width: expected a positive number"):
        AlexNet(devices="cpu", width=0)


def _shapes(m, x):
    seen = {}
    hooks = []
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6"):
        layer = getattr(m.tower_a, name, None)
        if layer is None:
            continue
        hooks.append(layer.register_forward_hook(
            lambda mod, i, o, name=name: seen.update({name + "_in": tuple(i[0].shape[1:]), name: tuple(o.shape[1:])})))
    m.eval()
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("image", [224, 228])
def test_output_sizes_are_what_torchs_layers_give(overlap, image):
    """output_sizes reads NetOptions' pools and pads, rounding as the pools do: against torch's
    own convolutions and pools on the zero-extended input. At 228 the first map is 56, where
    rounding up and down differ (the sizes once rounded up whatever the pool did)."""
    from replica.config import NetOptions

    net = NetOptions(overlap=overlap)
    (k, stride, up), (p2, p5) = net.pool, net.conv_pads
    pool = lambda t: F.max_pool2d(t, k, stride, ceil_mode=up)  # noqa: E731
    conv = lambda t, f, p: F.conv2d(t, torch.zeros(1, 1, f, f), padding=p)  # noqa: E731
    x, got = torch.zeros(1, 1, image + net.input_pad, image + net.input_pad), {}
    got["conv1"] = x = F.conv2d(x, torch.zeros(1, 1, 11, 11), stride=4)
    got["pool1"] = x = pool(x)
    got["conv2"] = x = conv(x, 5, p2)
    got["pool2"] = x = pool(x)
    got["conv3"] = x = conv(x, 3, 1)
    got["conv4"] = x = conv(x, 3, 1)
    got["conv5"] = x = conv(x, 3, p5)
    got["pool5"] = pool(x)
    assert output_sizes(net, image) == {name: t.shape[-1] for name, t in got.items()}


@pytest.mark.parametrize("overlap,sizes", [
    (True, [55, 27, 27, 13, 13, 13, 13, 6]),
    (False, [55, 28, 26, 13, 13, 13, 11, 6]),  # run 147: 55→28→26→13→13→11→6
])
def test_output_sizes_after_every_stage(overlap, sizes):
    conv1, pool1, conv2, pool2, conv3, conv4, conv5, pool5 = sizes
    expect = dict(conv1=conv1, pool1=pool1, conv2=conv2, pool2=pool2, conv3=conv3, conv4=conv4,
                  conv5=conv5, pool5=pool5)
    assert output_sizes(overlap) == expect
    s = _shapes(AlexNet(10, devices="cpu", overlap=overlap), images(1))
    assert s["conv1_in"] == (3, 227, 227)
    assert s["conv1"] == (48, conv1, conv1)
    assert s["conv2_in"] == (48, pool1, pool1)
    assert s["conv2"] == (128, conv2, conv2)
    assert s["conv3_in"] == (256, pool2, pool2)  # both towers
    assert s["conv3"] == (192, conv3, conv3)
    assert s["conv4"] == (192, conv4, conv4)
    assert s["conv5"] == (128, conv5, conv5)
    assert s["fc6_in"] == (2 * 128 * pool5 * pool5,)
    assert s["fc6"] == (2048,)


def test_half_variant_sizes():
    s = _shapes(AlexNet(10, devices="cpu", variant="one-gpu-half"), images(1))
    assert s["conv3_in"] == (128, 13, 13)  # one tower: reads only itself
    assert s["conv5"] == (256, 13, 13)
    assert s["fc6_in"] == (9216,) and s["fc6"] == (4096,)


def test_connectivity_perturbing_tower_b_conv1():
    """b's conv1 reaches a's conv3 (the cross-connection) but not a's conv2 (own tower only)."""
    torch.manual_seed(2)
    m = AlexNet(10, devices="cpu").eval()
    x = images(1)
    seen = {}
    m.tower_a.conv2.register_forward_hook(lambda mod, i, o: seen.__setitem__("a2", o.detach().clone()))
    m.tower_a.conv3.register_forward_hook(lambda mod, i, o: seen.__setitem__("a3", o.detach().clone()))
    m.tower_b.conv3.register_forward_hook(lambda mod, i, o: seen.__setitem__("b3", o.detach().clone()))
    with torch.no_grad():
        m(x)
        base = dict(seen)
        h = m.tower_b.conv1.register_forward_hook(lambda mod, i, o: o + 5.0 * torch.randn_like(o))
        m(x)
        h.remove()
    assert torch.equal(seen["a2"], base["a2"])
    assert not torch.allclose(seen["a3"], base["a3"])
    assert not torch.allclose(seen["b3"], base["b3"])


def test_gradients_reach_both_towers():
    torch.manual_seed(3)
    m = AlexNet(10, devices=("cpu", "cpu"), init="caffe")
    F.cross_entropy(m(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_in_the_model_is_not_inverted():
    torch.manual_seed(4)
    m = AlexNet(10, devices="cpu", init="caffe")
    seen = {}
    m.tower_a.fc6.register_forward_hook(lambda mod, i, o: seen.__setitem__("fc6", o.detach().clone()))
    m.tower_a.fc7.register_forward_pre_hook(lambda mod, i: seen.__setitem__("fc7_in", i[0].detach().clone()))
    x = images(16)
    with torch.no_grad():
        m.train()(x)
        active = F.relu(seen["fc6"])  # tower a's fc6 after ReLU, before dropout
        dropped = seen["fc7_in"][:, :2048]
        alive = active > 0
        kept = dropped[alive] != 0
        assert 0.4 < kept.float().mean().item() < 0.6  # about half of the active units survive
        torch.testing.assert_close(dropped[alive][kept], active[alive][kept])  # no ×2 rescale
        m.eval()(x)
        torch.testing.assert_close(seen["fc7_in"][:, :2048], 0.5 * F.relu(seen["fc6"]))  # ×0.5 at test
        # dropout off: no mask in training, no ×0.5 at test
        off = AlexNet(10, devices="cpu", dropout=False).eval()
        off.tower_a.fc6.register_forward_hook(lambda mod, i, o: seen.__setitem__("fc6", o.detach().clone()))
        off.tower_a.fc7.register_forward_pre_hook(lambda mod, i: seen.__setitem__("fc7_in", i[0].detach().clone()))
        off(x)
        torch.testing.assert_close(seen["fc7_in"][:, :2048], F.relu(seen["fc6"]))


@pytest.mark.parametrize("init,sigmas,biases", [
    ("as-run", dict(conv1=.01, conv2=.01, conv3=.03, conv4=.03, conv5=.03, fc6=.01, fc7=.01, fc8=.01),
     dict(conv1=0, conv2=1, conv3=0, conv4=1, conv5=1, fc6=1, fc7=1, fc8=0)),
    ("paper-text", dict(conv1=.01, conv2=.01, conv3=.01, conv4=.01, conv5=.01, fc6=.01, fc7=.01, fc8=.01),
     dict(conv1=0, conv2=1, conv3=0, conv4=1, conv5=1, fc6=1, fc7=1, fc8=0)),
    ("caffe", dict(conv1=.01, conv2=.01, conv3=.01, conv4=.01, conv5=.01, fc6=.005, fc7=.005, fc8=.01),
     dict(conv1=0, conv2=.1, conv3=0, conv4=.1, conv5=.1, fc6=.1, fc7=.1, fc8=0)),
])
def test_init_statistics(init, sigmas, biases):
    torch.manual_seed(5)
    preset = init if init != "caffe" else "as-run"
    m = AlexNet(devices="cpu", preset=preset, init=None if init != "caffe" else "caffe")
    layers = [(n, getattr(t, n)) for t in m.towers for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")]
    for name, layer in layers + [("fc8", m.fc8)]:
        w = layer.weight.detach()
        assert abs(w.mean().item()) < 0.05 * sigmas[name], name
        assert w.std().item() == pytest.approx(sigmas[name], rel=0.03), name
        assert torch.all(layer.bias == biases[name]), name


def test_preset_changes_the_computation():
    torch.manual_seed(6)
    a = AlexNet(10, devices="cpu").eval()
    b = AlexNet(10, devices="cpu", preset="paper-text").eval()
    b.load_state_dict(a.state_dict())  # same weights, different LRN α, order and spatial norm
    x = images(1)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_features_are_post_relu_fc7():
    m = AlexNet(10, devices="cpu").eval()
    with torch.no_grad():
        f = m.features(images(2))
    assert f.shape == (2, 4096) and f.min() >= 0
    torch.testing.assert_close(m.fc8(0.5 * f), m(images(2)))


def test_clear_errors():
    with pytest.raises(ReplicaError, match=r"cuda:3.*does not exist.*available: cpu"):
        if torch.cuda.device_count() > 3:
            pytest.skip("this machine has a cuda:3")
        AlexNet(devices="cuda:3")
    with pytest.raises(ReplicaError, match="one device or two"):
        AlexNet(devices=("cpu", "cpu", "cpu"))
    with pytest.raises(ReplicaError, match="not a device"):
        AlexNet(devices="gpu0")
    with pytest.raises(ReplicaError, match="preset"):
        AlexNet(devices="cpu", preset="paper")
    with pytest.raises(ReplicaError, match="unknown option"):
        AlexNet(devices="cpu", lrn=False)
    with pytest.raises(ReplicaError, match="one tower"):
        AlexNet(devices=("cpu", "cpu"), variant="one-gpu-half")
    with pytest.raises(ReplicaError, match="num_classes"):
        AlexNet(0, devices="cpu")
    with pytest.raises(ReplicaError, match=r"\(N, 3, H, W\)"):
        AlexNet(10, devices="cpu")(torch.zeros(1, 1, 224, 224))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only choice")
def test_auto_devices_without_cuda(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="replica"):
        m = AlexNet(10)
    assert [str(d) for d in m.devices] == ["cpu"]
    assert "devices=auto: cpu" in caplog.text


def test_checkpoint_moves_between_forms(tmp_path):
    torch.manual_seed(8)
    two = AlexNet(10, devices=("cpu", "cpu")).eval()
    torch.save(two.state_dict(), tmp_path / "w.pt")
    one = AlexNet(10, devices="cpu").eval()
    one.load_state_dict(torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True))
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(one(x), two(x))


def test_channels_last_is_layout_only():
    torch.manual_seed(9)
    a = AlexNet(10, devices="cpu").double().eval()
    b = AlexNet(10, devices="cpu", channels_last=False).double().eval()
    b.load_state_dict(a.state_dict())
    x = images(2, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x))


def test_fused_norms_are_the_same_net(monkeypatch, cxx):
    """``fused_norms``: the three norms as compiled loops give the eager net's logits and gradients
    (float32, the as-run net at batch 4), and the compiled path is the one that ran."""
    import replica.layers as layers

    torch.manual_seed(11)
    net = AlexNet(10, devices="cpu").eval()  # eval: dropout is ×0.5, the same in both passes
    x = images(4)
    ran = []
    real = layers._fused_fns
    monkeypatch.setattr(layers, "_fused_fns", lambda *a, **k: ran.append(a[0]) or real(*a, **k))
    monkeypatch.setitem(layers._BROKEN, "why", None)

    def run(fused):
        net.fused_norms = fused
        net.zero_grad()
        out = net(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    eager_out, eager_grads = run(False)
    assert ran == []
    fused_out, fused_grads = run(True)
    assert sorted(ran) == ["channel"] * 4 + ["spatial"] * 2  # both towers: LRN 1, LRN 2, spatial norm
    assert layers.fused_norms_available()  # compiled and ran: no fallback to the eager path
    # the option belongs to this model: a fresh one runs the eager norms
    ran.clear()
    AlexNet(10, devices="cpu").eval()(x[:1])
    assert ran == []
    torch.testing.assert_close(fused_out, eager_out, rtol=1e-4, atol=1e-4 * eager_out.abs().max().item())
    for n, g in eager_grads.items():
        torch.testing.assert_close(fused_grads[n], g, rtol=1e-3, atol=1e-4 * g.abs().max().item(), msg=n)


# ---------------------------------------------------------------------------------------------
# CUDA only


@needs_cuda
def test_cuda_each_tower_on_its_device():
    devs = ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cpu")
    m = AlexNet(10, devices=devs)
    assert {str(p.device) for p in m.tower_a.parameters()} == {str(torch.device(devs[0]))}
    assert {str(p.device) for p in m.tower_b.parameters()} == {str(torch.device(devs[1]))}
    assert {str(p.device) for p in m.fc8.parameters()} == {str(torch.device(devs[0]))}


def splits():
    """The two-device placements this machine can run, each marked to skip with its reason elsewhere."""
    n = torch.cuda.device_count()
    two = pytest.mark.skipif(n < 2, reason="needs two CUDA devices")
    return [("cuda:0", "cpu"), ("cpu", "cuda:0"), pytest.param(("cuda:0", "cuda:1"), marks=two)]


@needs_cuda
@pytest.mark.parametrize("devs", splits())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_split_matches_one_device(devs, dtype):
    """Logits and every gradient of a split against the net on one device. In float32 this also
    catches a device-to-CPU copy that returns before its bytes arrive (replica.model.cross)."""
    from replica.runtime import set_tf32, tf32_enabled

    was = tf32_enabled()
    set_tf32(False)  # float32 means float32 on both sides
    try:
        _split_against_one_device(devs, dtype)
    finally:
        set_tf32(was)


def _split_against_one_device(devs, dtype):
    torch.manual_seed(10)
    ref = AlexNet(10, devices="cpu").to(dtype)
    two = AlexNet(10, devices=devs).to(dtype)
    two.load_state_dict(ref.state_dict())
    x = images(2, dtype=dtype) if devs[0] == "cpu" else images(2, dtype=dtype).to(devs[0])
    y = torch.tensor([1, 2])
    ref.eval(), two.eval()
    out_ref, out_two = ref(x.cpu()), two(x)
    assert out_two.device == torch.device(devs[0])
    # float64: the same sums; float32: cuDNN/cuBLAS against oneDNN, a few float32 ulps of the
    # layer's scale after 8 layers (a stale copy is off by the activations themselves)
    tol = {} if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3 * out_ref.abs().max().item())
    torch.testing.assert_close(out_two.cpu(), out_ref, **tol)
    F.cross_entropy(out_ref, y).backward()
    F.cross_entropy(out_two, y.to(out_two.device)).backward()
    for (name, p), q in zip(ref.named_parameters(), two.parameters()):
        tol = {} if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-3 * p.grad.abs().max().item())
        torch.testing.assert_close(q.grad.cpu(), p.grad, msg=lambda s: f"{name}: {s}", **tol)


def test_cross_copies_non_blocking_only_onto_a_gpu():
    """A non-blocking copy from a GPU onto the CPU returns before the data has arrived; onto a GPU
    it is queued ahead of the kernels that read it. The flag cross() passes, seen through a
    tensor subclass (no GPU needed to see what would be asked of one)."""
    from replica.model import cross

    calls = []

    class Seen(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to:
                calls.append((args[1], (kwargs or {}).get("non_blocking", False)))
                return args[0].as_subclass(torch.Tensor)  # stands for the copy
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.zeros(2, 3).as_subclass(Seen)
    cross(x, torch.device("cpu"))
    cross(x, torch.device("cuda", 1))
    assert calls == [(torch.device("cpu"), False), (torch.device("cuda", 1), True)]


def test_auto_gives_a_one_tower_net_one_device(monkeypatch):
    """devices=auto on a machine with two GPUs: the two-tower net takes both, one-gpu-half one."""
    import replica.model as model_mod

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert model_mod.resolve_devices("auto") == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert model_mod.resolve_devices("auto", towers=1) == (torch.device("cuda", 0),)
    placed = []
    monkeypatch.setattr(model_mod.Tower, "to", lambda self, d, **kw: placed.append(d) or self)
    monkeypatch.setattr(torch.nn.Linear, "to", lambda self, d, **kw: self)
    m = AlexNet(10, devices="auto", variant="one-gpu-half")  # raised "give it one device" before
    assert m.devices == (torch.device("cuda", 0),) and placed == [torch.device("cuda", 0)]


def test_at_1_16_width_only_hes_init_gives_each_image_its_own_output():
    """Why tools/reproduce.py --tiny uses init=he: with the paper's σ (and Caffe's) the narrow
    net's logits are the same for every image, so its predictions and verdicts say nothing."""
    import math

    from replica.config import NetOptions

    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
    spread = {}
    for init in ("as-run", "caffe", "he"):
        torch.manual_seed(0)
        m = AlexNet.from_options(NetOptions(width=0.0625, init=init), 10, "cpu").eval()
        with torch.no_grad():
            y = m(x)
        spread[init] = float((y.max(0).values - y.min(0).values).max() / y.abs().max())
    assert spread["as-run"] < 1e-3 and spread["caffe"] < 1e-3 and spread["he"] > 0.05, spread
    m = AlexNet.from_options(NetOptions(width=0.0625, init="he"), 10, "cpu")
    w = m.tower_a.conv3.weight.detach()  # σ = √(2 / fan-in), biases 0
    assert abs(float(w.std()) - math.sqrt(2 / w[0].numel())) < 0.1 * math.sqrt(2 / w[0].numel())
    assert float(m.tower_a.conv3.bias.detach().abs().max()) == 0


def test_every_join_is_a_named_function(monkeypatch):
    """The forward joins the towers only through broadcast, exchange, gather and boundary (the
    places a one-device grouped form plugs in): counted per call, with the shapes they carry."""
    seen = []
    for name in ("broadcast", "exchange", "gather", "boundary"):
        real = getattr(model_mod, name)
        monkeypatch.setattr(model_mod, name, lambda *a, _n=name, _f=real: seen.append(
            (_n, tuple(a[0].shape[1:]))) or _f(*a))
    with torch.no_grad():
        AlexNet(10, devices=("cpu", "cpu"), width=0.25).eval()(images(2))
        assert seen == [("broadcast", (3, 227, 227)), ("exchange", (32, 13, 13)), ("exchange", (1152,)),
                        ("exchange", (512,)), ("gather", (512,))]
        seen.clear()
        AlexNet(10, devices=("cpu", "cpu"), width=0.25).eval().features(images(2))
        assert [n for n, _ in seen] == ["broadcast", "exchange", "exchange", "exchange", "gather"]
        seen.clear()
        x = torch.nn.functional.pad(images(2), (0, 3, 0, 3))
        AlexNet(10, devices=("cpu", "cpu"), preset="caffe", width=0.25).eval()(x)
        assert [n for n, _ in seen] == ["broadcast", "boundary", "boundary", "exchange", "exchange", "exchange",
                                        "gather"]


# -- the grouped form: both towers on one device as one grouped network ---------------------------

GROUPED_CASES = [dict(preset="as-run"), dict(preset="paper-text"), dict(norm=False), dict(overlap=False),
                 dict(preset="caffe"), dict(variant="six-conv")]


def _pair(grouped_first=True, **opts):
    """A tower-form net and a grouped one with the same weights, both float64 on the CPU."""
    torch.manual_seed(0)
    towers = AlexNet(10, devices="cpu", width=0.125, grouped=False, **opts).double()
    grouped = AlexNet(10, devices="cpu", width=0.125, grouped=True, **opts).double()
    grouped.load_state_dict(towers.state_dict())
    grouped.pack_parameters()  # .double() undid the packing; load_state_dict keeps it
    return towers, grouped


def assert_same_step(ref, other, x):
    """Train mode, the same dropout draws: ``other``'s logits and every gradient equal to
    ``ref``'s to float64 rounding (1e-12 absolute, 1e-10 relative)."""
    y = torch.arange(1, len(x) + 1) % 10
    outs = []
    for m in (ref, other):
        torch.manual_seed(7)
        out = m(x)
        F.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-14, msg=lambda s: f"{name}: {s}")


def _input(opts, n=3):
    x = images(n, dtype=torch.float64)
    return F.pad(x, (0, 3, 0, 3), mode="replicate") * 4 if opts.get("preset") == "caffe" else x


@pytest.mark.parametrize("opts", GROUPED_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_grouped_form_is_the_towers_logits_gradients_and_dropout(opts):
    """Train mode (dropout drawn from the same seed), float64: logits and every gradient equal to
    the towers' form; eval mode equal to the independent grouped reference."""
    towers, grouped = _pair(**opts)
    assert grouped.grouped and not towers.grouped
    x = _input(opts)
    assert_same_step(towers, grouped, x)
    grouped.eval()
    params = {k: v.detach() for k, v in grouped.named_parameters()}
    ref = grouped_reference(params, x, opts.get("preset", "as-run"), opts.get("norm", True), opts.get("overlap", True),
                            six_conv=opts.get("variant") == "six-conv")
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), ref)
        torch.testing.assert_close(grouped.features(x), towers.eval().features(x), rtol=0, atol=1e-12)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops dispatched (views and metadata left out): what a step costs in launches."""

    VIEWS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "select",
             "alias", "detach", "unsqueeze", "squeeze", "reshape", "split", "unbind", "flatten", "_reshape_alias"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_packed_parameters_are_the_same_parameters_and_merge_copies_nothing():
    from replica.model import merge, packed_pair

    torch.manual_seed(0)
    m = AlexNet(10, devices="cpu", width=0.125, grouped=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = {n: id(p) for n, p in m.named_parameters()}
    m.pack_parameters()
    assert {n: id(p) for n, p in m.named_parameters()} == ids  # the optimizer's and the checkpoint's keys hold
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    a, b = m.tower_a.conv2.weight, m.tower_b.conv2.weight
    assert packed_pair(a, b) and merge(a, b).data_ptr() == a.data_ptr()  # a view of the one buffer
    m.grouped = True
    with _Ops() as ops:
        m.eval()(images(2))
    assert ops.ops.count("cat") == 0  # no join and no weight copied (eval: no dropout masks)
    m.train()
    with _Ops() as ops:
        F.cross_entropy(m(images(2)), torch.tensor([0, 1])).backward()
    assert ops.ops.count("cat") == 2  # the two dropout masks, a's half then b's
    assert m.tower_a.fc6.weight.grad.untyped_storage().data_ptr() == m.tower_b.fc6.weight.grad.untyped_storage().data_ptr()
    unpacked = AlexNet(10, devices="cpu", width=0.125, grouped=False)  # merge's fallback: a copy, the same values
    assert not packed_pair(unpacked.tower_a.conv2.weight, unpacked.tower_b.conv2.weight)
    torch.testing.assert_close(merge(unpacked.tower_a.conv2.weight, unpacked.tower_b.conv2.weight),
                               torch.cat([unpacked.tower_a.conv2.weight, unpacked.tower_b.conv2.weight]), rtol=0, atol=0)


def test_the_grouped_step_dispatches_about_half_the_ops():
    """One training step at width 1/16 (forward, loss, backward, the paper's update): the grouped
    form's ops against the towers', the count a GPU pays in launches (fp32, eager norms)."""
    from replica.optim import PaperSGD, param_groups

    counts = {}
    for grouped in (False, True):
        torch.manual_seed(0)
        m = AlexNet(10, devices="cpu", width=0.0625, grouped=grouped)
        opt = PaperSGD(param_groups(m, 0.01, 5e-4, 0.02))
        x, y = images(4), torch.tensor([0, 1, 2, 3])
        for _ in range(2):  # warm-up: momentum buffers exist
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        with _Ops() as ops:
            F.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        counts[grouped] = len(ops.ops)
    print(f"\nops in one step: towers {counts[False]}, grouped {counts[True]}")
    assert counts[True] <= 0.65 * counts[False]


def test_a_three_step_trajectory_and_checkpoints_are_the_same_in_either_form():
    """float64, the paper's update with an lr change and conv1 frozen at step 3: the towers' and
    the grouped form's losses and parameters agree, and each form's state loads into the other."""
    from replica.optim import PaperSGD, apply_lrs, param_groups

    towers, grouped = _pair()
    runs = {}
    for name, m in (("towers", towers), ("grouped", grouped)):
        opt = PaperSGD(param_groups(m, 0.01, 5e-4, 0.02))
        losses = []
        for step in range(3):
            apply_lrs(opt, {"weight": 0.01 if step < 2 else 0.001, "bias": 0.02,
                            "conv1.weight": 0.01 if step < 2 else 0.0, "conv1.bias": 0.02 if step < 2 else 0.0})
            torch.manual_seed(100 + step)
            loss = F.cross_entropy(m(images(3, seed=step, dtype=torch.float64)), torch.tensor([0, 1, 2]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs[name] = (losses, {k: v.clone() for k, v in m.state_dict().items()},
                      opt.state_for_checkpoint(m.named_parameters()))
    (l1, s1, v1), (l2, s2, v2) = runs["towers"], runs["grouped"]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-12 and l1[0] != l1[2]
    assert s1.keys() == s2.keys() and v1.keys() == v2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-10, atol=1e-12, msg=lambda s: f"{k}: {s}")
    for k in v1:
        torch.testing.assert_close(v2[k][0], v1[k][0], rtol=1e-10, atol=1e-12, msg=lambda s: f"{k}: {s}")
    towers.load_state_dict(s2)
    grouped.load_state_dict(s1)
    assert model_mod.packed_pair(grouped.tower_a.fc6.weight, grouped.tower_b.fc6.weight)  # still packed
    x = images(2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(x), towers.eval()(x), rtol=1e-10, atol=1e-12)


def test_grouped_is_chosen_by_the_device_and_the_setting():
    assert not AlexNet(10, devices="cpu", width=0.0625).grouped  # auto: the towers on the CPU
    assert AlexNet(10, devices="cpu", width=0.0625, grouped=True).grouped
    assert not AlexNet(10, devices=("cpu", "cpu"), width=0.0625, grouped=False).grouped
    assert not AlexNet(10, devices="cpu", width=0.0625, grouped=True, variant="one-gpu-half").grouped  # one tower
    with pytest.raises(ReplicaError, match="grouped: expected"):
        AlexNet(10, devices="cpu", grouped="yes")


def test_run_146_six_conv_layer_by_layer():
    """variant=six-conv (run 146, Table 2's "1 CNN*"): conv6 per tower reads both towers' pool5
    (256 maps, 6×6, 3×3 pad 1, 128 filters), fc6 reads both towers' conv6; 590,080 parameters
    more than run 145's net (2 × (256·128·9 + 128)); as-run init σ 0.03, bias 1."""
    m = AlexNet(1000, devices="cpu", variant="six-conv")
    assert count_parameters(m) == count_parameters(AlexNet(1000, devices="cpu")) + 2 * (256 * 128 * 9 + 128) == 61_555_304
    assert tuple(m.tower_b.conv6.weight.shape) == (128, 256, 3, 3) and m.tower_a.fc6.in_features == 9216
    assert torch.all(m.tower_a.conv6.bias == 1) and abs(m.tower_b.conv6.weight.std().item() - 0.03) < 1e-3
    s = _shapes(m, images(1))
    assert s["conv6"] == (128, 6, 6)
    with pytest.raises(ReplicaError, match="preset caffe"):
        AlexNet(10, devices="cpu", preset="caffe", variant="six-conv")


@pytest.mark.parametrize("channels", [4, 8])
@pytest.mark.parametrize("grouped", [False, True])
def test_conv1_reading_zero_channels_past_the_third_is_the_same_net(channels, grouped):
    """conv1_channels=4 or 8: the input written with zero channels past the third and conv1's
    weights read with zeros there (what cuDNN otherwise pads each step): logits and every
    gradient equal to the 3-channel net's in float64, the parameters' shapes unchanged."""
    torch.manual_seed(0)
    ref = AlexNet(10, devices="cpu", width=0.125).double()
    m = AlexNet(10, devices="cpu", width=0.125, conv1_channels=channels, grouped=grouped).double()
    m.load_state_dict(ref.state_dict())
    m.pack_parameters()
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert_same_step(ref, m, images(3, dtype=torch.float64))
    with pytest.raises(ReplicaError, match="conv1_channels: expected 3, 4 or 8"):
        AlexNet(10, devices="cpu", conv1_channels=5)
