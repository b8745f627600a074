"""Two processes under torchrun (gloo on the CPU), with faults on one rank only.

Every decision that leads into a collective is taken by all processes at the same step: a
timed save while rank 0's writes take seconds, a Ctrl-C sent to the whole process group, a
NaN, a batch of bad inputs or a dead loader worker on rank 1 alone. Each run either finishes
or stops every process at one step, with one message, progress saved, and resume completes.
Real processes, real signals; the faults are injected by a driver that wraps the product's
own functions in the rank named by ``FAULT_RANK``.
"""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from replica.runs import load_checkpoint, read_metrics
from runs_helpers import NARROW

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "alexnet-2gpu.yaml")

DRIVER = r"""
import os, signal, sys, time
import torch
rank = int(os.environ.get("RANK", 0))
fault = os.environ.get("FAULT", "")
mine = rank == int(os.environ.get("FAULT_RANK", "-1"))

import replica.runs as runs
import replica.train as train_mod
from replica.data.loaders import TrainBatches

if os.environ.get("SLOW_SAVE") and rank == 0:  # rank 0's writes take seconds
    real_write = runs.atomic_write
    def slow(path, write):
        def w(f):
            write(f)
            f.flush()
            print(f"WRITING {path}", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["SLOW_SAVE"]))
        real_write(path, w)
    runs.atomic_write = slow

if os.environ.get("STEP_SLEEP"):  # slow steps (from step STEP_SLEEP_FROM on), so that a signal lands mid-epoch
    real_step, steps = train_mod.train_step, []
    def sleepy(*a, **k):
        steps.append(1)  # a first run's steps: the run's step number
        if len(steps) >= int(os.environ.get("STEP_SLEEP_FROM", 1)):
            time.sleep(float(os.environ["STEP_SLEEP"]))
        print(f"STEP {len(steps)} rank {rank}", file=sys.stderr, flush=True)
        return real_step(*a, **k)
    train_mod.train_step = sleepy

if fault == "nan" and mine:  # rank 1's 8th loss (epoch 2, step 2) is NaN
    real_ce, calls = train_mod.F.cross_entropy, []
    def ce(logits, y):
        calls.append(1)
        out = real_ce(logits, y)
        return out * float("nan") if len(calls) == 8 else out
    train_mod.F.cross_entropy = ce

if fault in ("bad", "worker") and mine:
    real_get = TrainBatches.__getitem__
    def get(self, i):
        b = self.start + i
        if self.epoch == 1 and b == 1:
            if fault == "worker":  # as the kernel's OOM killer would
                os.kill(os.getpid(), signal.SIGKILL)
            crops, shift, labels, b, _ = real_get(self, i)
            bad = [(f"image{k}.jpg", "injected: unreadable", k) for k in range(len(labels))]
            return crops[:0], None, labels[:0], b, bad
        return real_get(self, i)
    TrainBatches.__getitem__ = get

from replica.cli import entry
entry(sys.argv[1:])
"""


def torchrun(driver, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver),
            "train", *args]


def env(**kw):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    e.update({k: str(v) for k, v in kw.items()})
    return e


