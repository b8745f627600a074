"""The paper's update rule, its groups, and the schedule, against the rule written out here."""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from replica.config import load_config
from replica.errors import ReplicaError
from replica.optim import PaperSGD, Schedule, apply_lrs, param_groups

ROOT = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(self.conv1(x).mean((2, 3)))


@pytest.mark.parametrize("fused", [True, False])
def test_update_rule_trace_with_an_lr_change(fused):
    """v ← μv − ελw − εḡ; w ← w + v, velocity kept across the ε change, biases: no decay.
    Both ways the optimizer can run (torch's fused kernel, and the plain fallback) follow it.

    The rule is replayed in float64 on the same gradients. The optimizer runs it in float32 in
    another form (b = −v/ε, rescaled when ε changes), and kernels built for AVX2 and AVX-512
    round differently, so the bound is in float32 rounding: each step does at most 6 roundings
    (the rescale, μb, +ḡ, +λw, εb, w − εb), each ≤ ½ ulp of the largest term it touches; an
    error made at one step is carried (×μ < 1 in v, ×1 in w) into every later one. So after
    k steps |w − w₆₄| ≤ 6·k·u·M with u = 2⁻²⁴ and M the largest |w|, |v|/ε·ε, |ḡ|·ε, |λw|·ε so far.
    Measured: the optimizer stays within 3.8·u·M (fused and fallback, AVX-512 and AVX2 kernels
    via ATEN_CPU_CAPABILITY=avx2); with the rescale at the ε change removed it is off by
    1.3·10⁷·u·M, so the bound still tells the rule from a near miss."""
    torch.manual_seed(0)
    m = Tiny()
    opt = PaperSGD(param_groups(m, 0.1, 0.05, bias_lr=0.2), momentum=0.9)
    opt._fused = fused
    ref = {n: p.detach().double().clone() for n, p in m.named_parameters()}
    vel = {n: torch.zeros_like(p) for n, p in ref.items()}
    big = {n: p.abs().clone() for n, p in ref.items()}  # M, per element
    big_v = {n: torch.zeros_like(p) for n, p in ref.items()}
    xs = [torch.randn(4, 1, 5, 5) for _ in range(4)]
    eps_w = [0.1, 0.1, 0.01, 0.01]  # ε divided by 10 before step 3
    u = 2.0 ** -24
    for k, (x, ew) in enumerate(zip(xs, eps_w), 1):
        apply_lrs(opt, {"weight": ew, "conv1.weight": ew, "bias": 0.2, "conv1.bias": 0.2})
        opt.zero_grad()
        m(x).square().sum().backward()
        grads = {n: p.grad.double().clone() for n, p in m.named_parameters()}
        opt.step()
        for n in ref:
            bias = n.endswith("bias")
            eps, lam = (0.2, 0.0) if bias else (ew, 0.05)
            terms = (vel[n].abs(), eps * lam * ref[n].abs(), eps * grads[n].abs())
            vel[n] = 0.9 * vel[n] - eps * lam * ref[n] - eps * grads[n]
            ref[n] = ref[n] + vel[n]
            big_v[n] = torch.stack([big_v[n], *terms, vel[n].abs()]).amax(0)
            big[n] = torch.stack([big[n], ref[n].abs(), big_v[n]]).amax(0)
        steps = k
    for n, p in m.named_parameters():
        err_w = (p.detach().double() - ref[n]).abs()
        err_v = (opt.velocity(p).double() - vel[n]).abs()
        assert (err_w <= 6 * steps * u * big[n]).all(), (n, (err_w / (u * big[n])).max().item())
        # v = −ε·b: b carries the same absolute rounding as w's steps, and ε·b one more
        assert (err_v <= 7 * steps * u * big_v[n] + 1e-30).all(), (n, (err_v / (u * big_v[n])).max().item())
    assert opt._fused == fused  # the fused kernel ran here (it exists on this torch for CPU)


