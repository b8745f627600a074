"""Watching a run as it trains (replica.live): TensorBoard's event files, the pictures redrawn at
each epoch's end, and the run going on without TensorBoard."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import replica.train as train_mod
from replica.train import train
from runs_helpers import tiny

ROOT = Path(__file__).resolve().parents[1]


def events(run: Path):
    """The run's TensorBoard events, read by TensorBoard's own reader (which drops what a
    resumed run's purge_step says was written past its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_documented_tags_and_a_resumed_run_no_step_twice(store, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(tiny(store, tensorboard=True), whole, progress=False)  # 2 epochs × 3 steps
    acc = events(whole)
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr/weight", "train/lr/bias", "train/images_per_s", "val/top1_err",
                "fig3/colour_specificity/tower_a", "fig3/colour_specificity/tower_b"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert "val/top5_err" not in tags["scalars"]  # 4 classes: top-5 is n/a, not plotted as 0
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]  # every loss read, on the CPU each step
    assert [e.step for e in acc.Scalars("val/top1_err")] == [3, 6]
    assert [e.step for e in acc.Images("fig3/conv1_kernels")] == [3, 6]
    assert "config/text_summary" in tags["tensors"]
    from replica.runs import read_metrics

    m = read_metrics(whole)
    assert [round(e.value, 6) for e in acc.Scalars("val/top1_err")] == [round(r["val_top1_err"], 6) for r in m]

    # a run killed in epoch 2 after its events were written, its last checkpoint epoch 1's: the resume
    # redoes steps 4-6 and writes their events again, which TensorBoard must show once
    real = train_mod.end_of_epoch

    def keep_epoch_1(run, *a):
        real(run, *a)
        if run.progress.epoch == 1:
            shutil.copy(run.last, tmp_path / "epoch1.pt")

    monkeypatch.setattr(train_mod, "end_of_epoch", keep_epoch_1)
    train(tiny(store, tensorboard=True), cut, progress=False)
    monkeypatch.undo()
    shutil.copy(tmp_path / "epoch1.pt", cut / "last.pt")
    train(tiny(store, tensorboard=True), cut, resume=True, progress=False)
    acc = events(cut)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6], steps  # the resume continues the curve: no step twice, none missing
    want = [e.value for e in events(whole).Scalars("train/loss")]
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/loss")], want, rtol=1e-6)  # bit-equal resume


def test_without_tensorboard_the_run_goes_on_and_says_so_once(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    train(tiny(store, tensorboard=True), tmp_path / "run", progress=False)
    out = capsys.readouterr()
    said = (out.out + out.err).count("TensorBoard is not installed")
    assert said == 1 and "pip install -e '.[tensorboard]'" in out.out + out.err
    assert not (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "last.pt").exists()
    train(tiny(store), tmp_path / "off", progress=False)  # tensorboard=false: not a word
    assert "TensorBoard" not in "".join(capsys.readouterr())


KILL_AFTER_EPOCH_1 = r"""
import os, signal, sys
import replica.train as t
real = t.end_of_epoch
def end_then_die(*a):
    real(*a)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would, right after epoch 1's end
t.end_of_epoch = end_then_die
from replica.cli import entry
entry(sys.argv[1:])
"""


def test_the_pictures_are_in_the_run_folder_after_epoch_1_of_a_run_then_killed(store, tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    args = [sys.executable, "-c", KILL_AFTER_EPOCH_1, "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"),
            f"data={store}", "batch_size=4", "epochs=3", "steps_per_epoch=2", "workers=0", "devices=cpu",
            "init=caffe", "width=0.0625", "tensorboard=false", "live=true", "--out", str(run)]
    p = subprocess.run(args, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240)
    assert p.returncode == -9, p.stderr[-2000:]
    for name in ("curves.png", "filters.png"):
        img = Image.open(run / name)
        img.load()  # a whole PNG: written to a temporary file, then renamed
        assert img.size[0] > 300, name
    assert not list(run.glob(".*.tmp"))


def test_a_short_epochs_rate_is_not_shown_as_0():
    """The epoch bar said img_s=0 at the end of a short epoch (its first step's compile in the time)."""
    from replica.live import rate_text

    assert [rate_text(r) for r in (0.1337, 3.5, 147.6, 12345.6)] == ["0.13", "3.5", "148", "12346"]
