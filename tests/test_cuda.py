"""Training and evaluation on CUDA, one GPU and the split over cuda:0 + cpu (skipped without CUDA).

``tools/gpu_check.sh`` runs these (``pytest -m cuda``) with the CUDA rows of tools/bench.py.
"""
import pytest
import torch

from replica.config import load_config
from replica.data import open_heldout
from replica.evaluate import evaluate
from replica.inference import model_from_checkpoint
from replica.runs import load_checkpoint, read_metrics
from replica.train import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("devices,bf16", [("cuda:0", True), ("cuda:0", False), ("cuda:0,cpu", False)])
def test_train_on_cuda_then_evaluate_on_cpu(store, tmp_path, devices, bf16):
    cfg = load_config(None, dict(data=str(store), batch_size=8, epochs=2, steps_per_epoch=2, workers=2,
                                 devices=devices, bf16=bf16, init="caffe"))
    r = train(cfg, tmp_path / "run", progress=False)
    assert r["step"] == 4
    m = read_metrics(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(x["train_loss"])) for x in m)
    ck = load_checkpoint(tmp_path / "run")
    assert all(v.device.type == "cpu" for v in ck["model"].values())  # checkpoints are device-free
    # the same checkpoint on the CPU and on the GPU: the same one-view error
    val = open_heldout(store)
    errs = []
    for dev in ("cpu", "cuda:0"):
        model = model_from_checkpoint(ck, dev)
        errs.append(evaluate(model, val, ck["mean"].numpy(), views=10)["top1_err"])
    assert abs(errs[0] - errs[1]) <= 1 / 8  # at most one of 8 images flips on float differences


def test_fused_norms_on_cuda_match_the_eager_norms(monkeypatch):
    """The compiled (Triton) norms on the GPU, float32 and bf16, against the eager path."""
    import replica.layers as layers
    from replica.layers import local_response_norm, spatial_response_norm

    torch.manual_seed(3)
    x = (torch.randn(4, 48, 27, 27, device="cuda") * 40).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        got = []
        for on in (False, True):
            a = x.to(dtype).requires_grad_()
            y = spatial_response_norm(local_response_norm(a, 5, 1e-3, 0.75, 2.0, fused=on), fused=on)
            y.backward(g.to(dtype))
            got.append((y.float(), a.grad.float()))
        assert layers.fused_norms_available(), layers._BROKEN["why"]
        for e, f in zip(*got):
            assert (e - f).abs().max() <= tol * e.abs().max()


# -- DDP over NCCL ------------------------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _ddp_against_one_process(store, tmp_path, nproc, per_process):
    """torchrun over NCCL, ``nproc`` processes × batch 8/nproc against one process × batch 8."""
    args = [f"data={store}", "batch_size=8", "epochs=1", "steps_per_epoch=3", "workers=0", "init=caffe",
            "dropout=false", f"devices_per_process={per_process}", "checkpoint_minutes=0.0001"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), NCCL_DEBUG="WARN")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "replica", "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), *args, "devices=auto",
           "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one_dev = "cuda:0,cuda:1" if per_process == 2 else "cuda:0"
    r = subprocess.run([sys.executable, "-m", "replica", "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), *args,
                        f"devices={one_dev}", "--out", str(tmp_path / "one")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "one")
    assert a["progress"]["step"] == b["progress"]["step"] == 3 and len(a["rng"]) == nproc
    for k in a["model"]:  # float32 on GPUs, gradients summed in another order: a few ulps per step
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_over_nccl_one_device_per_process(store, tmp_path):
    _ddp_against_one_process(store, tmp_path, 2, 1)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four CUDA devices")
def test_ddp_over_nccl_two_devices_per_process(store, tmp_path):
    _ddp_against_one_process(store, tmp_path, 2, 2)


# -- the checks of tools/gpu_check.sh, as tests (gpu_check's own run leaves these out) -----------

def _gpu_check():
    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_check

    return gpu_check


def test_gpu_check_nccl_one_process_smoke(tmp_path):
    """torchrun --nproc-per-node 1 over NCCL with the gloo group and DDP: 3 steps, group destroyed."""
    _gpu_check().check_a(tmp_path, dry=False)


def test_gpu_check_no_host_sync_in_a_training_step(tmp_path):
    """3 bf16 steps from a raw store under set_sync_debug_mode('error')."""
    _gpu_check().check_c(tmp_path, dry=False)


def test_gpu_check_nvjpeg_matches_cpu_and_never_races(tmp_path):
    """nvJPEG within 2 levels on average of libjpeg-turbo; 0 of 200 race iterations corrupted."""
    _gpu_check().check_d(tmp_path, dry=False)


def test_deterministic_resume_is_bit_equal_on_cuda(store, tmp_path, monkeypatch):
    """deterministic=true on a GPU: a run stopped inside its second epoch and resumed ends with
    the parameters of one that never stopped, bit for bit (the CPU suite proves it on the CPU)."""
    import replica.train as train_mod
    from runs_helpers import StopAfter, tiny

    cfg = tiny(store, devices="cuda:0", deterministic=True)
    train(cfg, tmp_path / "whole", progress=False)
    monkeypatch.setattr(train_mod, "_Stop", lambda: StopAfter(6))
    assert train(cfg, tmp_path / "cut", progress=False)["stopped"]
    monkeypatch.undo()
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
