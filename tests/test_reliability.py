"""Fault injection: each promise of docs/reliability.md, proven by doing the damage for real.

Kills are real SIGKILLs of a real ``replica train`` process; disk-full and permission errors
are raised by the file calls the run makes; bad data is truncated, garbled or deleted files;
a loader worker is killed by signal. ``-m slow`` adds the 2,000-step memory test.
"""
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import replica.runs as runs
from replica.cli import main
from replica.config import load_config
from replica.data.loaders import TrainBatches
from replica.errors import ReplicaError
from replica.runs import load_checkpoint, read_metrics
from replica.data.writer import prepare
from replica.data.synth import synth
from replica.train import train
from runs_helpers import NARROW, TINY_ARGS, StopAfter, tiny

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "alexnet-2gpu.yaml")


def assert_same_weights(run_a, run_b):
    a, b = load_checkpoint(run_a), load_checkpoint(run_b)
    assert a.progress.step == b.progress.step
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    assert a.momentum.keys() == b.momentum.keys()
    for k in a.momentum:
        assert torch.equal(a.momentum[k][0], b.momentum[k][0]) and a.momentum[k][1] == b.momentum[k][1], k


def one_line_error(capsys) -> str:
    """The last thing on stderr is one 'replica: error:' line (progress bars may come before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # splitlines also splits on a progress bar's \r
    assert last.startswith("replica: error:"), err
    return last


# -- killed at any moment ----------------------------------------------------------------------

# `replica train` with every .pt write held open for SLOW seconds after its bytes are written
# and before the rename: a kill then lands in the middle of a checkpoint write
DRIVER = """
import os, sys, time
import replica.runs as runs
real = runs.atomic_write
def slow(path, write):
    def w(f):
        write(f)
        f.flush()
        print("WRITING", path, file=sys.stderr, flush=True)
        time.sleep(float(os.environ["SLOW"]))
    real(path, w)
