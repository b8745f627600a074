#!/usr/bin/env python
"""The prepared GPU check: one script, ≤ 7 minutes on one GPU, each result printed as it ends.

    tools/gpu_check.sh [--dry-run] [--only a,b,...]

Uses the interpreter's own torch and torchvision (the lent machine has them preinstalled and no
network): nothing is installed; the package runs from this checkout (PYTHONPATH). First the
versions (driver, CUDA, cuDNN, NCCL, torch, torchvision), then what decides whether the rest can
run (the GPU's name and memory, free space in /dev/shm, a C compiler, Python.h and libcuda.so
for Triton), the per-check time budget, and then, in this order:

  (a) NCCL smoke runs under torchrun --nproc-per-node 1, NCCL plus the gloo group, DDP, 3 steps
      each, side by side: the process bound to its one GPU (``device_id``), and both towers on
      that GPU (``devices=cuda:0,cuda:0``: NCCL unbound, DDP with ``device_ids=None``, the path
      of a process that owns two GPUs);
  (b) the cuda:0,cpu split (every cross() copy on a real GPU) against the one-device net on the
      same weights, logits and every gradient, float32 with TF32 off;
  (c) 3 training steps under torch.cuda.set_sync_debug_mode("error") (no c10-visible host sync
      in a step, one GPU), raw store; the JPEG store with nvJPEG decoding under "warn", its
      syncs counted; host time per step beside the loop's time per step;
  (d) nvJPEG against CPU decoding of the same JPEG store (mean and max pixel difference), and
      a race stress test modelled on pytorch/vision PR 9606 (200 iterations; corrupted count,
      which must be 0 through replica's decode path; torchvision's bare call beside it);
  (e) the speed rows, each beside torchvision's AlexNet in the same run (``tools/bench.py
      core``: model step fp32 and bf16, host time per step, fused vs eager norms in bf16 with one
      compile, end to end from the raw and the JPEG store, ten-view evaluation);
  (f) pytest -m cuda (less the tests that repeat (a), (c) and (d)), with what time is left.

Each check runs in a process group of its own under a time limit taken from one budget, so a
hang or a crash loses that check only, and nothing it started outlives its limit. ``--dry-run``
runs the plumbing on the CPU (tiny sizes, gloo instead of NCCL, no sync-debug mode, bench flags
parsed, tests collected) and fails if a module, flag, file or function the checks name is
missing; its checks share one process (the same dispatch, five start-ups of torch fewer).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

# The lent GPU gives 13 minutes after its start: the script takes at most BUDGET_S (+ the
# start-up and a grace of GRACE_S), which leaves at least RERUN_S for one rerun of what failed.
LEASE_S = 13 * 60
BUDGET_S = 420
GRACE_S = 20
RERUN_S = 4 * 60
LIMITS = {"a": 60, "b": 25, "c": 55, "d": 40, "e": 190, "f": 130}  # per check, cut to what is left
SHM_MIN_GB = 4  # below this, (e)'s loaders use fewer workers and smaller batches (their batches live in /dev/shm)
CHECKS = "abcdef"
STEPS_C = 4  # check (c): the first step outside the debug mode, then 3 under it
DRY_WIDTH = 0.0625  # --dry-run: the net at 1/16 of its width (the same code); on a GPU, the paper's net

# What the checks rely on: checked first by --dry-run, so a rename here fails on the CPU.
NEEDS = dict(
    files=["configs/alexnet-2gpu.yaml", "tools/bench.py", "tests/test_cuda.py", "tools/gpu_check.sh"],
    modules=["replica.train", "replica.data.loaders", "replica.data.jpeg", "replica.model", "replica.data.store",
             "replica.data.synth",
             "torch.distributed.run"],
    functions=["replica.train:train_step", "replica.train:next_batch", "replica.dist:setup_ranks",
               "replica.data.jpeg:on_decode_stream", "replica.data.loaders:JpegBatch.decode", "replica.runtime:set_tf32",
               "torch.cuda:set_sync_debug_mode", "torchvision.io:decode_jpeg"],
    config_keys=["devices", "devices_per_process", "decode", "bf16", "tf32", "deterministic", "steps_per_epoch",
                 "workers", "init", "checkpoint_minutes", "val_batches", "width"],
    bench_args=["core", "--device", "cuda", "--batch", "256", "--steps", "8", "--images", "4096",
                "--eval-images", "1024", "--workers", "8", "--profile"],
)


def say(line: str) -> None:
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# What is installed


def versions() -> list[str]:
    import torch
    import torchvision

    from replica.runtime import cpu_description

    out = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"torchvision {torchvision.__version__}",
           f"CPU {cpu_description()}"]
    driver = "n/a"
    if shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        driver = r.stdout.strip().replace("\n", "; ") or r.stderr.strip()[:100]
    out.append(f"driver {driver}")
    out.append(f"CUDA {torch.version.cuda}")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out.append(f"cuDNN {cudnn}")
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
    except Exception as e:  # noqa: BLE001  (a build without NCCL: say so)
        nccl = f"n/a ({type(e).__name__})"
    out.append(f"NCCL {nccl}")
    if torch.cuda.is_available():
        out.append(f"GPUs {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}")
    return out


def prerequisites(cuda: bool) -> tuple[list[str], dict]:
    """What decides whether the checks can run, as lines, and what is missing as {what: why}.

    ``shm_gb``: free GB in /dev/shm (the loaders' batches pass through it: a container's default
    64 MB makes a worker die with "Bus error"). ``triton``: the toolchain Triton compiles its
    launcher with (a C compiler, Python.h, libcuda.so): without it the fused norms warn and run
    eager, and the checks that time or test them say "skipped: no …" instead of failing obscurely.
    """
    import sysconfig

    import torch

    lines, missing = [], {}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        lines.append(f"GPU {p.name}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
                     f"{p.multi_processor_count} SMs, compute capability {p.major}.{p.minor}")
    try:
        shm = shutil.disk_usage("/dev/shm").free / 1e9
    except OSError:
        shm = 0.0
    lines.append(f"/dev/shm {shm:.1f} GB free" + ("" if shm >= SHM_MIN_GB else
                                                  f" (under {SHM_MIN_GB} GB: (e) runs 2 workers at batch 128)"))
    if shm < SHM_MIN_GB:
        missing["shm"] = f"{shm:.1f} GB in /dev/shm"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    lines.append(f"C compiler {cc or 'none'}")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    lines.append(f"Python.h {'found' if header.exists() else 'missing'} ({header.parent})")
    libcuda = "n/a (no GPU)"
    if cuda:
        try:
            from triton.backends.nvidia.driver import libcuda_dirs  # Triton's own search

            libcuda = ", ".join(libcuda_dirs())
        except Exception as e:  # noqa: BLE001  (ImportError, or its assertion that none was found)
            libcuda = None
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            lines.append(f"libcuda.so not found by Triton ({why[:120]})")
    if libcuda:
        lines.append(f"libcuda.so in {libcuda}")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
        has_triton = True
    except ImportError:
        has_triton = False
        lines.append("triton missing")
    if cuda:
        why = [w for w, ok in (("C compiler", cc), ("Python.h", header.exists()), ("libcuda.so", libcuda),
                               ("triton", has_triton)) if not ok]
        if why:
            missing["triton"] = ", ".join(why)
    return lines, missing


def budget_lines() -> list[str]:
    """The per-check limits and what the whole leaves of the lent GPU's 13 minutes for a rerun."""
    worst = BUDGET_S + GRACE_S + 20  # + the start-up (versions, names) before the first check
    return [f"budget: {BUDGET_S} s for all checks (each cut to what is left): "
            + ", ".join(f"({c}) {LIMITS[c]} s" for c in CHECKS)
            + f"; at most {worst} s in all, which leaves {LEASE_S - worst} s of the {LEASE_S // 60} min after the "
              f"machine's start for one rerun (--only), at least the {RERUN_S} s planned"]


