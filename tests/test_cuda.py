"""Training and evaluation on CUDA, one GPU and the split over cuda:0 + cpu.

Every test's body runs on the CPU as well (the ``cpu`` parameters, at the narrow width): a logic
error in a test that only a GPU runs would otherwise first show on the one lent GPU, where
minutes are scarce. The CUDA parameters carry the ``cuda`` mark, so ``pytest -m cuda`` (what
``tools/gpu_check.sh`` runs) picks them alone; without CUDA they are skipped.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replica.config import load_config
from replica.data.loaders import open_heldout
from replica.evaluate import evaluate
from replica.inference import model_from_checkpoint
from replica.layers import local_response_norm, spatial_response_norm
from replica.runs import load_checkpoint, read_metrics
from replica.train import train
from runs_helpers import NARROW

ROOT = Path(__file__).resolve().parents[1]


def on_cuda(*values, gpus: int = 1):
    """A parameter set that needs ``gpus`` CUDA devices: marked ``cuda``, skipped without them."""
    return pytest.param(*values, marks=[pytest.mark.cuda, pytest.mark.skipif(
        torch.cuda.device_count() < gpus, reason=f"needs {gpus} CUDA device(s)")])


def width_on(device: str) -> float:
    """The paper's net on a GPU; the narrow one (same code) for the CPU variants."""
    return 1.0 if "cuda" in device else NARROW


@pytest.fixture(autouse=True)
def numerics_restored():
    """Each test leaves torch's global numerics as it found them: ``deterministic=true`` turns on
    ``use_deterministic_algorithms`` and cuDNN's deterministic mode for the whole process, and
    the tests after it would otherwise run deterministic without asking."""
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark)
    yield
    if torch.are_deterministic_algorithms_enabled() != saved[0]:
        torch.use_deterministic_algorithms(saved[0])
    cudnn.deterministic, cudnn.benchmark = saved[1:]


@pytest.mark.parametrize("devices,bf16", [
    ("cpu", False), ("cpu,cpu", False),
    on_cuda("cuda:0", True), on_cuda("cuda:0", False), on_cuda("cuda:0,cpu", False)])
def test_train_on_a_device_then_evaluate_on_cpu(store, tmp_path, devices, bf16):
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(store), batch_size=8, epochs=2, steps_per_epoch=2, workers=2,
                                 devices=devices, bf16=bf16, init="caffe", width=width_on(devices)))
    r = train(cfg, tmp_path / "run", progress=False)
    assert r["step"] == 4
    m = read_metrics(tmp_path / "run")
    assert len(m) == 2 and all(torch.isfinite(torch.tensor(x["train_loss"])) for x in m)
    ck = load_checkpoint(tmp_path / "run")
    assert all(v.device.type == "cpu" for v in ck.model.values())  # checkpoints are device-free
    # the same checkpoint on the CPU and where it trained: the same ten-view error
    val = open_heldout(store)
    errs = []
    for dev in dict.fromkeys(("cpu", devices.split(",")[0])):
        model = model_from_checkpoint(ck, dev)
        assert next(model.parameters()).device.type == torch.device(dev).type
        errs.append(evaluate(model, val, ck.mean.numpy(), views=10)["top1_err"])
    assert abs(errs[0] - errs[-1]) <= 1 / 8  # at most one of 8 images flips on float differences