runs.atomic_write = slow
"""

# One process that imports the package once, then forks a `replica train` for each attempt (argv
# and a log file, a JSON line on stdin; it answers the child's pid, then its exit status): each
# attempt is a real process, killed by a real SIGKILL, without the ~2 s start-up of torch.
ZYGOTE = DRIVER + """
import json
import replica.train, replica.inference, replica.filters, replica.report, replica.neighbors  # imported, nothing run: safe to fork
from replica.cli import main
for line in sys.stdin:
    argv, log = json.loads(line)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # empty before the pid is answered
    pid = os.fork()
    if pid == 0:
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        try:
            code = main(argv)
        except BaseException as e:
            print("CHILD FAILED", repr(e), file=sys.stderr)
            code = 3
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    os.close(fd)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(store, tmp_path):
    import json
    import queue

    args = [f"data={store}", "batch_size=4", "epochs=3", "steps_per_epoch=2", "workers=0", "devices=cpu",
            "init=caffe", f"width={NARROW}", "checkpoint_minutes=0.0001"]  # last.pt after every step: many writes
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", SLOW="0.5")
    ref, run = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted run in this process (one process start fewer); the killed one in others
    assert main(["train", CONFIG, *args, "--out", str(ref)]) == 0

    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    answers = queue.Queue()
    threading.Thread(target=lambda: [answers.put(int(x)) for x in zygote.stdout], daemon=True).start()
    rng = random.Random(20121203)
    kills, mid_write, seen_step, seen_epochs = 0, 0, -1, 0
    try:
        for attempt in range(6):
            argv = (["train", "--resume", str(run)] if (run / "config.yaml").exists()
                    else ["train", CONFIG, *args, "--out", str(run)])
            log = tmp_path / f"attempt-{attempt}.log"
            zygote.stdin.write(json.dumps([argv, str(log)]) + "\n")
            zygote.stdin.flush()
            pid = answers.get(timeout=60)
            # even attempts: kill while a checkpoint is half-way (bytes written, not yet renamed);
            # odd attempts: at a random moment 0.3-3 s after a write began (the narrow net's steps
            # take milliseconds: the ~8 held writes left span about 4 s); later attempts, later writes
            want = 1 + attempt // 2

            def writes():  # (a progress bar may precede the line)
                text = log.read_text() if log.exists() else ""
                return sum("WRITING" in ln and ln.rstrip().endswith(".pt") for ln in text.split("\n"))

            deadline, ended = time.time() + 120, None
            while writes() < want and ended is None and time.time() < deadline:
                try:
                    ended = answers.get(timeout=0.01)
                except queue.Empty:
                    pass
            if ended is not None:  # the run ended before reaching the kill point
                assert ended == 0, log.read_text()[-3000:]
                break
            assert writes() >= want, log.read_text()[-3000:]
            time.sleep(rng.uniform(0.3, 3.0) if attempt % 2 else 0.2)  # 0.2 s: inside the held write (0.5 s)
            if not answers.empty():
                assert answers.get() == 0, log.read_text()[-3000:]
                break
            os.kill(pid, signal.SIGKILL)
            assert answers.get(timeout=60) == -signal.SIGKILL
            kills += 1
            mid_write += attempt % 2 == 0
            if (run / "last.pt").exists():
                ck = load_checkpoint(run / "last.pt")  # the last checkpoint always loads
                prog = ck.progress
                assert prog.step >= seen_step  # nothing saved is ever lost
                assert prog.epoch >= seen_epochs  # no finished epoch is lost
                seen_step, seen_epochs = prog.step, prog.epoch
                assert len(prog.records) == prog.epoch
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    print(f"\n{kills} SIGKILLs ({mid_write} inside a held checkpoint write); last.pt loaded after each, "
          f"last saved step {seen_step}, finished epochs {seen_epochs}")
    assert kills >= 5 and mid_write >= 3
    assert main(["train", "--resume", str(run)]) == 0  # the last resume here: nothing kills it
    assert_same_weights(ref / "last.pt", run / "last.pt")
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2, 3]
    assert [m["val_top1_err"] for m in read_metrics(run)] == [m["val_top1_err"] for m in read_metrics(ref)]


def test_resume_before_the_first_checkpoint_starts_over(store, tmp_path, capsys):
    cfg = tiny(store, epochs=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("x: 1\n")  # killed after config.yaml, before last.pt
    r = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert r["step"] == 3 and "no checkpoint yet: starting from the beginning" in capsys.readouterr().out


def test_a_torn_metrics_line_is_repaired_from_the_checkpoint(store, whole_run, tmp_path, monkeypatch):
    import replica.train as train_mod

    cfg = tiny(store)
    whole = whole_run[0]
    stopped = tmp_path / "cut"
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(6))  # one step into epoch 2
    train(cfg, stopped, progress=False)
    monkeypatch.undo()
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a kill tore the next line
    assert [m["epoch"] for m in read_metrics(stopped)] == [1]  # readers skip the torn line
    train(cfg, stopped, resume=True, progress=False)
    got, want = read_metrics(stopped), read_metrics(whole)
    assert [m["epoch"] for m in got] == [1, 2]
    for a, b in zip(got, want):
        assert (a["train_loss"], a["val_top1_err"], a["step"]) == (b["train_loss"], b["val_top1_err"], b["step"])
    assert_same_weights(whole / "last.pt", stopped / "last.pt")


# -- disk full, read-only output -----------------------------------------------------------------


