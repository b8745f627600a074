"""Training runs: config errors, exact resume, NaN stop, safe checkpoints, eval, predict, DDP."""
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import replica.train as train_mod
from replica import augment
from replica.cli import main
from replica.config import NAMES, NetOptions, load_config
from replica.data.loaders import open_heldout
from replica.errors import ReplicaError
from replica.evaluate import evaluate, predict_probs, topk_errors
from replica.inference import run_eval
from replica.runtime import fused_norms_for
from replica.runs import Checkpoint, check_compatible, load_checkpoint, read_metrics
from replica.errors import TrainingStopped
from replica.train import train
from runs_helpers import NARROW, StopAfter, tiny

ROOT = Path(__file__).resolve().parents[1]


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (["batchsize=4"], "unknown config key 'batchsize'.*did you mean 'batch_size'"),
    (["lr=-0.1"], "lr: expected a positive number"),
    (["lr=fast"], "lr: expected a number, got 'fast'"),
    (["epochs=0"], "epochs: expected a positive number"),
    (["batch_size=2.5"], "batch_size: expected an integer"),
    (["dropout=maybe"], "dropout: expected true or false"),
    (["preset=paper"], "preset: expected one of 'as-run', 'paper-text'"),
    (["momentum=1.5"], "momentum: expected a number in"),
    (["devices_per_process=3"], "devices_per_process: expected 1 or 2"),
    (["lr_drops=[51,25]"], "lr_drops: expected increasing"),
    (["novalue"], "expected KEY=VALUE"),
    (["conv1_channels=5"], "conv1_channels: expected one of 3, 4, 8"),
])
def test_config_errors_say_what_was_expected(overrides, message):
    with pytest.raises(ReplicaError, match=message):
        load_config(None, overrides)


def test_every_preset_loads_and_holds_only_known_keys():
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in presets}
    assert {"alexnet-2gpu", "paper-text", "one-gpu-half", "no-norm", "no-overlap", "no-pca", "no-dropout",
            "cifar10", "catdog", "demo"} <= names
    for p in presets:
        cfg = load_config(p)
        assert set(cfg.to_dict()) == set(NAMES)
    assert load_config(ROOT / "configs" / "paper-text.yaml").schedule == "plateau"
    assert load_config(ROOT / "configs" / "no-norm.yaml").norm is False
    with pytest.raises(ReplicaError, match="no such file"):
        load_config(ROOT / "configs" / "nope.yaml")
    # a preset by its name, from any folder: `replica train no-norm`
    assert load_config("no-norm") == load_config(ROOT / "configs" / "no-norm.yaml")
    with pytest.raises(ReplicaError, match="no such file.*presets: .*no-norm"):
        load_config("no-nrom")


def test_train_time_errors(store, tmp_path):
    with pytest.raises(ReplicaError, match="crop 300 is larger than the 256×256 images"):
        train(tiny(store, crop=300), tmp_path / "r1", progress=False)
    with pytest.raises(ReplicaError, match="num_classes=10, but .* has 4 classes"):
        train(tiny(store, num_classes=10), tmp_path / "r2", progress=False)
    with pytest.raises(ReplicaError, match="does not exist"):
        train(tiny(store, devices="cuda:0,cuda:1"), tmp_path / "r3", progress=False)
    with pytest.raises(ReplicaError, match="data: required"):
        train(tiny(store, data=None), tmp_path / "r4", progress=False)
    with pytest.raises(ReplicaError, match="no such file"):
        train(tiny(store, data=str(tmp_path / "missing")), tmp_path / "r5", progress=False)
    with pytest.raises(ReplicaError, match="fewer than one batch"):
        train(tiny(store, batch_size=64), tmp_path / "r6", progress=False)


# -- resume --------------------------------------------------------------------------------------