def verify_needs(needs=NEEDS) -> list[str]:
    """Every file, module, function, config key and bench flag the checks name; the missing ones."""
    missing = []
    for f in needs["files"]:
        if not (ROOT / f).exists():
            missing.append(f"file {f}")
    for m in needs["modules"]:
        try:
            importlib.import_module(m)
        except ImportError as e:
            missing.append(f"module {m} ({e})")
    for spec in needs["functions"]:
        mod, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(mod)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"function {spec}")
    from replica.config import NAMES

    missing += [f"config key {k}" for k in needs["config_keys"] if k not in NAMES]
    import bench

    try:
        bench.parser().parse_args(needs["bench_args"])
    except SystemExit:
        missing.append(f"bench.py arguments {' '.join(needs['bench_args'])}")
    return missing


# ----------------------------------------------------------------------------------------------
# Shared fixtures: a tiny synthetic set, prepared raw and as JPEG


def stores(work: Path, fmt: str = "raw", dry: bool = False) -> Path:
    from replica.data.writer import prepare
    from replica.data.synth import synth

    src = work / "synth"
    if not src.exists():
        per_class = 6 if dry else 24
        synth(src, classes=4, train_per_class=per_class, val_per_class=2, seed=1, workers=1, progress=False)
    out = work / f"store-{fmt}"
    if not (out / "meta.json").exists():
        prepare(src, out, workers=1, progress=False, fmt=fmt)
    return out