def failing_save(monkeypatch, fail_at: int, err: int):
    """torch.save that writes part of the file, then fails like a full disk, at its fail_at-th call."""
    real, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            f.write(b"\0" * 4096)
            raise OSError(err, os.strerror(err))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("err,words", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")])
def test_checkpoint_write_fails_previous_intact_message_names_path_and_cause_then_resume(
        store, whole_run, tmp_path, monkeypatch, capsys, err, words):
    ref = whole_run[0]
    run = tmp_path / "run"
    # saves: epoch 1 best, epoch 1 last, epoch 2 best (if better), epoch 2 last; fail the last one
    saves = 4 if load_checkpoint(ref / "best.pt").progress.epoch == 2 else 3
    failing_save(monkeypatch, saves, err)
    code = main(["train", CONFIG, f"data={store}", *TINY_ARGS, "--out", str(run)])
    assert code == 2
    msg = one_line_error(capsys)
    assert f"cannot write {run / 'last.pt'}: {words}" in msg
    assert "the previous checkpoint is intact" in msg and f"replica train --resume {run}" in msg
    monkeypatch.undo()
    ck = load_checkpoint(run / "last.pt")
    assert ck.progress.epoch == 1 and ck.progress.step == 3  # epoch 1's, unharmed
    assert not list(run.glob(".*.tmp"))  # the partial file is gone
    assert main(["train", "--resume", str(run)]) == 0  # space is back
    assert_same_weights(ref / "last.pt", run / "last.pt")
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


def test_metrics_write_fails_then_resume_restores_every_epoch(store, whole_run, tmp_path, monkeypatch, capsys):
    ref, run = whole_run[0], tmp_path / "run"

    def no_metrics(path, *a, **k):
        if Path(path).name == "metrics.jsonl" and "a" in (a[0] if a else k.get("mode", "r")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(runs, "open", no_metrics, raising=False)
    assert main(["train", CONFIG, f"data={store}", *TINY_ARGS, "--out", str(run)]) == 2
    assert f"cannot write {run / 'metrics.jsonl'}: Permission denied" in one_line_error(capsys)
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert [(m["epoch"], m["train_loss"]) for m in read_metrics(run)] == \
        [(m["epoch"], m["train_loss"]) for m in read_metrics(ref)]
    assert_same_weights(ref / "last.pt", run / "last.pt")


# -- corrupt data at train time ------------------------------------------------------------------


def test_truncated_store_rows_are_skipped_logged_and_counted_or_fail_with_strict(store, tmp_path, capsys):
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    f = damaged / "train" / "images.u8"
    row = 3 * 256 * 256
    n = f.stat().st_size // row
    with open(f, "r+b") as fh:
        fh.truncate((n - 3) * row + row // 2)  # the last 3 rows lost, one of them half-written
    cfg = tiny(damaged, epochs=1, steps_per_epoch=None)  # 24 images, 6 batches: every row once
    train(cfg, tmp_path / "run", progress=False)
    m = read_metrics(tmp_path / "run")[0]
    assert m["skipped_files"] == 3
    lines = (tmp_path / "run" / "bad_inputs.tsv").read_text().splitlines()
    assert lines[0] == "epoch\tbatch\tinput\treason" and len(lines) == 4
    assert {ln.split("\t")[2] for ln in lines[1:]} == {f"{f} row {r}" for r in (n - 3, n - 2, n - 1)}
    assert "truncated store" in capsys.readouterr().out
    with pytest.raises(ReplicaError, match=r"bad input .*images.u8 row \d+: truncated store.*strict_data=true"):
        train(tiny(damaged, epochs=1, steps_per_epoch=None, strict_data=True), tmp_path / "strict", progress=False)
    assert (tmp_path / "strict" / "last.pt").exists()  # the steps before it are kept


def test_bad_files_in_an_image_folder_are_skipped_logged_and_counted(tiny_tree, tmp_path, monkeypatch):
    """A truncated JPEG, a text file under .jpg, and a file deleted after it was indexed."""
    truncated = tiny_tree / "train" / "ant" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tiny_tree / "train" / "bee" / "0.jpg").write_text("not an image")
    vanishing = tiny_tree / "train" / "cat" / "1.jpg"
    import replica.train as train_mod

    real = train_mod.open_training

    def open_then_delete(data, val_data):
        out = real(data, val_data)
        vanishing.unlink()  # indexed, then gone
        return out

    monkeypatch.setattr(train_mod, "open_training", open_then_delete)
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(tiny_tree), batch_size=3, epochs=1, workers=0, devices="cpu",
                                 init="caffe", width=NARROW))
    train(cfg, tmp_path / "run", progress=False)
    m = read_metrics(tmp_path / "run")[0]
    assert m["skipped_files"] == 3 and m["step"] == 5  # 15 images, batches of 3: all steps ran
    reasons = {Path(ln.split("\t")[2]).relative_to(tiny_tree).as_posix(): ln.split("\t")[3]
               for ln in (tmp_path / "run" / "bad_inputs.tsv").read_text().splitlines()[1:]}
    assert reasons.keys() == {"train/ant/0.jpg", "train/bee/0.jpg", "train/cat/1.jpg"}
    assert reasons["train/cat/1.jpg"] == "file not found"
    assert "not an image" in reasons["train/bee/0.jpg"]
    assert "decode" in reasons["train/ant/0.jpg"] or "truncated" in reasons["train/ant/0.jpg"]
    monkeypatch.undo()
    with pytest.raises(ReplicaError, match="bad input .*strict_data=true"):
        train(load_config(None, dict(cfg.to_dict(), strict_data=True)), tmp_path / "strict", progress=False)