@pytest.mark.parametrize("look,step,epoch,in_epoch,width", [
    (4, 3, 0, 3, NARROW),  # after the first epoch's last step, before its evaluation
    (6, 4, 1, 1, 1.0),  # inside the second epoch (look 5 comes before its first step); the paper's net
])
def test_interrupted_and_resumed_equals_uninterrupted(store, whole_run, tmp_path, monkeypatch, capsys, look, step,
                                                      epoch, in_epoch, width):
    cfg = tiny(store, width=width)  # dropout and PCA noise on: their RNG must survive the stop
    if width == NARROW:
        whole_dir, whole = whole_run
    else:
        whole_dir = tmp_path / "whole"
        whole = train(cfg, whole_dir, progress=False)
    assert whole["step"] == 6
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(look))
    stopped = train(cfg, tmp_path / "cut", progress=False)
    assert stopped == {"stopped": "SIGINT", "step": step}
    assert f"replica train --resume {tmp_path / 'cut'}" in capsys.readouterr().out
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "cut")
    assert (ck.progress.epoch, ck.progress.in_epoch) == (epoch, in_epoch)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(whole_dir / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    # exact by construction: the same machine, kernels, thread count and order of every operation
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    assert a.momentum.keys() == b.momentum.keys()
    for k in a.momentum:
        assert torch.equal(a.momentum[k][0], b.momentum[k][0]) and a.momentum[k][1] == b.momentum[k][1], k
    ma, mb = read_metrics(whole_dir), read_metrics(tmp_path / "cut")
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb] == [1, 2]
    assert ma[0]["val_top1_err"] == mb[0]["val_top1_err"]
    assert (whole_dir / "best.pt").exists()
    version = json.loads((whole_dir / "version.json").read_text())
    assert version["torch"] == torch.__version__


def nan_at_call(monkeypatch, n):
    """The training loss of the n-th step (1-based, counting every run in the test) is NaN."""
    real, calls = train_mod.F.cross_entropy, []

    def sometimes_nan(logits, y):
        calls.append(1)
        loss = real(logits, y)
        return loss * float("nan") if len(calls) == n else loss

    monkeypatch.setattr(train_mod.F, "cross_entropy", sometimes_nan)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    nan_at_call(monkeypatch, 5)
    with pytest.raises(TrainingStopped, match="loss is nan at epoch 2, step 2: stopped. The last good checkpoint"):
        train(tiny(store), tmp_path / "run", progress=False)
    ck = load_checkpoint(tmp_path / "run")
    assert ck.progress.epoch == 1 and ck.progress.step == 3
    assert all(torch.isfinite(v).all() for v in ck.model.values())


def test_losses_read_every_few_steps_same_account_and_nan_still_named(store, whole_run, tmp_path, monkeypatch):
    """Losses stay on the device and are read every few steps (as on a GPU): the epoch's loss is
    the same as reading every step, and a NaN seen at a later read names its own step and keeps
    the checkpoint from before it."""
    cfg = tiny(store)
    every_dir, every = whole_run  # read at every step (the CPU's default)
    assert train_mod.LOSS_READ_STEPS["cpu"] == 1
    monkeypatch.setitem(train_mod.LOSS_READ_STEPS, "cpu", 4)
    later = train(cfg, tmp_path / "later", progress=False)
    assert every["step"] == later["step"] == 6
    assert [m["train_loss"] for m in read_metrics(every_dir)] == \
        [m["train_loss"] for m in read_metrics(tmp_path / "later")]
    nan_at_call(monkeypatch, 4)
    with pytest.raises(TrainingStopped, match="loss is nan at epoch 2, step 1: stopped. The last good checkpoint"):
        train(cfg, tmp_path / "nan", progress=False)  # read at the epoch's end, two steps later
    ck = load_checkpoint(tmp_path / "nan")
    assert ck.progress.step == 3 and all(torch.isfinite(v).all() for v in ck.model.values())


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # (without a GPU only the CPU half can be seen)
def test_autocast_covers_every_device_type_of_a_split():
    """bf16 on a cuda:0 + cpu split: the CPU tower runs under autocast too (it did not: autocast
    was entered for the first device's type only)."""
    from replica.runtime import autocast

    with autocast(["cuda:0", "cpu"], True):
        assert torch.is_autocast_enabled("cpu")
        if torch.cuda.is_available():
            assert torch.is_autocast_enabled("cuda")
    with autocast(["cpu"], False):
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_is_not_native_where_onednn_is_held_below_it(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 on a CPU with AVX512_BF16 (the AVX2 emulation): bf16 is emulated,
    so the demo's default is float32 there, as on an AVX2-only machine; the printout says why."""
    import replica.runtime as rt

    monkeypatch.setattr(rt, "_cpuinfo", lambda key: "fpu avx2 avx512f avx512_bf16" if key == "flags" else "Some CPU")
    for isa, native in [(None, True), ("ALL", True), ("AVX512_CORE_BF16", True), ("AVX10_1_512_AMX", True),
                        ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False)]:
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert rt.fast_bf16("cpu") is native, isa
        assert rt.cpu_has_bf16()
        assert ("not used: oneDNN held below it" in rt.cpu_description()) is (not native), isa
    monkeypatch.setattr(rt, "_cpuinfo", lambda key: "fpu avx2" if key == "flags" else "Some CPU")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not rt.fast_bf16("cpu") and "native bf16 no" in rt.cpu_description()