def train_cfg(store: Path, dev: str, dry: bool, **kw):
    from replica.config import load_config

    base = dict(data=str(store), batch_size=4 if dry else 16, epochs=1, steps_per_epoch=STEPS_C, workers=2,
                devices=dev, init="caffe", checkpoint_minutes=60, val_batches=1, save_best=False)
    if dry:  # plumbing only: no half-minute compile of the CPU's fused norms; the net at 1/16 width
        base.update(fused_norms=False, width=DRY_WIDTH)
    base.update(kw)
    return load_config(None, base)


# ----------------------------------------------------------------------------------------------
# The checks: each returns one result line; an exception or an assertion is a FAIL


def side_by_side(cmds: dict, limit: float, **kw) -> dict:
    """{name: (status, lines)} of each command run at once, each in its own process group."""
    import threading

    out = {}
    threads = [threading.Thread(target=lambda k=k, c=c: out.__setitem__(k, stream(c, limit, None, **kw)))
               for k, c in cmds.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def check_a(work: Path, dry: bool) -> str:
    store = stores(work, dry=dry)
    # bound: one GPU per process (NCCL's device_id); towers: both towers' devices in the process,
    # here the one GPU twice (NCCL unbound, a communicator per device as needed, device_ids=None)
    runs = {"bound": "cpu" if dry else "cuda:0", "two towers": "cpu,cpu" if dry else "cuda:0,cuda:0"}
    cmds = {}
    for name, dev in runs.items():
        out = work / f"smoke-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        cmds[name] = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "replica",
            "train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), f"data={store}", f"batch_size={4 if dry else 8}",
            "epochs=1", "steps_per_epoch=3", "workers=0", "init=caffe", f"devices={dev}", "save_best=false",
            # the bound run on a GPU: a save decided together every step (456 MB each, fsynced)
            f"checkpoint_minutes={0.0001 if name == 'bound' and not dry else 60}",
            "val_batches=1", *([f"width={DRY_WIDTH}", "fused_norms=false"] if dry else []), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), NCCL_DEBUG="WARN", OMP_NUM_THREADS="2")
    results = side_by_side(cmds, remaining("a") - 5, env=env)
    backend = "gloo" if dry else "nccl"
    from replica.runs import load_checkpoint

    for name, (rc, lines) in results.items():
        log = "\n".join(lines)
        assert rc == 0, f"{name} ({runs[name]}), exit {rc}:\n" + log[-1500:]
        assert f"job of 1 process(es): {backend}" in log, f"{name}: no process group was made:\n" + log[-800:]
        ck = load_checkpoint(work / f"smoke-{name.replace(' ', '-')}")
        assert ck.progress.step == 3, (name, ck.progress)
        leaked = [ln for ln in lines if "destroy_process_group" in ln or "NOT been destroyed" in ln]
        assert not leaked, (name, leaked)
    return (f"3 steps under torchrun, {backend}{' + gloo group' if not dry else ''}, DDP, each: bound to "
            f"{runs['bound']}, and two towers on {runs['two towers']}; process groups destroyed")