# each norm: (call, shape on a GPU, shape on the CPU). The CPU shapes and constants are
# test_layers' FUSED_CASES, so the suite compiles those loops once for both files.
NORMS = {
    "lrn": (lambda t, on: local_response_norm(t, 5, 1e-2, 0.75, 2.0, fused=on),
            (4, 48, 27, 27), (3, 12, 7, 6)),
    "spatial": (lambda t, on: spatial_response_norm(t, 5, 1e-3, 0.75, fused=on),
                (4, 48, 27, 27), (2, 6, 8, 7)),
}


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda")])
def test_fused_norms_match_the_eager_norms(device, monkeypatch, request):
    """The compiled norms (Triton on a GPU, C++ loops on the CPU) against the eager path, float32
    and bf16, value and gradient, each pass with a leaf of its own. On the CPU the fused path
    takes float32 only (bf16 runs eager there by design); on a GPU both."""
    import replica.layers as layers

    if device == "cpu":
        request.getfixturevalue("cxx")  # skips where no C++ compiler can build the loops
    monkeypatch.setitem(layers._BROKEN, "why", None)
    compiled = []
    real = layers._fused_fns

    def counted(kind, size, groups, k, c, beta, shape=(), dtype=None, device=None):
        compiled.append((kind, str(dtype)))
        return real(kind, size, groups, k, c, beta, shape, dtype, device)

    monkeypatch.setattr(layers, "_fused_fns", counted)
    torch.manual_seed(3)
    for name, (norm, gpu_shape, cpu_shape) in NORMS.items():
        x = (torch.randn(gpu_shape if device == "cuda" else cpu_shape, device=device) * 40)
        x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn_like(x)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            got = []
            for on in (False, True):
                a = x.detach().to(dtype).requires_grad_()  # a leaf of this pass's own (x.to(float32) is x itself)
                y = norm(a, on)
                y.backward(g.to(dtype))
                assert a.grad is not None and a.grad.dtype == dtype
                got.append((y.detach().float().clone(), a.grad.float().clone()))
            assert layers.fused_norms_available(), layers._BROKEN["why"]
            for e, f in zip(*got):
                assert e.abs().max() > 0
                assert (e - f).abs().max() <= tol * e.abs().max(), (name, dtype)
    kinds = {k for k, _ in compiled}
    assert len(kinds) == 2, compiled
    want = [torch.float32, torch.bfloat16] if device == "cuda" else [torch.float32]
    assert sorted({d for _, d in compiled}) == sorted(map(str, want)), compiled  # the fused path did run


# -- DDP (NCCL on GPUs, gloo on the CPU) against one process -------------------------------------


def _ddp_against_one_process(store, tmp_path, nproc, per_process, device):
    """torchrun, ``nproc`` processes × batch 8/nproc against one process × batch 8 (side by side)."""
    args = [f"data={store}", "batch_size=8", "epochs=1", "steps_per_epoch=3", "workers=0", "init=caffe",
            "dropout=false", f"devices_per_process={per_process}", "checkpoint_minutes=0.0001", "save_best=false",
            f"width={width_on(device)}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), NCCL_DEBUG="WARN", OMP_NUM_THREADS="1")
    config = str(ROOT / "configs" / "alexnet-2gpu.yaml")
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "replica", "train", config, *args, "devices=auto" if device == "cuda" else "devices=cpu",
           "--out", str(tmp_path / "ddp")]
    one_dev = "cpu" if device == "cpu" else "cuda:0,cuda:1" if per_process == 2 else "cuda:0"
    one = [sys.executable, "-m", "replica", "train", config, *args, f"devices={one_dev}", "--out", str(tmp_path / "one")]
    jobs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for c in (ddp, one)]
    for p in jobs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]
    a, b = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "one")
    assert a.progress.step == b.progress.step == 3 and len(a.rng) == nproc
    for k in a.model:  # float32, gradients summed in another order: a few ulps per step
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda", gpus=2)])
def test_ddp_one_device_per_process(store, tmp_path, device):
    _ddp_against_one_process(store, tmp_path, 2, 1, device)


@pytest.mark.parametrize("device", [on_cuda("cuda", gpus=4)])  # on the CPU: test_train's DDP test, and the one above
def test_ddp_over_nccl_two_devices_per_process(store, tmp_path, device):
    _ddp_against_one_process(store, tmp_path, 2, 2, device)


# -- the checks of tools/gpu_check.sh, as tests (gpu_check's own run leaves these out) -----------
# On the CPU each runs as the dry run does (tiny sizes, gloo, no sync-debug mode).