def test_stalled_start_is_reported(store, tmp_path, capsys):
    train(tiny(store, init="as-run", lr=1e-9, bias_lr=1e-9, stall_steps=2, epochs=1), tmp_path / "r", progress=False)
    out = capsys.readouterr().out
    assert "stalled start" in out and "init=caffe" in out


# -- checkpoints are data ------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'PWNED'}",))


def test_crafted_truncated_and_foreign_checkpoints_get_one_line_errors(store, tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "replica-checkpoint", "x": Evil()}, evil)
    with pytest.raises(ReplicaError, match="refused to load"):
        load_checkpoint(evil)
    assert not (Path(__file__).parent / "PWNED").exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(ReplicaError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ReplicaError, match="not a replica checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ReplicaError, match="checkpoint has variant='one-gpu-half', but this run has variant='two-tower'"):
        check_compatible(Checkpoint(NetOptions(variant="one-gpu-half"), list("abcd"), {}, None),
                         NetOptions(variant="two-tower"), list("abcd"), "x")
    assert main(["predict", str(evil), "img.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("replica: error:") and "\n" not in err
    # a truncated real checkpoint
    train(tiny(store, epochs=1, steps_per_epoch=1), tmp_path / "run", progress=False)
    data = (tmp_path / "run" / "last.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ReplicaError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")


# -- evaluation and prediction -------------------------------------------------------------------


class LabelReader(torch.nn.Module):
    """Predicts the class written into the image's red channel (value 40·label), shifted by ``offset``."""

    def __init__(self, classes=7, offset=0):
        super().__init__()
        self.classes, self.offset = classes, offset
        self.devices = (torch.device("cpu"),)

    def forward(self, x):
        pred = (torch.round(x[:, 0].mean((1, 2)) / 40).long() + self.offset) % self.classes
        c = torch.arange(self.classes)
        d = torch.minimum((c[None] - pred[:, None]) % self.classes, (pred[:, None] - c[None]) % self.classes)
        return -5.0 * d  # best at the predicted class, then its neighbours


class Fixed:
    size, classes = 64, list(range(7))

    def __init__(self, labels):
        self.labels = np.asarray(labels)

    def __len__(self):
        return len(self.labels)

    def batch(self, positions):
        u8 = np.zeros((len(positions), 3, 64, 64), np.uint8)
        u8[:, 0] = (40 * self.labels[positions])[:, None, None]
        return u8, self.labels[positions], []


def test_evaluate_on_a_set_with_known_answers():
    images = Fixed([0, 1, 2, 3, 4, 5, 6, 1])
    mean = np.zeros((3, 64, 64))
    r = evaluate(LabelReader(), images, mean, views=1, batch=3, crop=32)
    assert r["top1_err"] == 0 and r["top5_err"] == 0 and r["images"] == 8
    r = evaluate(LabelReader(offset=1), images, mean, views=10, batch=3, crop=32)
    assert r["top1_err"] == 1.0 and r["top5_err"] == 0.0  # always the runner-up: inside the top 5
    r = evaluate(LabelReader(offset=3), images, mean, views=1, batch=3, crop=32)
    assert r["top1_err"] == 1.0 and r["top5_err"] == 1.0  # three classes away: outside the top 5
    probs = torch.tensor([[0.1, 0.5, 0.4, 0, 0, 0, 0], [0.3, 0.2, 0.1, 0.15, 0.14, 0.11, 0.0]])
    assert topk_errors(probs, torch.tensor([2, 6])) == (2, 1)


def test_ten_views_average_probabilities_not_logits():
    class LeftBright(torch.nn.Module):
        devices = (torch.device("cpu"),)

        def forward(self, x):  # logits from where the bright half of the image sits
            left = x[..., :16].mean((1, 2, 3))
            right = x[..., 16:].mean((1, 2, 3))
            return torch.stack([left, right, torch.zeros_like(left)], 1) / 10

    u8 = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    u8[..., :24] = 200  # bright on the left: corner views and flips see it differently
    mean = torch.zeros(3, 32, 32)
    views = augment.ten_views(u8, mean, 32)[0]  # (10, 3, 32, 32)
    want = torch.softmax(LeftBright()(views), 1).mean(0)
    got = predict_probs(LeftBright(), u8, mean, views=10, crop=32)[0]
    torch.testing.assert_close(got, want)
    logit_avg = torch.softmax(LeftBright()(views).mean(0), 0)
    assert not torch.allclose(got, logit_avg)


def test_eval_and_predict_commands(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(store, epochs=1), run, progress=False)
    assert main(["eval", str(run), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "1-view" in out and "10-view" in out
    r = json.loads((run / "eval.json").read_text())
    assert r["1-view"]["images"] == r["10-view"]["images"] == 8
    img = next((store.parent / "synth" / "val").rglob("*.jpg"))
    png = tmp_path / "x.png"
    from PIL import Image
    Image.open(img).convert("RGBA").resize((300, 200)).save(png)
    code = main(["predict", str(run / "last.pt"), str(img), str(tmp_path / "missing.jpg"), str(png), "--topk", "3"])
    assert code == 1  # one image failed
    io = capsys.readouterr()
    lines = io.out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{img}: ") and lines[0].count(",") == 2
    probs = [float(t.split()[-1]) for t in lines[0].split(": ", 1)[1].split(", ")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert "missing.jpg: file not found" in io.err
    assert main(["predict", str(run), str(img), "--views", "10"]) == 0


# -- torchrun + DDP ------------------------------------------------------------------------------


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(store, tmp_path):
    """gloo, 2 processes × batch 2 against 1 process × batch 4: the same parameters after 3 steps.
    The job runs the grouped form (its packed parameters under DDP), the one process the towers."""
    args = ["data=" + str(store), "batch_size=4", "epochs=1", "steps_per_epoch=3", "workers=0", "devices=cpu",
            "init=caffe", "dropout=false", "val_batches=1", "save_best=false"]  # one 456 MB write a run, not two
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "replica",
           "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), *args, "grouped=true", "--out", str(tmp_path / "ddp")]
    # side by side: the two jobs are mostly process start-ups
    runs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for c in (cmd, [sys.executable, "-m", "replica", "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"),
                            *args, "--out", str(tmp_path / "one")])]
    for p in runs:
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, err[-3000:]
    a, b = load_checkpoint(tmp_path / "ddp"), load_checkpoint(tmp_path / "one")
    assert a.progress.step == b.progress.step == 3
    assert len(a.rng) == 2  # each rank's RNG is kept for resume
    for k in a.model:
        # numerical: DDP sums the two halves' gradients in another order than one batch's backward
        torch.testing.assert_close(a.model[k], b.model[k], rtol=1e-4, atol=1e-6, msg=k)
    assert len(a.momentum) == len(a.model)  # every parameter was updated...
    assert all(b.abs().sum() > 0 and lr > 0 for b, lr in a.momentum.values())  # ...by a non-zero step


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_real_sigint_saves_and_the_run_resumes_to_the_end(store, tmp_path, sig, status):
    """Ctrl-C as a user sends it (and SIGTERM as a cluster does): the step finishes, last.pt is
    saved, the exit status is a shell's for that signal (130, 143: not finished, so a `&&` chain or
    a requeue script can tell), and --resume completes the run (status 0)."""
    import signal
    import time

    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "replica", "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"),
            f"data={store}", "batch_size=4", "epochs=20", "steps_per_epoch=6", "workers=0", "devices=cpu",
            "init=caffe", f"width={NARROW}", "tensorboard=false", "live=false",
            "--out", str(run)]  # ~0.1 s an epoch: the signal lands early on
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    # at once after epoch 1's metrics line, with ~18 epochs to go (a fixed delay after config.yaml
    # could land after the last step on a quick machine, or before the handler on a slow one)
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    p.send_signal(getattr(signal, sig))
    out, _ = p.communicate(timeout=300)
    if f"stopped by {sig}" in out:  # (on a very fast machine the run may have finished first)
        assert p.returncode == status, out[-2000:]
        assert f"Resume with: replica train --resume {run}" in out
        ck = load_checkpoint(run)
        assert not ck.progress.done
        assert main(["train", "--resume", str(run)]) == 0  # the resume in this process: no signal here
    else:
        assert p.returncode == 0, out[-2000:]
    ck = load_checkpoint(run)
    assert ck.progress.done and ck.progress.step == 120
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, 21))