def check_b(work: Path, dry: bool) -> str:
    import torch

    from replica.model import AlexNet
    from replica.runtime import set_tf32

    set_tf32(False)
    pair, one = (("cpu", "cpu"), "cpu") if dry else (("cuda:0", "cpu"), "cuda:0")
    torch.manual_seed(10)
    width = DRY_WIDTH if dry else 1.0
    ref = AlexNet(10, devices=one, width=width)
    two = AlexNet(10, devices=pair, width=width)
    two.load_state_dict(ref.state_dict())
    x = (torch.randn(4, 3, 224, 224) * 50).to(pair[0])
    y = torch.tensor([1, 2, 3, 4]).to(pair[0])
    ref.eval(), two.eval()
    out = []
    for m in (ref, two):
        m.zero_grad()
        logits = m(x.to(m.devices[0]))
        torch.nn.functional.cross_entropy(logits, y.to(m.devices[0])).backward()
        out.append((logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in m.named_parameters()}))
    (la, ga), (lb, gb) = out
    dl = (la - lb).abs().max().item() / max(la.abs().max().item(), 1e-12)
    dg = max((ga[n] - gb[n]).abs().max().item() / max(ga[n].abs().max().item(), 1e-12) for n in ga)
    assert dl < 1e-3 and dg < 1e-2, (dl, dg)
    return f"{pair[0]} + {pair[1]} vs {one}: logits max rel. diff {dl:.1e}, gradients {dg:.1e} (float32, TF32 off)"


def check_c(work: Path, dry: bool) -> str:
    import warnings

    import torch

    import replica.train as T

    results = []
    for fmt, mode in (("raw", "error"), ("jpeg", "warn")):
        store = stores(work, fmt, dry)
        steps = []
        real_step, real_next = T.train_step, T.next_batch

        def debug(fn):
            def wrapped(*a, **k):
                on = not dry and len(steps) >= 1  # the first step: cuDNN's search, first allocations
                if on:
                    torch.cuda.set_sync_debug_mode(mode)
                try:
                    return fn(*a, **k)
                finally:
                    if on:
                        torch.cuda.set_sync_debug_mode(0)
            return wrapped

        def counted(*a, **k):
            t0 = time.perf_counter()
            try:
                return debug(real_step)(*a, **k)
            finally:  # the step's host time: what the CPU spends queueing it (no sync inside)
                steps.append((len(steps), t0, time.perf_counter() - t0))

        T.train_step, T.next_batch = counted, debug(real_next)
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                cfg = train_cfg(store, "cpu" if dry else "cuda:0", dry, bf16=not dry, workers=0 if dry else 2,
                                decode="device" if fmt == "jpeg" else "auto")  # the nvJPEG path (auto: workers)
                T.train(cfg, work / f"sync-{fmt}", progress=False)
        finally:
            T.train_step, T.next_batch = real_step, real_next
        # the flagged syncs (torch also warns once that the debug mode itself is a prototype: not a sync)
        syncs = [str(x.message).splitlines()[0][:120] for x in w
                 if "synchronizing" in str(x.message) and "prototype feature" not in str(x.message)]
        assert len(steps) == STEPS_C, steps
        host = statistics.median(h for _, _, h in steps[1:])
        loop = statistics.median(b[1] - a[1] for a, b in zip(steps[1:], steps[2:]))
        results.append(f"{fmt} store: {len(steps) - 1} steps under '{mode}'" +
                       (f", {len(syncs)} sync(s) flagged: {syncs[:2]}" if syncs else ", no sync") +
                       f"; host time per step {1e3 * host:.1f} ms, {1e3 * loop:.1f} ms a loop iteration "
                       f"(batch {cfg.batch_size}, with the batch's fetch and the processes' agree)")
    return "; ".join(results) + (" (dry run: debug mode off on the CPU)" if dry else " (c10-visible syncs, one GPU)")