def run(cmd, timeout=240, **kw):
    r = subprocess.run(cmd, env=env(**kw), capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def same_weights(a, b):
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a.progress.step == b.progress.step
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.momentum:
        assert torch.equal(a.momentum[k][0], b.momentum[k][0]), k


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    p = tmp_path_factory.mktemp("driver") / "driver.py"
    p.write_text(DRIVER)
    return p


# the narrow net: the collectives, faults and resume are the same code at any width
ARGS = ["batch_size=4", "workers=0", "devices=cpu", "init=caffe", "checkpoint_minutes=60", f"width={NARROW}",
        "tensorboard=false", "live=false"]


def run_args(store):
    return [CONFIG, f"data={store}", *ARGS, "epochs=2", "steps_per_epoch=6"]


FAULTS = ("nan", "bad", "worker")


SIDE_BY_SIDE = 2  # torchrun jobs at once in ``jobs`` (3 or 4 at once were no faster on 2 cores)


def run_job(slots, cmd, kw, timeout=240):
    """(status, log) of one job, run when one of ``slots`` is free; status None: killed after
    ``timeout`` s."""
    with slots:
        p = subprocess.Popen(cmd, env=env(**kw), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out = p.communicate(timeout=timeout)[0]
            return p.returncode, out
        except subprocess.TimeoutExpired:
            p.kill()
            return None, p.communicate()[0] + f"\n(killed after {timeout} s)"


@pytest.fixture(scope="module")
def jobs(store, driver, tmp_path_factory):
    """The uninterrupted job of ``run_args`` (2 processes, 2 epochs × 6 steps; with timed saves,
    slow writes and slow steps) and the three jobs with a fault on rank 1, each followed by its
    resume: two jobs at a time, the next started as soon as one ends. A job is ~6 s of process
    start-ups and under 1 s of steps, and alone keeps ~1.5 of the 2 cores busy: side by side the
    jobs fill the idle time. Each fault's checkpoint is copied before its resume. Read them;
    never write in them. Returns (folder, {job: (status, log)} of the first runs, {fault:
    (status, log)} of the resumes)."""
    base = tmp_path_factory.mktemp("ranks")
    slots, first, then = threading.Semaphore(SIDE_BY_SIDE), {}, {}

    def reference_job():
        # the reference also makes timed saves while rank 0's writes are slow (a save changes nothing)
        timed = [a if a != "checkpoint_minutes=60" else "checkpoint_minutes=0.01" for a in run_args(store)]
        first["ref"] = run_job(slots, torchrun(driver, *timed, "--out", str(base / "ref")),
                               dict(SLOW_SAVE=0.5, STEP_SLEEP=0.2))

    def fault_then_resume(fault):
        args = run_args(store)
        if fault == "worker":
            args[args.index("workers=0")] = "workers=1"
        first[fault] = run_job(slots, torchrun(driver, *args, "--out", str(base / fault)),
                               dict(FAULT=fault, FAULT_RANK=1))
        if (base / fault / "last.pt").exists():
            shutil.copy(base / fault / "last.pt", base / f"{fault}-after-the-fault.pt")
            then[fault] = run_job(slots, torchrun(driver, "--resume", str(base / fault)), {})

    threads = [threading.Thread(target=reference_job)]
    threads += [threading.Thread(target=fault_then_resume, args=(f,)) for f in FAULTS]
    for t in threads:
        t.start()
        time.sleep(0.05)  # in order: the reference first (its sleeps overlap the most)
    for t in threads:
        t.join()
    return base, first, then


@pytest.fixture(scope="module")
def reference(jobs):
    """The uninterrupted job of ``run_args``: what a stopped and resumed job must equal, bit for bit."""
    base, first, _ = jobs
    rc, log = first["ref"]
    assert rc == 0, log[-3000:]
    return base / "ref"


def test_timed_saves_while_rank0_writes_slowly(jobs, reference):
    """The reference job: a save every ~0.6 s by rank 0's clock, each of rank 0's writes held
    0.5 s, steps of 0.2 s: 12 steps finish, nothing hangs (and its weights are what the stopped
    and resumed jobs must equal: saves change nothing)."""
    rc, log = jobs[1]["ref"]
    writes = [line for line in log.splitlines() if "WRITING" in line and line.endswith("last.pt")]
    print(f"\n{len(writes)} writes of last.pt by rank 0 (2 at epoch ends), each held 0.5 s")
    assert len(writes) >= 2 + 2, log[-3000:]  # the 2 epoch ends, and timed saves mid-epoch
    assert [m["epoch"] for m in read_metrics(reference)] == [1, 2]
    ck = load_checkpoint(reference)
    assert ck.progress.step == 12 and ck.progress.done and len(ck.rng) == 2


def test_sigint_to_the_process_group_saves_and_resume_is_bit_equal(store, driver, reference, tmp_path):
    """Ctrl-C as a terminal sends it (to torchrun and both workers); torchrun forwards it again."""
    args = run_args(store)
    ref, cut = reference, tmp_path / "cut"

    p = subprocess.Popen(torchrun(driver, *args, "--out", str(cut)), env=env(STEP_SLEEP=0.5, STEP_SLEEP_FROM=7),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines = []
    for line in p.stdout:  # until both ranks are inside the second epoch
        lines.append(line)
        if "STEP 8 rank 1" in line:  # (a progress bar may share its line)
            break
    else:
        pytest.fail("".join(lines)[-3000:])
    t0 = time.time()
    os.killpg(p.pid, signal.SIGINT)
    rest, _ = p.communicate(timeout=60)
    took = time.time() - t0
    log = "".join(lines) + rest
    print(f"\nSIGINT to the process group: torchrun and both ranks exited {took:.1f} s later")
    assert took < 30, f"{took:.0f} s to exit\n{log[-3000:]}"
    assert log.count("stopped by SIGINT") == 1, log[-3000:]
    ck = load_checkpoint(cut)
    assert not ck.progress.done and 8 <= ck.progress.step < 12 and len(ck.rng) == 2
    rc, log = run(torchrun(driver, "--resume", str(cut)))
    assert rc == 0, log[-3000:]
    same_weights(ref, cut)
    assert [m["epoch"] for m in read_metrics(cut)] == [1, 2]
    assert [m["val_top1_err"] for m in read_metrics(cut)] == [m["val_top1_err"] for m in read_metrics(ref)]


@pytest.mark.parametrize("fault,message,step", [
    ("nan", "process 1: loss is nan at epoch 2, step 2: stopped. The last good checkpoint", 6),
    ("bad", "process 1: every input of batch 2 was bad", 7),
    ("worker", "process 1: a data-loader worker died at epoch 2, batch", None),
])
def test_a_fault_on_one_rank_stops_every_rank_at_one_step(jobs, reference, fault, message, step):
    base, first, then = jobs
    out = base / fault
    rc, log = first[fault]
    assert rc not in (0, None), log[-3000:]
    errors = [line for line in log.splitlines() if "replica: error:" in line]
    assert len(errors) == 1 and message in errors[0], log[-3000:]  # one message, from rank 0, naming rank 1
    ck = load_checkpoint(base / f"{fault}-after-the-fault.pt")
    if step is not None:
        assert ck.progress.step == step
    else:  # the worker's death is seen before or after batch 1 is handed over
        assert ck.progress.step in (6, 7)
    assert all(torch.isfinite(v).all() for v in ck.model.values())
    if fault != "nan":
        assert "Progress is saved in" in errors[0] and f"replica train --resume {out}" in errors[0]
    rc, log = then.get(fault, (None, "no checkpoint was left to resume from"))
    assert rc == 0, log[-3000:]
    ck = load_checkpoint(out)
    assert ck.progress.done and ck.progress.step == 12
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]
    if fault == "nan":  # resumed from the last good checkpoint, the job is the uninterrupted one
        same_weights(reference, out)


# -- launchers: srun without torchrun, and torchrun over two "nodes" ------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(procid, ntasks, **extra):
    """What ``srun -n NTASKS`` sets for one task on one node (the variables replica reads), plus
    what a cluster script exports; no RANK, no torchrun."""
    e = env(SLURM_JOB_ID=4242, SLURM_PROCID=procid, SLURM_NTASKS=ntasks, SLURM_STEP_NUM_TASKS=ntasks,
            SLURM_LOCALID=procid, SLURM_NODEID=0, SLURM_TASKS_PER_NODE=ntasks, SLURM_STEP_TASKS_PER_NODE=ntasks,
            SLURM_NTASKS_PER_NODE=ntasks, **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        e.pop(k, None)
    return e


def test_srun_tasks_without_torchrun_are_one_job(store, tmp_path):
    """Two processes with SLURM's variables and MASTER_ADDR/PORT, as ``srun -n 2 replica train``
    starts them: one job of two processes (one metrics line per epoch, both ranks' RNG saved),
    not two rank-0 jobs writing into one folder. Without MASTER_PORT: one line, no hang."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "replica", "train", *run_args(store)[:1], f"data={store}", *ARGS, "epochs=1",
            "steps_per_epoch=2", "save_best=false", "--out", str(out)]
    port = free_port()
    procs = [subprocess.Popen(args, env=slurm_env(i, 2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "job of 2 process(es): gloo" in logs[0]
    assert len(read_metrics(out)) == 1  # epoch 1 logged once
    ck = load_checkpoint(out)
    assert len(ck.rng) == 2 and ck.progress.step == 2
    rc, log = run([*args[:-1], str(tmp_path / "other")], **{k: v for k, v in slurm_env(0, 2).items()
                                                            if k.startswith("SLURM")})
    assert rc == 2 and "srun started 2 tasks" in log and "MASTER_ADDR and MASTER_PORT" in log, log
    assert "Traceback" not in log and not (tmp_path / "other" / "last.pt").exists()


def test_two_torchrun_agents_with_c10d_rendezvous_train_one_job(store, tmp_path):
    """The multi-node recipe on one host: two torchrun agents (``--nnodes 2``, one process each)
    meet through c10d and train one 2-process job, as one torchrun per node under srun does."""
    port = free_port()
    out = tmp_path / "run"

    def agent(node):
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", "replica-test", "-m", "replica", "train", *run_args(store)[:1], f"data={store}", *ARGS,
                "epochs=1", "steps_per_epoch=2", "save_best=false", "--out", str(out)]

    procs = [subprocess.Popen(agent(n), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "job of 2 process(es): gloo" in "".join(logs)
    ck = load_checkpoint(out)
    assert len(ck.rng) == 2 and ck.progress.step == 2 and len(read_metrics(out)) == 1