def test_cifar10_batches_train_on_the_fly(tmp_path):
    """The seed's CIFAR-10 recipe through the real pipeline, straight from the python batches."""
    rng = np.random.default_rng(4)
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         b"labels": [0, 1, 2, 9]}, f)
    cfg = load_config(ROOT / "configs" / "cifar10.yaml", dict(data=str(tmp_path / "cifar"), batch_size=4, epochs=1,
                                                              steps_per_epoch=2, workers=0, devices="cpu"))
    r = train(cfg, tmp_path / "run", progress=False)
    assert r["step"] == 2
    m = read_metrics(tmp_path / "run")[0]
    assert m["val_images"] == 4 and (tmp_path / "run" / "stats.npz").exists()
    assert load_checkpoint(tmp_path / "run").num_classes == 10


def test_bf16_autocast_trains_with_float32_weights(store, tmp_path, monkeypatch):
    """Runs on any CPU: without native bf16 oneDNN emulates it (slower, same dtypes); the checks are
    of dtypes and finiteness, not of speed or rounding."""
    seen = []
    real = train_mod.build_model

    def spy(cfg, n, devices):
        m = real(cfg, n, devices)
        m.tower_a.conv2.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
        return m

    monkeypatch.setattr(train_mod, "build_model", spy)
    train(tiny(store, bf16=True, epochs=1, steps_per_epoch=2), tmp_path / "run", progress=False)
    assert torch.bfloat16 in seen  # the convolutions ran in bfloat16
    ck = load_checkpoint(tmp_path / "run")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck.model.values())
    assert math.isfinite(read_metrics(tmp_path / "run")[0]["train_loss"])
    assert seen[-1] == torch.bfloat16  # the epoch's validation ran under autocast too