def _race(decode, datas, device, iters: int) -> int:
    """Iterations in which a queued reduction read memory the decoder overwrote (vision PR 9606)."""
    import torch

    corrupted = 0
    shape = (3, 256, 256)
    for i in range(iters):
        ts = [torch.full(shape, 7, dtype=torch.uint8, device=device) for _ in datas]
        if device.type == "cuda":
            torch.cuda._sleep(50_000_000)  # ~25-50 ms of queued work ahead of the reductions
        sums = [t.sum(dtype=torch.int64) for t in ts]  # queued, not yet run
        del ts  # freed to the caching allocator while their reductions are still queued
        decode(datas)
        want = 7 * 3 * 256 * 256
        corrupted += any(int(s) != want for s in sums)
    return corrupted


def check_d(work: Path, dry: bool) -> str:
    import numpy as np
    import torch

    from replica.data.loaders import JpegBatch
    from replica.data.jpeg import decode_jpeg
    from replica.data.store import PreparedStore

    st = PreparedStore(stores(work, "jpeg", dry), "train")
    dev = torch.device("cpu" if dry else "cuda:0")
    n = min(len(st), 64)
    datas, _, _ = st.encoded(np.arange(n))
    zeros = torch.zeros(n, dtype=torch.int64)
    flips = torch.zeros(n, dtype=torch.bool)
    crop = st.size
    gpu, ok_g, bad_g = JpegBatch(datas, zeros, zeros, flips, crop, [str(i) for i in range(n)]).decode(dev)
    cpu, ok_c, bad_c = JpegBatch(datas, zeros, zeros, flips, crop, [str(i) for i in range(n)]).decode("cpu")
    assert not bad_g and not bad_c, (bad_g, bad_c)
    diff = (gpu.cpu().int() - cpu.int()).abs()
    mean, mx = diff.float().mean().item(), int(diff.max())
    assert mean < 2.0, f"nvJPEG and libjpeg-turbo differ by {mean:.2f} levels on average"
    iters = 3 if dry else 200
    batch = datas[:8]
    ours = _race(lambda d: JpegBatch(d, zeros[:8], zeros[:8], flips[:8], crop, ["x"] * 8).decode(dev), batch, dev,
                 iters)
    line = (f"{n} images: mean |nvJPEG − CPU| {mean:.3f}, max {mx} levels; race stress {iters} iterations: "
            f"{ours} corrupted through replica's decode")
    if not dry:  # torchvision's bare call beside it, for the record (not a failure of ours)
        bare = _race(lambda d: decode_jpeg(d, device=dev), batch, dev, iters)
        line += f", {bare} through a bare decode_jpeg(list, device='cuda')"
    assert ours == 0, line
    return line