def test_a_failed_fused_update_is_logged_once_and_the_plain_passes_give_the_same_step(monkeypatch, caplog):
    """The fused kernel raising (a device or a stride it does not take) switches to the plain
    passes for good: said once, naming the cause, and the step is still taken."""
    torch.manual_seed(1)
    m, ref = Tiny(), Tiny()
    ref.load_state_dict(m.state_dict())
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("expected all tensors to have the same strides\nmore detail")

    monkeypatch.setattr(torch, "_fused_sgd_", broken)
    opt = PaperSGD(param_groups(m, 0.1, 0.05, bias_lr=0.2), momentum=0.9)
    plain = PaperSGD(param_groups(ref, 0.1, 0.05, bias_lr=0.2), momentum=0.9)
    plain._fused = False
    x = torch.randn(4, 1, 5, 5)
    with caplog.at_level("WARNING", logger="replica"):
        for _ in range(3):
            for net, o in ((m, opt), (ref, plain)):
                o.zero_grad()
                net(x).square().sum().backward()
                o.step()
    warned = [r.getMessage() for r in caplog.records if "fused update failed" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: expected all tensors to have the same strides" in warned[0]
    assert "more detail" not in warned[0] and len(calls) == 1 and not opt._fused
    for p, q in zip(m.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_optimizer_state_restores_bit_for_bit_and_from_velocities():
    torch.manual_seed(6)
    xs = [torch.randn(3, 1, 5, 5) for _ in range(6)]
    lrs = [0.1, 0.1, 0.1, 0.01, 0.01, 0.001]

    def run(steps, m, opt):
        for x, lr in steps:
            apply_lrs(opt, {"weight": lr, "conv1.weight": lr, "bias": 0.2, "conv1.bias": 0.2})
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()

    m1 = Tiny()
    opt1 = PaperSGD(param_groups(m1, 0.1, 0.05, bias_lr=0.2))
    run(zip(xs[:3], lrs[:3]), m1, opt1)
    m2, m3 = Tiny(), Tiny()
    m2.load_state_dict(m1.state_dict())
    m3.load_state_dict(m1.state_dict())
    opt2 = PaperSGD(param_groups(m2, 0.1, 0.05, bias_lr=0.2))
    opt2.load_checkpoint_state(dict(m2.named_parameters()), opt1.state_for_checkpoint(m1.named_parameters()))
    opt3 = PaperSGD(param_groups(m3, 0.1, 0.05, bias_lr=0.2))  # from velocities alone (older checkpoints)
    for (n, p), p3 in zip(m1.named_parameters(), m3.parameters()):
        opt3.set_velocity(p3, opt1.velocity(p))
    before = [p.detach().clone() for p in m1.parameters()]
    for m, opt in ((m1, opt1), (m2, opt2), (m3, opt3)):
        run(zip(xs[3:], lrs[3:]), m, opt)
    for a, b, c, a0 in zip(m1.parameters(), m2.parameters(), m3.parameters(), before):
        assert not torch.equal(a, a0)  # the three steps after the restore moved every parameter
        assert torch.equal(a, b)  # exact by construction: the same buffers, the same kernels, the same machine
        # numerical: from v alone the buffer is rescaled once more (b = v/ε), one rounding of b
        # carried through 3 steps; ~8 ulps relative allowed, IEEE-exact on every ISA
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_lr_zero_freezes_a_group_entirely():
    torch.manual_seed(1)
    m = Tiny()
    opt = PaperSGD(param_groups(m, 0.1, 0.05, bias_lr=0.2))
    m(torch.randn(2, 1, 5, 5)).sum().backward()
    opt.step()
    before = m.conv1.weight.detach().clone()
    v = opt.velocity(m.conv1.weight).clone()
    apply_lrs(opt, {"weight": 0.1, "bias": 0.2, "conv1.weight": 0.0, "conv1.bias": 0.0})
    opt.zero_grad()
    m(torch.randn(2, 1, 5, 5)).sum().backward()
    opt.step()
    assert torch.equal(m.conv1.weight, before)  # no update, no decay
    assert torch.equal(opt.velocity(m.conv1.weight), v)  # the velocity waits


def test_groups_paper_text_treats_biases_like_weights():
    groups = {g["name"]: g for g in param_groups(Tiny(), 0.01, 5e-4, bias_lr=None)}
    assert groups["bias"]["lr"] == 0.01 and groups["bias"]["weight_decay"] == 5e-4
    groups = {g["name"]: g for g in param_groups(Tiny(), 0.01, 5e-4, bias_lr=0.02)}
    assert groups["bias"]["lr"] == 0.02 and groups["bias"]["weight_decay"] == 0.0
    assert len(groups["conv1.weight"]["params"]) == 1 and len(groups["weight"]["params"]) == 1


def test_as_run_schedule_on_91_epochs():
    s = Schedule(load_config(None, {}), steps_per_epoch=10)
    at = lambda epoch: s.lrs(epoch * 10)  # noqa: E731
    assert at(0) == {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    assert at(25)["weight"] == pytest.approx(1e-3) and at(24.9)["weight"] == 0.01
    assert at(51)["weight"] == pytest.approx(1e-4)
    assert at(67)["conv1.weight"] == pytest.approx(1e-5) and at(67)["weight"] == pytest.approx(1e-4)
    assert at(72)["conv1.weight"] == 0 and at(72)["conv1.bias"] == 0
    assert at(79)["weight"] == pytest.approx(1e-5) and at(79)["bias"] == 0.02  # biases held
    assert s.noise_on(669) and not s.noise_on(670)
    assert s.total_steps == 910 and s.finished(910) and not s.finished(909)


def test_schedule_scales_to_a_short_run_and_optional_bias_cut():
    s = Schedule(load_config(None, {"epochs": 9.1, "bias_lr_cut_epoch": 25}), steps_per_epoch=10)
    assert s.total_steps == 91
    assert s.lrs(24)["weight"] == 0.01 and s.lrs(25)["weight"] == pytest.approx(1e-3)
    assert s.lrs(25)["bias"] == pytest.approx(0.002)
    assert s.noise_on(66) and not s.noise_on(67)


def test_warmup_ramps_every_group_then_leaves_the_schedule_alone():
    cfg = load_config(None, {"epochs": 9.1, "warmup_epochs": 0.5})
    s, plain = Schedule(cfg, steps_per_epoch=10), Schedule(load_config(None, {"epochs": 9.1}), 10)
    assert s.lrs(0) == {k: v / 5 for k, v in plain.lrs(0).items()}  # step 1 of 5
    assert s.lrs(2)["weight"] == pytest.approx(0.006) and s.lrs(2)["bias"] == pytest.approx(0.012)
    assert s.lrs(4) == plain.lrs(4)  # the 5th step runs at the full rate
    assert all(s.lrs(k) == plain.lrs(k) for k in range(5, 91))
    with pytest.raises(ReplicaError, match="warmup_epochs"):
        load_config(None, {"epochs": 2, "warmup_epochs": 2})
    with pytest.raises(ReplicaError, match="warmup_epochs"):
        load_config(None, {"warmup_epochs": -1})


def test_plateau_schedule_drops_at_most_three_times():
    cfg = load_config(None, {"preset": "paper-text"})
    assert cfg.schedule == "plateau" and cfg.bias_lr is None and cfg.pca_off_epoch is None
    s = Schedule(cfg, steps_per_epoch=10)
    assert not s.on_validation(0.5)  # a new best
    assert s.on_validation(0.5)  # no better: ÷10
    assert s.lrs(0)["weight"] == pytest.approx(1e-3) and s.lrs(0)["bias"] == pytest.approx(1e-3)
    assert not s.on_validation(0.4)
    assert s.on_validation(0.45) and s.on_validation(0.45)
    assert not s.on_validation(0.45)  # three drops already
    assert s.lrs(0)["weight"] == pytest.approx(1e-5)
    assert s.noise_on(10**6)  # paper-text: colour noise for the whole run
    s2 = Schedule(cfg, 10)
    s2.load_state_dict(s.state_dict())
    assert s2.lrs(0) == s.lrs(0)
    assert math.isclose(s2.best, 0.4)


def test_tensor_learning_rates_give_the_same_bits_and_leave_step_no_number_to_read(monkeypatch):
    """lr_tensors=True (what a captured CUDA graph needs): over an ε change, conv1 frozen and a
    bias cut, parameters and buffers bitwise equal to the float-ε optimizer's; the fused kernel is
    handed ε as a tensor, and step() rescales nothing (set_lrs did it, outside any graph)."""
    schedule = [dict(weight=0.1, bias=0.2, **{"conv1.weight": 0.1, "conv1.bias": 0.2})] * 2 + \
               [dict(weight=0.01, bias=0.2, **{"conv1.weight": 0.001, "conv1.bias": 0.2})] * 2 + \
               [dict(weight=0.01, bias=0.02, **{"conv1.weight": 0.0, "conv1.bias": 0.0})] * 2
    results = []
    for tensors in (False, True):
        torch.manual_seed(0)
        m = Tiny()
        opt = PaperSGD(param_groups(m, 0.1, 0.05, bias_lr=0.2), momentum=0.9, lr_tensors=tensors)
        for k, lrs in enumerate(schedule):
            apply_lrs(opt, lrs)
            opt.zero_grad()
            torch.manual_seed(10 + k)
            m(torch.randn(4, 1, 5, 5)).square().sum().backward()
            opt.step()
        results.append(({n: p.detach().clone() for n, p in m.named_parameters()},
                        opt.state_for_checkpoint(m.named_parameters())))
    (w0, s0), (w1, s1) = results
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert all(torch.equal(s0[n][0], s1[n][0]) and s0[n][1] == s1[n][1] for n in s0)

    seen, real = [], torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *a, **k: seen.append(k["lr"]) or real(*a, **k))
    mul = []
    apply_lrs(opt, schedule[0] | {"weight": 0.005})  # a change: rescaled now, in set_lrs
    monkeypatch.setattr(torch.Tensor, "mul_", lambda self, *a: mul.append(1) or torch.mul(self, *a, out=self))
    opt.zero_grad()
    m(torch.randn(4, 1, 5, 5)).square().sum().backward()
    opt.step()
    assert seen and all(isinstance(lr, torch.Tensor) for lr in seen) and mul == []
    monkeypatch.undo()
    fills = []
    real_fill = torch.Tensor.fill_
    monkeypatch.setattr(torch.Tensor, "fill_", lambda self, v: fills.append(v) or real_fill(self, v))
    apply_lrs(opt, schedule[0] | {"weight": 0.005})  # as the step before: nothing to write
    assert fills == []
    apply_lrs(opt, schedule[0] | {"weight": 0.002})  # one group's ε changed: one fill, once for the device
    assert fills == [0.002]


def test_table_schedule_is_run_146s_fine_tuning():
    """configs/finetune-146.yaml against the ε changes the 2012 layer-params file logs
    (docs/analysis.md, run 146), written out here: at 1,000 steps an epoch, epoch e is step 1000·e."""
    cfg = load_config(ROOT / "configs" / "finetune-146.yaml", {})
    s = Schedule(cfg, steps_per_epoch=1000)
    assert s.layers == ("conv1", "fc8") and s.total_steps == 54000
    logged = [  # (epoch, conv1 ε, fc8 ε, every other weight's ε)
        (0, 1e-4, 1e-3, 1e-3), (0.029, 1e-4, 1e-3, 1e-3), (0.03, 1e-4, 1e-2, 1e-3),  # fc8 raised "after 300 batches"
        (5, 1e-5, 1e-2, 1e-3), (7, 0, 1e-2, 1e-3), (9, 0, 1e-3, 1e-3),
        (22, 0, 1e-4, 1e-4), (42, 0, 1e-5, 1e-5), (53.9, 0, 1e-5, 1e-5)]
    for epoch, conv1, fc8, rest in logged:
        lrs = s.lrs(round(epoch * 1000))
        assert lrs["conv1.weight"] == pytest.approx(conv1) and lrs["fc8.weight"] == pytest.approx(fc8), epoch
        assert lrs["weight"] == pytest.approx(rest), epoch
        assert lrs["bias"] == lrs["fc8.bias"] == 0.02 and lrs["conv1.bias"] == (0.02 if conv1 else 0), epoch
    assert s.lrs(6999) == s.lrs(5000) and s.lrs(7000)["conv1.weight"] == 0  # each ε held until its next row
    assert s.noise_on(37999) and not s.noise_on(38000)  # colour noise off at epoch 38
    assert cfg.variant == "six-conv" and cfg.epochs == 54


def test_a_table_that_writes_the_as_run_drops_gives_the_as_run_rates():
    """The table path against the fixed drops it can express: every step of a 91-epoch run equal."""
    table = [{"epoch": 25, "lr": 1e-3, "conv1": 1e-3}, {"epoch": 51, "lr": 1e-4, "conv1": 1e-4},
             {"epoch": 67, "conv1": 1e-5}, {"epoch": 72, "conv1": 0}, {"epoch": 79, "lr": 1e-5}]
    as_run = Schedule(load_config(None, {}), steps_per_epoch=10)
    tabled = Schedule(load_config(None, {"schedule": "table", "lr_table": table}), steps_per_epoch=10)
    assert tabled.layers == as_run.layers == ("conv1",)
    for step in range(910):
        a, t = as_run.lrs(step), tabled.lrs(step)
        assert a.keys() == t.keys() and all(math.isclose(a[k], t[k], rel_tol=1e-12) for k in a), step


def test_table_groups_give_each_named_layer_its_own_and_bad_tables_are_one_line():
    from replica.model import AlexNet
    cfg = load_config(ROOT / "configs" / "finetune-146.yaml", {"width": 0.0625})
    net = AlexNet.from_options(cfg.net, 10, devices="cpu")
    groups = {g["name"]: g for g in param_groups(net, 0.01, 5e-4, 0.02, layers=Schedule(cfg, 1).layers)}
    names = {id(p): n for n, p in net.named_parameters()}
    members = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert members["fc8.weight"] == ["fc8.weight"] and members["fc8.bias"] == ["fc8.bias"]
    assert members["conv1.weight"] == ["tower_a.conv1.weight", "tower_b.conv1.weight"]
    assert "tower_b.conv6.weight" in members["weight"] and sum(map(len, members.values())) == len(names)
    assert groups["fc8.bias"]["weight_decay"] == 0 and groups["fc8.weight"]["weight_decay"] == 5e-4
    bad = [({"lr_table": [{"epoch": 0, "fc8": 1}]}, "schedule=table only"),
           ({"schedule": "table"}, "needs lr_table"),
           ({"schedule": "table", "lr_table": [{"epoch": 3, "fc8": 1}, {"epoch": 1, "fc8": 1}]}, "increasing"),
           ({"schedule": "table", "lr_table": [{"epoch": 0, "conv6": 1}]}, "unknown key 'conv6'"),
           ({"schedule": "table", "lr_table": [{"epoch": 0, "fc9": 1}]}, "did you mean 'fc8'"),
           ({"schedule": "table", "lr_table": [{"epoch": 0, "fc8": -1}]}, "≥ 0"),
           ({"schedule": "table", "lr_table": [{"fc8": 1}]}, "needs an epoch"),
           ({"schedule": "table", "bias_lr": None, "lr_table": [{"epoch": 0, "bias_lr": 1}]}, "bias_lr is null")]
    for values, message in bad:
        with pytest.raises(ReplicaError, match=message):
            load_config(None, values)
    with pytest.raises(ReplicaError, match="not valid YAML"):
        load_config(None, ["schedule=table", "lr_table=[{epoch:"])
    frozen = load_config(None, ["schedule=table", "lr_table=[{epoch: 0, lr: 0, fc8: 0.01}]"])
    assert Schedule(frozen, 1).lrs(0) == {"weight": 0, "bias": 0, "conv1.weight": 0, "conv1.bias": 0,
                                          "fc8.weight": 0.01, "fc8.bias": 0.02}  # biases freeze with weights
    assert load_config(None, frozen.to_dict()) == frozen  # the rows written back read the same