def test_eval_precision_follows_the_run(store, tmp_path, monkeypatch):
    """A bf16 run evaluates in bf16 where the device has native bf16, in float32 elsewhere or
    with --fp32; eval.json says which. Both precisions give (nearly) the same probabilities."""
    import replica.inference as predict_mod

    run = tmp_path / "run"
    train(tiny(store, bf16=True, epochs=1, steps_per_epoch=2), run, progress=False)
    dtypes = []
    real = predict_mod.model_from_checkpoint

    def spy(ckpt, devices="auto"):
        m = real(ckpt, devices)
        m.tower_a.conv2.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype))
        return m

    monkeypatch.setattr(predict_mod, "model_from_checkpoint", spy)
    for native, args, want in ((True, [], "bf16"), (False, [], "fp32"), (True, ["--fp32"], "fp32")):
        monkeypatch.setattr(predict_mod, "fast_bf16", lambda dev, native=native: native)
        dtypes.clear()
        assert main(["eval", str(run), "--batch", "4", "--views", "1", *args]) == 0
        assert json.loads((run / "eval-last-val-1view.json").read_text())["precision"] == want
        assert set(dtypes) == {torch.bfloat16 if want == "bf16" else torch.float32}
    ck = load_checkpoint(run)
    model = real(ck, "cpu")
    u8 = torch.from_numpy(open_heldout(store).batch(np.arange(4))[0])
    mean_crop = augment.centre_crop_of(ck.mean, 224)
    p32 = predict_probs(model, u8, mean_crop, views=10)
    p16 = predict_probs(model, u8, mean_crop, views=10, bf16=True)
    assert (p32 - p16).abs().max() < 0.02  # bf16's 8-bit mantissa, native or emulated


def test_fused_norms_train_like_the_eager_norms(store, tmp_path, monkeypatch, cxx):
    """``fused_norms=true`` from the command line: the compiled norms run, and the run's losses
    equal the eager run's (same seed, same data order) to float32 rounding."""
    import replica.layers as layers

    ran = []
    real = layers._fused_fns
    monkeypatch.setattr(layers, "_fused_fns", lambda *a, **k: ran.append(a[0]) or real(*a, **k))
    monkeypatch.setitem(layers._BROKEN, "why", None)
    # the paper's width: the shapes the other fused-norm tests compile (a warm cache)
    train(tiny(store, epochs=1, steps_per_epoch=2, fused_norms=False, width=1.0), tmp_path / "eager", progress=False)
    assert ran == []
    assert main(["train", "alexnet-2gpu", f"data={store}", "batch_size=4", "epochs=1", "steps_per_epoch=2",
                 "workers=0", "devices=cpu", "init=caffe", "checkpoint_minutes=60", "fused_norms=true",
                 "--out", str(tmp_path / "fused")]) == 0
    assert "channel" in ran and "spatial" in ran
    e, f = read_metrics(tmp_path / "eager")[0], read_metrics(tmp_path / "fused")[0]
    assert e["train_loss"] == pytest.approx(f["train_loss"], rel=1e-4)
    assert e["val_top1_err"] == f["val_top1_err"]
    assert load_checkpoint(tmp_path / "fused").config["fused_norms"] is True
    assert layers.fused_norms_available()  # the fused loops ran, no fallback
    # the option went with that run's model: evaluating afterwards, in the same process (as the
    # demo and tools/reproduce.py do), runs the eager norms and compiles nothing
    ran.clear()
    run_eval(tmp_path / "fused", views=(1,), progress=False)
    assert ran == []