def _kill_group(p) -> None:
    """Kill ``p`` and every process it started (its own process group: pytest's or torchrun's
    workers too, which would otherwise keep the GPU after their check ran out of time)."""
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def stream(cmd, limit: float, prefix: str | None = "", **kw) -> tuple[int, list[str]]:
    """Run ``cmd`` in a process group of its own, printing each line of its output as it comes
    (``prefix`` None: keep it quiet), the whole group killed past ``limit`` seconds (exit status
    124 then); (status, lines). The output is read without blocking: a partial line (pytest's
    dots) never holds the deadline up."""
    import selectors

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw)
    fd = p.stdout.fileno()
    os.set_blocking(fd, False)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    lines, buf, end = [], b"", time.monotonic() + limit

    def emit(raw: bytes) -> None:
        lines.append(raw.decode(errors="replace").rstrip("\r"))
        if prefix is not None:
            say(prefix + lines[-1])

    try:
        while True:
            left = end - time.monotonic()
            if left <= 0:
                _kill_group(p)
                if buf:
                    emit(buf)
                say(f"{prefix or ''}ran past its {limit:.0f} s limit: stopped, with every process it started")
                return 124, lines
            if not sel.select(timeout=min(left, 1.0)):
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            *done, buf = (buf + chunk).split(b"\n")
            for raw in done:
                emit(raw)
        if buf:
            emit(buf)
        rc = p.wait(timeout=max(1.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(p)
        return 124, lines
    finally:
        sel.close()
        p.stdout.close()
        if p.poll() is None:
            _kill_group(p)
    _kill_group(p)  # the leader has exited: anything it left behind in its group goes too
    return rc, lines


class Stopped(Exception):
    """SIGTERM reached the script (the device call's limit, a ``timeout``): raised where it
    waits, so that :func:`stream`'s ``finally`` kills the running check with all it started
    (each check has a process group of its own, which a signal to the script never reaches)."""


def stop_on_sigterm() -> None:
    import signal

    def stop(signum, frame):
        raise Stopped()

    signal.signal(signal.SIGTERM, stop)


def bench_args(missing: dict, cpus: int | None = None) -> list[str]:
    """bench.py's arguments for (e) on this machine: workers by its cores (and /dev/shm), the fused
    row left out where Triton cannot build."""
    args = list(NEEDS["bench_args"])
    workers = min(8, max(1, (cpus or os.cpu_count() or 2) - 2))
    if "shm" in missing:
        workers = 2
        args[args.index("--batch") + 1] = "128"
    args[args.index("--workers") + 1] = str(workers)
    if "triton" in missing:
        args.append("--no-fused")
    return args


def check_e(work: Path, dry: bool) -> str:
    import bench

    _, missing = prerequisites(cuda=not dry)
    args = bench_args(missing)
    if dry:
        bench.parser().parse_args(args)
        return "bench.py arguments parse: " + " ".join(args)
    rc, lines = stream([sys.executable, str(ROOT / "tools" / "bench.py"), *args], remaining("e") - 5, "  (e) ",
                       env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
    assert rc == 0, f"bench.py exit {rc}" + (" (its time limit)" if rc == 124 else "")
    skipped = f"; fused row skipped: no {missing['triton']}" if "triton" in missing else ""
    return f"bench.py {' '.join(args)}: the rows above{skipped}"


def check_f(work: Path, dry: bool) -> str:
    # the tests that run checks (a), (c), (d) again are left out: they ran above
    _, missing = prerequisites(cuda=not dry)
    select = "not gpu_check" + (" and not fused" if "triton" in missing else "")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-k", select, "-p", "no:cacheprovider",
           str(ROOT / "tests")]
    if dry:
        cmd.insert(3, "--collect-only")
    rc, lines = stream(cmd, remaining("f") - 5, "  (f) ", cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    tail = [ln for ln in lines if ln.strip()][-1:] or ["no output"]
    assert rc == 0, f"pytest exit {rc}: {tail[0]}"
    if dry:  # the CUDA parameters were collected (skipped here), and no CPU variant carries the mark
        assert any("[cuda" in ln for ln in lines), "no CUDA test collected"
        assert not any("[cpu" in ln for ln in lines), "a CPU variant is marked cuda"
    skipped = f" (fused-norm tests skipped: no {missing['triton']})" if "triton" in missing else ""
    return tail[0] + skipped


# ----------------------------------------------------------------------------------------------

# one deadline for the script and the processes it starts (wall clock: the same in all of them)
_DEADLINE = float(os.environ.get("GPU_CHECK_DEADLINE") or time.time() + BUDGET_S)
_T0 = time.monotonic()


def remaining(check: str) -> int:
    return max(5, int(min(LIMITS[check], _DEADLINE - time.time())))


def run_one(checks: str, work: Path, dry: bool) -> int:
    """In this process: the checks named (one letter each), in order; prints each result line as it
    ends; exit status 0 when all pass, else the failed ones as bits (1 << their index in ``checks``)."""
    failed = 0
    for i, check in enumerate(checks):
        fn = globals()[f"check_{check}"]
        t0 = time.monotonic()
        try:
            line = fn(work, dry)
        except Exception as e:  # noqa: BLE001  (every failure is a result line, not a crash of the script)
            text = str(e).strip() or type(e).__name__
            say(f"FAIL ({check}) {time.monotonic() - t0:5.1f} s: {type(e).__name__}: {text[-2500:]}")
            failed |= 1 << i
            continue
        say(f"PASS ({check}) {time.monotonic() - t0:5.1f} s: {line}")
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the plumbing on the CPU: names, tiny runs, no GPU")
    p.add_argument("--only", default=CHECKS, help="checks to run, e.g. a,d (default: all)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one check in this process (the script's own use)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        return run_one(a.one, Path(a.work), a.dry_run)
    import torch

    say("gpu_check" + (" --dry-run (CPU)" if a.dry_run else "") + ": " + " | ".join(versions()))
    if not a.dry_run and not torch.cuda.is_available():
        say(f"gpu_check: no CUDA device visible to {sys.executable}; --dry-run checks the plumbing on the CPU")
        return 1
    lines, lacking = prerequisites(cuda=not a.dry_run)
    say("gpu_check: " + " | ".join(lines))
    for what, why in lacking.items():
        say(f"gpu_check: {'(e) and (f) skip the fused norms' if what == 'triton' else '(e) runs small'}: no {why}")
    for line in budget_lines():
        say("gpu_check: " + line)
    missing = verify_needs()
    if missing:
        say("FAIL (names) missing: " + "; ".join(missing))
        return 1
    say(f"PASS (names) {sum(len(v) for v in NEEDS.values())} files, modules, functions, config keys, bench flags")
    failed = []
    wanted = [c for c in CHECKS if c in a.only.replace(",", "")]
    # on a GPU a process per check (a hang or a crash loses that check only); the dry run's
    # checks in one process (the plumbing is the same; each start-up of torch costs ~2 s)
    groups = ["".join(wanted)] if a.dry_run else wanted
    stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for group in groups:
            left = min(sum(LIMITS[c] for c in group), int(_DEADLINE - time.time()))
            if _DEADLINE - time.time() < 10:
                say(f"SKIP ({','.join(group)}): the {BUDGET_S} s budget is spent")
                failed += list(group)
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", group, "--work", str(work)]
            if a.dry_run:
                cmd.append("--dry-run")
            # the check process keeps this script's deadline (set here: importing this file sets nothing);
            # past its limit it is killed with everything it started
            try:
                rc, _ = stream(cmd, left + GRACE_S, "", env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1",
                                                               GPU_CHECK_DEADLINE=str(_DEADLINE)))
            except Stopped:
                say(f"gpu_check: stopped by SIGTERM during ({','.join(group)}), the check killed with all it started")
                return 143
            if rc == 124:
                say(f"FAIL ({','.join(group)}): ran past its {left} s limit")
                failed += list(group)
                continue
            if 0 < rc < 1 << len(group):
                failed += [c for i, c in enumerate(group) if rc >> i & 1]
            elif rc:  # killed, or crashed: its checks count as failed
                say(f"FAIL ({','.join(group)}): the check process ended with status {rc}")
                failed += list(group)
    total = time.monotonic() - _T0
    say(f"gpu_check: {len(wanted) - len(failed)} of {len(wanted)} checks passed in {total:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    import gc

    code = main()
    gc.freeze()  # as replica.cli.entry: the interpreter's last collection cost ~0.8 s a process
    sys.exit(code)