def test_a_batch_of_only_bad_inputs_is_passed_over(store, tmp_path, capsys):
    damaged = tmp_path / "store"
    shutil.copytree(store, damaged)
    with open(damaged / "train" / "images.u8", "r+b") as fh:
        fh.truncate(0)  # every row gone
    r = train(tiny(damaged, epochs=1), tmp_path / "run", progress=False)
    assert r["step"] == 3
    m = read_metrics(tmp_path / "run")[0]
    assert m["skipped_files"] == 12 and m["train_loss"] is None  # no loss was computed: none is claimed
    out = capsys.readouterr().out
    assert out.count("warning: skipped") == 10 and "further bad inputs are listed in" in out
    assert len((tmp_path / "run" / "bad_inputs.tsv").read_text().splitlines()) == 13  # header + all 12


def test_a_damaged_store_gets_one_line_errors(store, tmp_path, capsys):
    for name, damage in [("labels.npy", lambda p: p.write_bytes(b"garbage")),
                         ("images.u8", lambda p: p.unlink()),
                         ("meta.json", lambda p: p.write_text("{ not json")),
                         ("mean.npy", lambda p: p.unlink())]:
        d = tmp_path / name
        shutil.copytree(store, d)
        damage(d / name if (d / name).exists() else d / "train" / name)
        assert main(["train", CONFIG, f"data={d}", "devices=cpu", "--out", str(tmp_path / f"run-{name}")]) == 2
        assert name in one_line_error(capsys)


# -- bad checkpoints, through every command that reads one ---------------------------------------


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'PWNED'}",))