def test_fused_norms_default_is_on_on_a_gpu_and_for_float32_on_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.delenv("REPLICA_FUSED_NORMS", raising=False)
    auto = load_config(None, {})
    assert auto.fused_norms is None
    assert fused_norms_for(auto, cpu) is True
    assert fused_norms_for(auto, cuda) is True  # measured faster on an H200, float32 and bf16
    assert fused_norms_for(load_config(None, ["bf16=true"]), cuda) is True
    assert fused_norms_for(load_config(None, ["compile=true"]), cuda) is False  # compile fuses them itself
    assert fused_norms_for(load_config(None, ["compile=true", "fused_norms=true"]), cuda) is True
    assert fused_norms_for(load_config(None, ["bf16=true"]), cpu) is False  # no faster there
    assert fused_norms_for(load_config(None, ["fused_norms=true"]), cuda) is True
    assert fused_norms_for(load_config(None, ["fused_norms=off"]), cpu) is False
    monkeypatch.setenv("REPLICA_FUSED_NORMS", "0")
    assert fused_norms_for(auto, cpu) is False
    with pytest.raises(ReplicaError, match="fused_norms: expected true or false"):
        load_config(None, ["fused_norms=maybe"])


def test_the_header_names_every_departure_from_the_preset(store, tmp_path):
    """An ablation shows in a run's first lines, not only "as-run" (a real process: what a user reads)."""
    from runs_helpers import TINY_ARGS

    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "alexnet-2gpu.yaml")
    r = subprocess.run([sys.executable, "-m", "replica", "train", cfg, f"data={store}", *TINY_ARGS, "epochs=1",
                        "norm=false", "overlap=false", "pca_noise=false", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert r.returncode == 0, r.stderr[-2000:]
    head = r.stderr.splitlines()[:3]
    line = next(h for h in head if "departs from run 145's recipe (preset as-run) in:" in h)
    for words in ("norm=false", "overlap=false", "pca_noise=false", "width=0.0625", "epochs=1", "batch_size=4",
                  "init=caffe"):  # (a preset=paper-text run would name preset first)
        assert words in line, (words, line)
    assert "devices" not in line and "workers" not in line  # how it runs, not what it computes


def test_the_step_is_a_function_of_its_arguments():
    """train_step alone, on a net, an optimizer and a batch: its loss and its update are the
    paper's rule written out (first step: v = −ε·(λ·w + g), w ← w + v), per parameter group."""
    import copy

    from replica.model import AlexNet
    from replica.optim import PaperSGD, param_groups

    torch.manual_seed(0)
    net = AlexNet.from_options(NetOptions(width=NARROW, init="he"), 5, "cpu").eval()  # eval: no dropout draw
    before = copy.deepcopy(net)
    opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), momentum=0.9)
    x, y = torch.randn(4, 3, 224, 224) * 50, torch.tensor([0, 1, 2, 3])
    lrs = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    loss = train_mod.train_step(net, opt, x, y, lrs, devices=(torch.device("cpu"),), bf16=False)
    want = F.cross_entropy(before(x), y)
    want.backward()
    assert not loss.requires_grad and torch.equal(loss, want.detach())
    for (name, p), q in zip(net.named_parameters(), before.parameters()):
        decay, lr = (0.0, 0.02) if name.endswith("bias") else (5e-4, 0.01)
        torch.testing.assert_close(p.detach(), q.detach() - lr * (decay * q.detach() + q.grad), msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before.parameters()))


def test_grouped_key_trains_like_the_towers_and_resumes_in_either_form(store, whole_run, tmp_path, monkeypatch):
    """grouped=true on the CPU (auto would keep the towers here): the same losses as the towers'
    run to float32 rounding; a run stopped in one form resumes in the other."""
    assert load_config(None, ["grouped=auto"]).grouped is None and load_config(None, ["grouped=true"]).grouped
    with pytest.raises(ReplicaError, match="grouped: expected true or false"):
        load_config(None, ["grouped=maybe"])
    every_dir, _ = whole_run
    train(tiny(store, grouped=True), tmp_path / "grouped", progress=False)
    want = [m["train_loss"] for m in read_metrics(every_dir)]
    got = [m["train_loss"] for m in read_metrics(tmp_path / "grouped")]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(5))  # inside epoch 2
    assert train(tiny(store, grouped=True), tmp_path / "cut", progress=False)["stopped"]
    monkeypatch.undo()
    assert train(tiny(store, grouped=False), tmp_path / "cut", resume=True, progress=False)["step"] == 6
    np.testing.assert_allclose([m["train_loss"] for m in read_metrics(tmp_path / "cut")], want, rtol=1e-4)