def _gpu_check():
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    return gpu_check


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda")])
def test_gpu_check_nccl_one_process_smoke(tmp_path, device):
    """torchrun --nproc-per-node 1 with the gloo group and DDP: 3 steps, group destroyed; bound to
    one GPU, then both towers on it (NCCL unbound, DDP with device_ids=None)."""
    line = _gpu_check().check_a(tmp_path, dry=device == "cpu")
    assert "two towers" in line


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda")])
def test_gpu_check_no_host_sync_in_a_training_step(tmp_path, device):
    """3 bf16 steps from a raw store under set_sync_debug_mode('error'); host time per step."""
    line = _gpu_check().check_c(tmp_path, dry=device == "cpu")
    assert "host" in line


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda")])
def test_gpu_check_nvjpeg_matches_cpu_and_never_races(tmp_path, device):
    """nvJPEG within 2 levels on average of libjpeg-turbo; 0 of 200 race iterations corrupted."""
    line = _gpu_check().check_d(tmp_path, dry=device == "cpu")
    assert "0 corrupted through replica's decode" in line


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda:0")])
def test_deterministic_resume_is_bit_equal(store, tmp_path, monkeypatch, device):
    """deterministic=true: a run stopped inside its second epoch and resumed ends with the
    parameters of one that never stopped, bit for bit."""
    import replica.train as train_mod
    from runs_helpers import StopAfter, tiny

    cfg = tiny(store, devices=device, deterministic=True)
    train(cfg, tmp_path / "whole", progress=False)
    assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(6))
    assert train(cfg, tmp_path / "cut", progress=False)["stopped"]
    monkeypatch.undo()
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


def test_determinism_set_by_one_test_does_not_reach_the_next():
    """Runs after test_deterministic_resume_is_bit_equal (file order): the fixture reset it."""
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda:0")])
def test_the_grouped_form_against_the_towers_on_the_device(device):
    """grouped=true against grouped=false on the same weights, train mode with the same dropout
    draws, TF32 off: logits and every gradient to 1e-9 in float64, where no rounding tie can
    decide a ReLU or a pooling window otherwise, and float32's logits to 1e-4 (cuDNN's grouped
    kernels are not its per-tower ones). Float32 gradients are not held to a bound: such a tie
    moved conv1's by 1.6% in 1 of 40 random inputs (tools/gpu_perf.py's check p)."""
    import torch.nn.functional as F

    from replica.model import AlexNet
    from replica.runtime import set_cuda_numerics

    set_cuda_numerics(tf32=False, benchmark=False)
    y = torch.arange(4, device=device)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        torch.manual_seed(0)
        towers = AlexNet(10, devices=device, width=width_on(device), grouped=False).to(dtype)
        grouped = AlexNet(10, devices=device, width=width_on(device), grouped=True).to(dtype)
        grouped.load_state_dict(towers.state_dict())
        grouped.pack_parameters()  # (.to() undid it)
        x = torch.randn(4, 3, 224, 224, device=device, dtype=dtype) * 50
        outs = []
        for m in (towers, grouped):
            torch.manual_seed(7)
            out = m(x)
            F.cross_entropy(out, y).backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol * outs[0].abs().max().item())
        if dtype == torch.float64:
            for (name, p), q in zip(towers.named_parameters(), grouped.parameters()):
                scale = p.grad.abs().max().item()
                torch.testing.assert_close(q.grad, p.grad, rtol=tol, atol=tol * scale, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("device", ["cpu", on_cuda("cuda:0")])
def test_the_graphed_step_against_the_eager_step_on_the_device(device):
    """graph=true's runner against the eager train_step, 6 steps with an ε drop, the same dropout
    draws: on the CPU through the stand-in (bitwise), on a GPU a real capture (within bf16-free
    float32 rounding: the same kernels replayed, so expected bitwise, bounded at 1e-5)."""
    from replica.model import AlexNet
    from replica.optim import PaperSGD, param_groups
    from replica.runtime import set_cuda_numerics
    from replica.steps import EagerGraphs, StepRunner
    from replica.train import train_step

    set_cuda_numerics(tf32=False, benchmark=False)
    dev = torch.device(device)
    base = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        net = AlexNet(10, devices=device, width=width_on(device), init="he")
        opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), lr_tensors=graphed)
        runner = StepRunner(net, opt, devices=(dev,), bf16=False, graph=graphed,
                            graphs=EagerGraphs(opt) if graphed and device == "cpu" else None, eager=train_step)
        losses = []
        for k in range(6):
            g = torch.Generator().manual_seed(k)
            x = (torch.randn(4, 3, 224, 224, generator=g) * 50).to(dev)
            y = torch.arange(4, device=dev)
            torch.manual_seed(100 + k)
            losses.append(runner(x, y, dict(base, weight=0.01 if k < 4 else 0.001)).item())
        runs.append((losses, [p.detach().clone() for p in net.parameters()], runner.replays))
    (l0, p0, _), (l1, p1, replays) = runs
    assert replays == 3
    assert max(abs(a - b) for a, b in zip(l0, l1)) <= 1e-5 * max(abs(v) for v in l0)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