def test_bad_checkpoints_one_line_no_code_runs_through_every_command(store, tmp_path, capsys):
    good = tmp_path / "good"
    train(tiny(store, epochs=1, steps_per_epoch=1), good, progress=False)
    data = (good / "last.pt").read_bytes()
    torch.save({"format": "replica-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(os.urandom(4096))
    half = tmp_path / "half"
    train(tiny(store, epochs=1, steps_per_epoch=1, variant="one-gpu-half"), half, progress=False)
    cases = {"evil.pt": "refused to load", "cut.pt": "not a readable checkpoint",
             "junk.pt": "not a readable checkpoint"}
    img = next((store.parent / "synth" / "val").rglob("*.jpg"))
    for name, words in cases.items():
        ck = tmp_path / name
        for argv in (["eval", str(ck), "--data", str(store), "--views", "1"], ["predict", str(ck), str(img)],
                     ["filters", str(ck), "--out", str(tmp_path / "f")]):
            assert main(argv) == 2, argv
            assert words in one_line_error(capsys), argv
        run = tmp_path / f"resume-{name}"
        shutil.copytree(good, run)
        shutil.copy(ck, run / "last.pt")
        assert main(["train", "--resume", str(run)]) == 2
        assert words in one_line_error(capsys)
    assert not (Path(__file__).parent / "PWNED").exists()  # nothing ran
    # another variant's checkpoint under a two-tower run
    run = tmp_path / "resume-half"
    shutil.copytree(good, run)
    shutil.copy(half / "last.pt", run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 2
    assert "checkpoint has variant='one-gpu-half', but this run has variant='two-tower'" in one_line_error(capsys)


# -- bad configs and arguments ---------------------------------------------------------------------


def _empty_classes(tmp):
    for c in ("a", "b"):
        (tmp / "empty" / "train" / c).mkdir(parents=True, exist_ok=True)
    return tmp / "empty"


def _yaml(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return p


# (argv after "train", or a callable of tmp_path giving it; the words the error must hold)
MISTAKES = [
    (lambda t, s: [CONFIG, "batchsize=4"], "unknown config key 'batchsize' on the command line; did you mean 'batch_size'"),
    (lambda t, s: [str(_yaml(t, "typo.yaml", "lerning_rate: 0.1\n"))], "unknown config key 'lerning_rate'"),
    (lambda t, s: [CONFIG, "lr=fast"], "lr: expected a number, got 'fast'"),
    (lambda t, s: [CONFIG, "lr=-0.1"], "lr: expected a positive number"),
    (lambda t, s: [CONFIG, "epochs=0"], "epochs: expected a positive number"),
    (lambda t, s: [CONFIG, "batch_size=2.5"], "batch_size: expected an integer"),
    (lambda t, s: [CONFIG, "workers=-1"], "workers: expected a number ≥ 0"),
    (lambda t, s: [CONFIG, "dropout=maybe"], "dropout: expected true or false"),
    (lambda t, s: [CONFIG, "preset=paper"], "preset: expected one of 'as-run', 'paper-text'"),
    (lambda t, s: [CONFIG, "momentum=1.5"], "momentum: expected a number in [0, 1)"),
    (lambda t, s: [CONFIG, "lr_drops=[51,25]"], "lr_drops: expected increasing positive epochs"),
    (lambda t, s: [CONFIG, "lr"], "override 'lr': expected KEY=VALUE"),
    (lambda t, s: [str(t / "nope.yaml")], "no such file"),
    (lambda t, s: [str(_yaml(t, "broken.yaml", "lr: [0.1\n"))], "not valid YAML"),
    (lambda t, s: [str(_yaml(t, "list.yaml", "- lr\n- 0.1\n"))], "expected a mapping of keys to values"),
    (lambda t, s: [CONFIG], "data: required"),
    (lambda t, s: [CONFIG, f"data={t / 'missing'}"], "no such file or folder"),
    (lambda t, s: [CONFIG, f"data={_empty_classes(t)}"], "holds no image files"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cpu", f"val_data={t / 'nowhere'}"], "no such file or folder"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cpu", "num_classes=10"], "num_classes=10, but"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cuda:6,cuda:7"], "does not exist"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=tpu"], "(available: cpu"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cpu", "crop=300"], "crop 300 is larger than the 256×256 images"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cpu", "batch_size=64"], "fewer than one batch of 64"),
    (lambda t, s: [CONFIG, f"data={s}", "devices=cpu", "flip_chunk=0"], "flip_chunk: expected a positive integer"),
    (lambda t, s: ["--resume", str(t)], "not a run folder"),
    (lambda t, s: [], "give a CONFIG"),
]


@pytest.mark.parametrize("k", range(len(MISTAKES)))
def test_config_and_argument_mistakes_say_what_was_expected(store, tmp_path, capsys, k):
    argv, words = MISTAKES[k]
    out = tmp_path / "run"
    assert main(["train", *argv(tmp_path, store), "--out", str(out)]) == 2
    msg = one_line_error(capsys)
    assert words in msg, msg


def test_batch_that_does_not_split_across_processes(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun sets it; the check comes before any connection
    assert main(["train", CONFIG, f"data={store}", "devices=cpu", "batch_size=4", "--out", str(tmp_path / "r")]) == 2
    assert "batch_size 4 does not split across 3 processes: give a multiple of 3" in one_line_error(capsys)


def test_resume_refuses_new_settings_and_a_second_run_into_the_same_folder(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(store, epochs=1, steps_per_epoch=1), run, progress=False)
    assert main(["train", "--resume", str(run), "lr=0.1"]) == 2
    assert "give no CONFIG or overrides" in one_line_error(capsys)
    assert main(["train", CONFIG, f"data={store}", "devices=cpu", "--out", str(run)]) == 2
    assert f"continue it with --resume {run}" in one_line_error(capsys)


# -- a loader worker that dies -------------------------------------------------------------------


def test_a_killed_loader_worker_gives_a_clear_message_and_resume_completes(store, tmp_path, monkeypatch, capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(tiny(store, workers=1), ref, progress=False)
    real = TrainBatches.__getitem__

    def dies_at_epoch2_batch1(self, i):
        if torch.utils.data.get_worker_info() is not None and self.epoch == 1 and self.start + i == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return real(self, i)

    monkeypatch.setattr(TrainBatches, "__getitem__", dies_at_epoch2_batch1)
    argv = ["train", CONFIG, f"data={store}", *TINY_ARGS, "workers=1", "--out", str(run)]
    assert main(argv) == 2
    msg = one_line_error(capsys)
    # the iterator notices the death when it next waits for a batch: before or after batch 1 is handed over
    assert re.search(r"a data-loader worker died at epoch 2, batch [12] \(DataLoader worker", msg), msg
    assert "lower workers=1" in msg and f"resume with: replica train --resume {run}" in msg
    ck = load_checkpoint(run / "last.pt")
    assert ck.progress.epoch == 1 and ck.progress.in_epoch in (0, 1)  # every step before it is kept
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert_same_weights(ref / "last.pt", run / "last.pt")


# -- long runs ---------------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_2000_steps_memory_flat_and_step_time_steady(tmp_path):
    """8 epochs × 250 steps of batch 2: RSS after warm-up grows < 5%, the last epoch is not slower."""
    synth(tmp_path / "synth", classes=4, train_per_class=125, val_per_class=1, seed=4, progress=False)
    store = tmp_path / "store"
    prepare(tmp_path / "synth", store, progress=False)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "replica", "train", CONFIG, f"data={store}", "batch_size=2",
                          "epochs=8", "steps_per_epoch=250", "workers=1", "devices=cpu", "init=caffe",
                          "val_batches=1", "--out", str(run)], env=env, stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "stderr.txt", "w"))  # a pipe nobody reads would fill and block
    samples = []  # (epochs finished, RSS MB)
    while p.poll() is None:
        try:
            samples.append((len(read_metrics(run)), _rss_mb(p.pid)))
        except OSError:
            pass
        time.sleep(0.5)
    assert p.returncode == 0, (tmp_path / "stderr.txt").read_text()[-2000:]
    m = read_metrics(run)
    assert m[-1]["step"] == 2000
    warm = [r for e, r in samples if e == 1]  # during epoch 2, after warm-up
    late = [r for e, r in samples if e == 7]  # during epoch 8
    growth = np.median(late) / np.median(warm) - 1
    secs = [r["seconds"] for r in m]
    creep = secs[-1] / np.median(secs[1:4]) - 1
    print(f"\nRSS epoch 2 median {np.median(warm):.0f} MB, epoch 8 median {np.median(late):.0f} MB, "
          f"growth {growth:+.2%}; max {max(r for _, r in samples):.0f} MB; epoch seconds {[round(s, 1) for s in secs]}, "
          f"last vs epochs 2-4 {creep:+.2%}")
    assert growth < 0.05
    assert creep < 0.15