SYNCING_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "unique", "_unique",
               "_unique2", "unique_consecutive", "unique_dim", "repeat_interleave", "item"}


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_step_holds_no_host_read_of_a_tensor_so_a_graph_could_capture_it(monkeypatch, grouped, bf16):
    """The CPU stand-in for set_sync_debug_mode("error") and for a capture: train_step (forward,
    loss, backward, the update with tensor ε) dispatches no op that makes the host wait for the
    device, and reads no tensor into Python; a test op shows the check can fail."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from replica.model import AlexNet
    from replica.optim import PaperSGD, apply_lrs, param_groups

    class Lint(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS or (name == "index" and any(
                    getattr(i, "dtype", None) == torch.bool for i in (args[1] if len(args) > 1 else []) or [])):
                raise AssertionError(f"{name}: the host would wait for the device here")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = AlexNet.from_options(NetOptions(width=NARROW), 10, "cpu", grouped=grouped)
    opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), lr_tensors=True)
    x, y = torch.randn(4, 3, 224, 224) * 50, torch.tensor([0, 1, 2, 3])
    lrs = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    dev = (torch.device("cpu"),)
    for _ in range(3):  # warm-up, as before a capture: the momentum buffers exist
        train_mod.train_step(net, opt, x, y, lrs, devices=dev, bf16=bf16)
    apply_lrs(opt, lrs)
    for name in ("item", "tolist", "__bool__", "numpy", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _n=name: (_ for _ in ()).throw(
            AssertionError(f"Tensor.{_n}: a host read")))
    with Lint():
        loss = train_mod.train_step(net, opt, x, y, lrs, devices=dev, bf16=bf16)
        with pytest.raises(AssertionError, match="nonzero"):
            torch.nonzero(loss.detach().reshape(1))
    monkeypatch.undo()
    assert math.isfinite(loss.item())


def test_the_graphed_step_runner_gives_the_eager_steps_bits():
    """graph=true's step runner, its graph mechanics stood in for: after 3 eager steps it
    captures, replays, captures again when conv1 freezes, runs a short batch eagerly, and every
    loss and parameter is bitwise the eager train_step's over an ε drop and the freeze."""
    from replica.model import AlexNet
    from replica.optim import PaperSGD, param_groups
    from replica.steps import EagerGraphs, StepRunner

    base = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    lrs = [base] * 4 + [dict(base, weight=0.001)] * 2 + [dict(base, weight=0.001, **{"conv1.weight": 0.0,
                                                                                        "conv1.bias": 0.0})] * 2
    dev = (torch.device("cpu"),)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        net = AlexNet.from_options(NetOptions(width=NARROW, init="he"), 10, "cpu")
        opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), lr_tensors=graphed)
        fake = EagerGraphs(opt)
        runner = StepRunner(net, opt, devices=dev, bf16=False, graph=graphed, graphs=fake,
                            eager=train_mod.train_step)
        losses = []
        for k, r in enumerate(lrs):
            n = 2 if k == 5 else 4  # step 6: a batch shortened by bad inputs
            g = torch.Generator().manual_seed(k)
            x, y = torch.randn(n, 3, 224, 224, generator=g) * 50, torch.arange(n) % 10
            torch.manual_seed(100 + k)  # the dropout masks
            losses.append(runner(x, y, r).item())
        runs[graphed] = losses, {k: v.clone() for k, v in net.state_dict().items()}, fake.calls, runner.replays
    (l0, s0, _, _), (l1, s1, calls, replays) = runs[False], runs[True]
    assert l1 == l0 and all(torch.equal(s0[k], s1[k]) for k in s0)
    # steps 1-3 eager, 4 captured and replayed, 5 replayed, 6 eager (short), 7 captured anew (conv1 frozen), 8
    assert calls == ["warm"] * 3 + ["capture", "replay", "replay", "capture", "replay", "replay"] and replays == 4


def test_graph_true_says_what_it_needs(store, tmp_path):
    with pytest.raises(ReplicaError, match="graph=true: it needs a CUDA device; graph=false runs the eager step"):
        train(tiny(store, graph=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_workers_auto_come_from_the_usable_cores(store, tmp_path, caplog):
    """workers=auto (the default): on a GPU the cores this process may use less 2, at most 8; on
    the CPU 2; said in the run's header."""
    import logging

    from replica.runtime import default_workers

    assert load_config(None, ["workers=auto"]).workers is None and load_config(None, []).workers is None
    cuda = torch.device("cuda", 0)
    assert [default_workers(cuda, c) for c in (1, 4, 10, 16, 64)] == [1, 2, 8, 8, 8]
    assert [default_workers(torch.device("cpu"), c) for c in (1, 2, 16)] == [0, 2, 2]
    caplog.set_level(logging.INFO, logger="replica")
    train(tiny(store, workers=None, epochs=1, steps_per_epoch=1), tmp_path / "run", progress=False)
    assert re.search(r"loader workers: \d+ \(workers=auto: \d+ usable cores, cpu\)", caplog.text)


def test_a_table_schedule_fine_tunes_only_the_layers_it_names(store, whole_run, tmp_path):
    """schedule=table from another run's weights: the classifier alone for an epoch, then conv5
    too. Every layer at ε 0 (its bias with it) ends bit-equal to the source; the ε of each group
    is in each epoch's record."""
    src_dir, _ = whole_run
    src = load_checkpoint(src_dir)
    table = [{"epoch": 0, "lr": 0, "fc8": 0.01}, {"epoch": 1, "conv5": 0.01}]
    train(tiny(store, init_from=str(src_dir), init_layers="all", schedule="table", lr_table=table, schedule_epochs=2),
          tmp_path / "ft", progress=False)
    ft = load_checkpoint(tmp_path / "ft")
    moved = {k for k, v in ft.model.items() if not torch.equal(v, src.model[k])}
    assert moved == {"fc8.weight", "fc8.bias", "tower_a.conv5.weight", "tower_a.conv5.bias", "tower_b.conv5.weight",
                     "tower_b.conv5.bias"}
    epochs = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    lrs = [e["lr"] for e in epochs if "lr" in e]
    assert [(lr["fc8.weight"], lr["conv5.weight"], lr["weight"], lr["conv1.bias"]) for lr in lrs] == [
        (0.01, 0, 0, 0), (0.01, 0.01, 0, 0)]
    from replica.inference import file_sha1
    from replica.report import report

    text = report([tmp_path / "ft"], tmp_path / "rep").read_text()
    line = next(x for x in text.splitlines() if x.startswith("- ft: ") and "sha1" in x)  # the report names the source
    assert str(src_dir / "last.pt") in line and file_sha1(src_dir / "last.pt")[:12] in line and "init_layers=all" in line


def test_init_from_another_run_loads_its_layers_and_draws_a_new_classifier(store, whole_run, tiny_tree, tmp_path,
                                                                             capsys):
    """init_from=RUN: with a learning rate too small to move them, the loaded layers are the
    source's after an epoch (within 1e-5), fc8 is fresh (all-but-classifier), the source is
    recorded; another class count gets its own fc8; asking for fc8 across class counts is one line."""
    from replica.data.writer import prepare
    from replica.inference import file_sha1

    src_dir, _ = whole_run
    src = load_checkpoint(src_dir)
    tiny_lr = dict(lr=1e-12, bias_lr=1e-12)
    train(tiny(store, init_from=str(src_dir), epochs=1, **tiny_lr), tmp_path / "ft", progress=False)
    ft = load_checkpoint(tmp_path / "ft")
    for k, v in ft.model.items():
        if k.startswith("fc8"):
            assert not torch.allclose(v, src.model[k]), k  # drawn anew
        else:
            torch.testing.assert_close(v, src.model[k], rtol=0, atol=1e-5, msg=k)
    rec = json.loads((tmp_path / "ft" / "init_from.json").read_text())
    assert rec["sha1"] == file_sha1(src_dir / "last.pt") and "tower_a.conv1" in rec["layers"] and "fc8" not in rec["layers"]
    prepare(tiny_tree, tmp_path / "st3", workers=1, progress=False)  # 3 classes: another fc8
    train(tiny(tmp_path / "st3", init_from=str(src_dir), epochs=1, batch_size=3, steps_per_epoch=1),
          tmp_path / "three", progress=False)
    assert load_checkpoint(tmp_path / "three").model["fc8.weight"].shape[0] == 3
    assert main(["train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), f"data={tmp_path / 'st3'}", f"init_from={src_dir}", "init_layers=all", "batch_size=3",
                 "epochs=1", "steps_per_epoch=1", "workers=0", "devices=cpu", f"width={NARROW}", "tensorboard=false",
                 "live=false", "--out", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fc8.weight is (4," in err[0] and "init_layers=all-but-classifier" in err[0]
