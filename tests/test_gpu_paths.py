"""The GPU paths' logic, tested on the CPU by recording the calls it makes.

None of this ran on a GPU here: what NCCL is given, which GPUs a process takes, which streams a
JPEG decode synchronizes and waits on, which copies are non-blocking, which errors count as a
corrupt image, what the benchmark waits for, and what gpu_check's dry run checks. The real
runs of the same code are tools/gpu_check.sh and tests/test_cuda.py.
"""
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import replica.dist as D
import replica.train as T
from replica.config import load_config
from replica.errors import ReplicaError
from runs_helpers import NARROW

ROOT = Path(__file__).resolve().parents[1]


# -- which GPUs, and what init_process_group is given ----------------------------------------------

class FakeDist:
    """torch.distributed as setup_ranks uses it, recording each call."""

    def __init__(self):
        self.calls = []
        self.backend = None

    def is_initialized(self):
        return self.backend is not None

    def init_process_group(self, backend, **kw):
        self.calls.append(("init_process_group", backend, kw))
        self.backend = backend

    def new_group(self, backend):
        self.calls.append(("new_group", backend))
        return "gloo-group"

    def get_backend(self):
        return self.backend


@pytest.fixture
def four_gpus(monkeypatch):
    """A node with 4 GPUs as torch sees it, and a recording torch.distributed."""
    fake = FakeDist()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: fake.calls.append(("set_device", str(d))))
    for name in ("is_initialized", "init_process_group", "new_group", "get_backend"):
        monkeypatch.setattr(torch.distributed, name, getattr(fake, name))
    monkeypatch.setattr(D, "check_distinct_gpus", lambda ranks, devices: fake.calls.append(("distinct", devices)))
    return fake


def setup(**config):
    """setup_ranks as the training loop calls it, for a config of these keys."""
    cfg = load_config(None, config)
    return D.setup_ranks(cfg.devices, 1 if cfg.variant == "one-gpu-half" else 2, cfg.devices_per_process,
                         cfg.batch_size)


def job(monkeypatch, rank, world, local_world=None):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world or world))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")


def test_two_gpus_per_process_give_nccl_no_device_id(four_gpus, monkeypatch):
    """The README's 4-GPU command (2 processes × 2 GPUs): process 1 owns cuda:2 and cuda:3. A
    device_id would bind NCCL to cuda:2 and DDP's first broadcast of tower b (cuda:3) would fail."""
    job(monkeypatch, 1, 2)
    ranks, devices = setup(devices_per_process=2)
    assert [str(d) for d in devices] == ["cuda:2", "cuda:3"]
    assert four_gpus.calls[:3] == [("set_device", "cuda:2"), ("init_process_group", "nccl", {}),
                                   ("new_group", "gloo")]
    assert ranks.distributed and ranks.owns_group and ranks.rank == 1


def test_one_gpu_per_process_binds_nccl_to_it(four_gpus, monkeypatch):
    job(monkeypatch, 1, 2)
    _, devices = setup(devices_per_process=1)
    assert [str(d) for d in devices] == ["cuda:1"]
    assert four_gpus.calls[:2] == [("set_device", "cuda:1"),
                                   ("init_process_group", "nccl", dict(device_id=torch.device("cuda:1")))]


def test_one_process_under_torchrun_joins_a_job_of_one(four_gpus, monkeypatch):
    """torchrun --nproc-per-node 1: NCCL, the gloo group and DDP run, as they will with more."""
    job(monkeypatch, 0, 1)
    ranks, devices = setup(devices="cuda:0")
    assert ranks.distributed and ranks.world == 1
    assert ("init_process_group", "nccl", dict(device_id=torch.device("cuda:0"))) in four_gpus.calls


def test_no_launcher_no_process_group(four_gpus, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    ranks, _ = setup(devices="cpu")
    assert not ranks.distributed and four_gpus.calls == []


def test_process_group_args():
    assert D.process_group_args(["cpu"]) == ("gloo", {})
    assert D.process_group_args(["cuda:0"]) == ("nccl", dict(device_id=torch.device("cuda:0")))
    assert D.process_group_args(["cuda:2", "cuda:3"]) == ("nccl", {})


@pytest.mark.parametrize("visible,local_rank,want", [
    (4, 1, ("cuda:2", "cuda:3")),  # torchrun: every process sees the node
    (2, 1, ("cuda:0", "cuda:1")),  # SLURM --gpus-per-task=2 / per-rank CUDA_VISIBLE_DEVICES: its own share
    (2, 0, ("cuda:0", "cuda:1")),
])
def test_each_process_takes_its_share_of_the_gpus(monkeypatch, visible, local_rank, want):
    job(monkeypatch, local_rank, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(None, dict(devices_per_process=2))
    assert D.process_devices(cfg.devices, cfg.devices_per_process, local_rank, 2, visible=visible,
                             local_world=2) == want


def test_too_few_gpus_is_one_line(monkeypatch):
    job(monkeypatch, 1, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ReplicaError, match="needs 2 GPU.*but 3 are visible"):
        D.process_devices("auto", 2, 1, 2, visible=3, local_world=2)


def test_two_processes_on_one_gpu_are_refused():
    class TwoRanks(D.Ranks):
        def gather(self, obj):
            return [obj, obj]  # both processes report the same GPU

    ranks = TwoRanks(0, 2, distributed=True)
    with pytest.raises(ReplicaError, match="processes 0 .* and 1 .* both use GPU GPU-1234"):
        D.check_distinct_gpus(ranks, [torch.device("cuda:0")], uuid=lambda d: "GPU-1234")


def test_the_first_gpu_becomes_the_current_device_with_or_without_a_launcher(store, tmp_path, monkeypatch):
    """A process on cuda:1 alone makes cuda:1 current (else the pin-memory thread and a context
    go to GPU 0); a CPU process sets nothing. Recorded: set_device's calls, and that a run calls it."""
    class Cuda:
        def __init__(self):
            self.calls = []

        def set_device(self, d):
            self.calls.append(str(d))

    cuda = Cuda()
    D.bind_current_device((torch.device("cuda:1"), torch.device("cpu")), cuda=cuda)
    D.bind_current_device(("cpu",), cuda=cuda)
    D.bind_current_device(("cuda:0", "cuda:1"), cuda=cuda)
    assert cuda.calls == ["cuda:1", "cuda:0"]
    seen = []
    monkeypatch.setattr(D, "bind_current_device", lambda devices: seen.append(tuple(map(str, devices))))
    from runs_helpers import tiny

    T.train(tiny(store, epochs=1, steps_per_epoch=1, val_batches=1, save_best=False), tmp_path / "run",
            progress=False)
    assert seen == [("cpu",)]  # one process, no launcher: still asked


def test_one_process_may_put_both_towers_on_one_gpu():
    """devices=cuda:0,cuda:0 under torchrun (gpu_check's two-tower smoke run): one process holds
    the GPU twice, which is no clash; a second process on it still is."""
    gathered = []

    class Ranks(D.Ranks):
        def gather(self, obj):
            gathered.append(obj)
            return [obj] * self.world

    both = [torch.device("cuda:0"), torch.device("cuda:0")]
    D.check_distinct_gpus(Ranks(0, 1, distributed=True), both, uuid=lambda d: "GPU-1234")
    assert [len(g) for g in gathered] == [1]  # the GPU once
    with pytest.raises(ReplicaError, match="processes 0 .* and 1 .* both use GPU GPU-1234"):
        D.check_distinct_gpus(Ranks(0, 2, distributed=True), both, uuid=lambda d: "GPU-1234")


def test_ranks_close_destroys_the_groups_it_made(monkeypatch):
    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda g=None: destroyed.append(g))
    D.Ranks(0, 2, group="gloo-group", distributed=True, owns_group=False).close()
    assert destroyed == []  # a group made by someone else (a caller's own init) is theirs to destroy
    r = D.Ranks(0, 2, group="gloo-group", distributed=True, owns_group=True)
    r.close()
    r.close()
    assert destroyed == ["gloo-group", None]  # once, the gloo group then the default group


def test_train_leaves_the_job_at_the_end_and_on_an_agreed_stop(monkeypatch, store, tmp_path):
    """train() closes its Ranks after the loop, and after a stop all processes decided together,
    but not after an error of this process alone (destroying could wait for the others)."""
    closed = []
    monkeypatch.setattr(D.Ranks, "close", lambda self: closed.append(True))
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(store), batch_size=4, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", val_batches=1, width=NARROW))
    T.train(cfg, tmp_path / "run", progress=False)
    assert closed == [True]

    def fail(*a, agreed):
        raise ReplicaError("stop", agreed=agreed)

    for agreed, want in ((True, [True, True]), (False, [True, True])):
        monkeypatch.setattr(T, "train_epochs", lambda *a, agreed=agreed: fail(*a, agreed=agreed))
        with pytest.raises(ReplicaError):
            T.train(cfg, tmp_path / f"run-{agreed}", progress=False)
        assert closed == want  # the agreed stop closed once more; the lone error did not


# -- copies without a host wait ------------------------------------------------------------------

class Recorder:
    """A CPU tensor's stand-in that records how it is pinned and copied."""

    def __init__(self, t, pinned=False, device="cpu"):
        self.t, self.pinned, self.device, self.calls = t, pinned, torch.device(device), []

    def is_pinned(self):
        return self.pinned

    def pin_memory(self):
        self.calls.append("pin_memory")
        self.pinned = True
        return self

    def to(self, *a, **k):
        self.calls.append(("to", tuple(str(x) for x in a), k))
        return self.t.to(*[x for x in a if not isinstance(x, torch.device) or x.type == "cpu"])


def test_to_device_pins_then_copies_non_blocking():
    r = Recorder(torch.ones(2))
    T.to_device(r, torch.device("cuda:0"))
    assert r.calls == ["pin_memory", ("to", ("cuda:0",), dict(non_blocking=True))]
    r = Recorder(torch.ones(2), pinned=True)
    T.to_device(r, torch.device("cuda:0"))
    assert r.calls == [("to", ("cuda:0",), dict(non_blocking=True))]
    t = torch.ones(2)
    assert T.to_device(t, torch.device("cpu")) is t and T.to_device(None, torch.device("cpu")) is None


def test_colour_shift_is_copied_non_blocking():
    """augment.normalize moves the per-image shift with non_blocking (a blocking .to() from the
    host made the CPU wait for the GPU once a step)."""
    from replica import augment

    shift = Recorder(torch.ones(2, 3))
    out = augment.normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4), shift, 1.1)
    assert shift.calls == [("to", ("cpu", "torch.float32"), dict(non_blocking=True))]
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), 1 / 1.1))


def test_training_step_moves_every_input_through_to_device(monkeypatch, store, tmp_path):
    moved = []
    real = T.to_device
    monkeypatch.setattr(T, "to_device", lambda t, d: moved.append(None if t is None else tuple(t.shape)) or real(t, d))
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(store), batch_size=4, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", val_batches=1, width=NARROW))
    T.train(cfg, tmp_path / "run", progress=False)
    assert moved == [(4, 3, 224, 224), (4, 3), (4,)]  # crops, colour shifts, labels


# -- nvJPEG on a stream of its own ---------------------------------------------------------------

class FakeCuda:
    """torch.cuda's stream calls, recorded in order; the 'current' stream is tracked."""

    def __init__(self):
        self.log = []
        self.main = self.Stream(self, "main")
        self.now = self.main

    class Stream:
        def __init__(self, cuda, name="side"):
            if not isinstance(cuda, FakeCuda):  # cuda.Stream(device), as on_decode_stream calls it
                raise AssertionError("a stream is made from the fake, not from a device")
            self.cuda, self.name = cuda, name

        def synchronize(self):
            self.cuda.log.append(("synchronize", self.name))

        def wait_stream(self, other):
            self.cuda.log.append(("wait_stream", self.name, other.name))

    def current_stream(self, device):
        return self.now

    @contextlib.contextmanager
    def stream(self, s):
        before, self.now = self.now, s
        self.log.append(("enter", s.name))
        yield
        self.now = before
        self.log.append(("leave", s.name))


class CudaTensor:
    is_cuda = True

    def __init__(self, log):
        self.log = log

    def record_stream(self, s):
        self.log.append(("record_stream", s.name))


def test_jpeg_decode_runs_on_its_own_stream():
    """The decode's allocations come from a side stream whose own work was waited for first; the
    current stream waits on the GPU (not the host), and the outputs are marked used by it."""
    from replica.data import jpeg

    cuda = FakeCuda()
    side = {}

    def work():
        cuda.log.append(("decode on", cuda.now.name))
        side["stream"] = cuda.now
        return CudaTensor(cuda.log), "not a tensor"

    cuda.Stream = lambda device, _c=cuda: FakeCuda.Stream(_c, "side")
    jpeg._STREAMS.clear()
    jpeg.on_decode_stream(torch.device("cuda:0"), work, cuda=cuda)
    assert cuda.log == [("synchronize", "side"), ("enter", "side"), ("decode on", "side"), ("leave", "side"),
                        ("wait_stream", "main", "side"), ("record_stream", "main")]
    assert ("synchronize", "main") not in cuda.log  # the training stream is never waited for by the host
    jpeg.on_decode_stream(torch.device("cuda:0"), work, cuda=cuda)
    assert len([k for k in jpeg._STREAMS if k[0] == id(cuda)]) == 1  # one side stream per device, reused


def test_jpeg_batch_decodes_cuda_batches_through_the_side_stream(monkeypatch):
    from replica.data import jpeg, loaders as data

    seen = []
    monkeypatch.setattr(jpeg, "on_decode_stream", lambda dev, work, cuda=None: seen.append(str(dev)) or "decoded")
    b = data.JpegBatch([], torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), 8, [])
    assert b.decode("cuda:0") == "decoded" and seen == ["cuda:0"]


# -- which errors mean a corrupt image -----------------------------------------------------------

def test_decode_failures_are_told_from_device_failures():
    from replica.data.jpeg import is_decode_failure

    for text in ("Unsupported marker type 0x4b", "Not a JPEG file: starts with 0x00 0x01",
                 "Error while decoding JPEG images: Failed to get image info: 2",
                 "Premature end of JPEG file",
                 # nvJPEG's statuses for the input's faults: bad JPEG, not supported, incomplete, bad parameter
                 "Failed to decode batch: 3", "Failed to decode batch: 4", "Failed to decode batch: 10",
                 "Error while decoding JPEG images: Failed to decode batch: 2"):
        assert is_decode_failure(RuntimeError(text)), text
    # nvJPEG's own failures, as torchvision words them: allocator, execution, internal error
    for status in (5, 6, 8):
        for text in (f"Failed to decode batch: {status}", f"Error while decoding JPEG images: Failed to decode "
                                                          f"batch: {status}"):
            assert not is_decode_failure(RuntimeError(text)), text
    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB"),
                RuntimeError("Error while decoding JPEG images: CUDA error: an illegal memory access was encountered"),
                RuntimeError("Error while decoding JPEG images: Failed to synchronize CUDA stream: 700"),
                ValueError("not a runtime error")):
        assert not is_decode_failure(err), err


def test_a_device_failure_during_decode_is_one_line_not_corrupt_images(monkeypatch):
    from replica.data import jpeg, loaders as data
    from replica.data.jpeg import encode_jpeg

    good = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
    z = torch.zeros(2, dtype=torch.int64)
    b = data.JpegBatch([good, good], z, z, torch.zeros(2, dtype=torch.bool), 8, ["a", "b"])
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")))
    with pytest.raises(ReplicaError, match="failed in the device, not in the data: CUDA out of memory.*lower batch_size"):
        b.decode("cpu")
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("Error while decoding JPEG images: Failed to decode batch: 5")))
    with pytest.raises(ReplicaError, match="failed in the device, not in the data: .*batch: 5; decode=workers"):
        b.decode("cpu")
    calls = []

    def corrupt_one(d, **k):  # a corrupt entry: the batched call fails, one by one finds it
        calls.append(1)
        if isinstance(d, list) or len(calls) == 3:
            raise RuntimeError("Unsupported marker type 0x00")
        return torch.zeros(3, 8, 8, dtype=torch.uint8)

    monkeypatch.setattr(jpeg, "decode_jpeg", corrupt_one)
    crops, keep, bad = b.decode("cpu")
    assert keep.tolist() == [True, False] and [n for n, _, _ in bad] == ["b"] and crops.shape[0] == 1


# -- the benchmark waits for every GPU -------------------------------------------------------------

def test_bench_sync_waits_for_every_gpu(monkeypatch):
    import bench

    waited = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: waited.append(i))
    bench.sync(torch.device("cuda:0"))
    assert waited == [0, 1]


# -- CUDA numerics, said explicitly ----------------------------------------------------------------

def test_train_sets_cuda_numerics_explicitly(monkeypatch, store, tmp_path):
    from replica import runtime

    seen = []
    real = runtime.set_cuda_numerics
    monkeypatch.setattr(T, "set_cuda_numerics", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(store), batch_size=4, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", val_batches=1, tf32=True, width=NARROW))
    T.train(cfg, tmp_path / "run", progress=False)
    assert seen == [((True, False), dict(benchmark=True))]
    assert runtime.tf32_enabled() and torch.backends.cudnn.benchmark
    runtime.set_cuda_numerics(False)
    assert not runtime.tf32_enabled() and not torch.backends.cudnn.benchmark


def test_deterministic_sets_cudnn_and_torch(monkeypatch):
    from replica import runtime

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        n = runtime.set_cuda_numerics(False, deterministic=True, benchmark=True)
        assert n == dict(tf32=False, cudnn_benchmark=False, deterministic=True)
        assert torch.backends.cudnn.deterministic and torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        runtime.set_cuda_numerics(False)
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_eval_json_records_the_numerics(store, tmp_path):
    import json

    from replica.inference import describe_eval, run_eval

    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(store), batch_size=4, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", val_batches=1, width=NARROW))
    T.train(cfg, tmp_path / "run", progress=False)
    r = run_eval(tmp_path / "run", views=(1,), devices="cpu", progress=False, workers=0)
    saved = json.loads((tmp_path / "run" / "eval-last-val-1view.json").read_text())
    assert saved["device"] == "cpu" and saved["tf32"] is None  # TF32 means nothing on the CPU
    assert describe_eval(dict(r, tf32=False, device="cuda:0")).endswith("fp32 (TF32 off) on cuda:0")


# -- gpu_check.sh ----------------------------------------------------------------------------------

def test_gpu_check_names_what_it_needs_and_fails_on_a_missing_one():
    import gpu_check

    assert "GPU_CHECK_DEADLINE" not in os.environ  # importing it starts no clock for later processes
    assert gpu_check.verify_needs() == []
    broken = {k: list(v) for k, v in gpu_check.NEEDS.items()}
    broken["files"].append("tools/no-such-file.py")
    broken["functions"].append("replica.train:no_such_step")
    broken["config_keys"].append("no_such_key")
    broken["bench_args"] = ["all", "--no-such-flag"]
    missing = gpu_check.verify_needs(broken)
    assert missing == ["file tools/no-such-file.py", "function replica.train:no_such_step",
                       "config key no_such_key", "bench.py arguments all --no-such-flag"]


def test_gpu_check_runs_checks_in_one_process_and_reports_each(monkeypatch, tmp_path, capsys):
    """What the dry run's one check process returns: each result line as it ends, and the failed
    checks as bits of its exit status (the script reads them back into 'failed: ...')."""
    import gpu_check

    def broken(work, dry):
        raise AssertionError("the split differs")

    monkeypatch.setattr(gpu_check, "check_b", broken)
    assert gpu_check.run_one("eb", tmp_path, True) == 0b10
    assert gpu_check.run_one("be", tmp_path, True) == 0b01
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split(")")[0] for ln in lines] == ["PASS (e", "FAIL (b", "FAIL (b", "PASS (e"]
    assert "AssertionError: the split differs" in lines[1]


def test_gpu_check_dry_run_passes_on_the_cpu():
    """The whole script's plumbing on the CPU: every check (a)-(f) at tiny sizes, printed as it ends."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                       timeout=400, env=env)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-2000:]
    for c in "abcdef":
        assert f"PASS ({c})" in out, out
    assert "torch " in out.splitlines()[0] and "NCCL" in out.splitlines()[0]
    # what decides whether the rest can run, and the per-check budget, before any check
    first_check = out.index("PASS (a)")
    for what in ("/dev/shm", "GB free", "C compiler", "Python.h", "libcuda.so", "budget: ", "(e) 190 s"):
        assert 0 <= out.find(what) < first_check, what
    assert "6 of 6 checks passed" in out


def test_gpu_check_budget_leaves_a_rerun_and_missing_tools_shrink_the_checks():
    import bench
    import gpu_check

    worst = gpu_check.BUDGET_S + gpu_check.GRACE_S + 20
    assert gpu_check.LEASE_S - worst >= gpu_check.RERUN_S  # one rerun of the failed checks still fits
    assert "leaves " in gpu_check.budget_lines()[0]
    full = gpu_check.bench_args({}, cpus=16)
    assert full[full.index("--workers") + 1] == "8" and "--no-fused" not in full
    small = gpu_check.bench_args({"shm": "0.1 GB in /dev/shm", "triton": "C compiler"}, cpus=16)
    assert small[small.index("--workers") + 1] == "2" and small[small.index("--batch") + 1] == "128"
    assert "--no-fused" in small
    bench.parser().parse_args(small)  # bench takes what gpu_check gives it


def test_gpu_check_kills_a_check_with_everything_it_started(tmp_path):
    """A check past its limit: the whole process group goes (a pytest's or torchrun's workers
    would keep the GPU), and a partial line (pytest's dots, no newline) never holds the deadline
    up. Real processes, a real SIGKILL."""
    import time

    import gpu_check

    pid_file = tmp_path / "grandchild"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); "
              f"sys.stdout.write('...'); sys.stdout.flush(); time.sleep(120)")
    t0 = time.monotonic()
    rc, lines = gpu_check.stream([sys.executable, "-c", script], 3, None)
    took = time.monotonic() - t0
    assert rc == 124 and took < 10, (rc, took)
    assert lines == ["..."]  # the partial line is kept
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed: gone, or a zombie until whoever inherits it reaps it
        try:
            if Path(f"/proc/{grandchild}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {grandchild}, started by the check, outlived its limit")
    rc, lines = gpu_check.stream([sys.executable, "-c", "print('a'); print('b', end='')"], 20, None)
    assert rc == 0 and lines == ["a", "b"]


def test_one_process_under_torchrun_keeps_auto_devices(monkeypatch):
    """torchrun --nproc-per-node 1 with devices=auto on a one-GPU machine: the one GPU, as
    without torchrun (not 'needs 2 GPUs')."""
    job(monkeypatch, 0, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.process_devices("auto", 2, 0, 1, visible=1, local_world=1) == "auto"


# -- launchers: SLURM's variables, a GPU + CPU split under torchrun ------------------------------

def test_slurm_tasks_become_ranks_and_torchrun_wins():
    base = dict(SLURM_PROCID="3", SLURM_STEP_NUM_TASKS="8", SLURM_LOCALID="1", SLURM_NODEID="1",
                SLURM_STEP_TASKS_PER_NODE="2(x3),2", MASTER_ADDR="node0", MASTER_PORT="29500")
    assert D.from_slurm(base) == dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert D.tasks_per_node("4(x2),3") == [4, 4, 3]
    assert D.from_slurm(dict(base, RANK="0")) == {}  # srun torchrun …: torchrun's numbers
    assert D.from_slurm({k: v for k, v in base.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}  # the batch script
    assert D.from_slurm(dict(base, SLURM_STEP_NUM_TASKS="1")) == {}  # srun -n 1
    with pytest.raises(ReplicaError, match="srun started 8 tasks.*MASTER_PORT is not set.*torchrun per node"):
        D.from_slurm(dict(base, MASTER_PORT=""))


def test_local_world_unknown_never_refuses_a_valid_node(monkeypatch):
    """A launcher that sets no LOCAL_WORLD_SIZE (the global world is not the node's): process 3
    of 16 with 8 visible GPUs and 2 per process takes cuda:6 and cuda:7, not 'needs 32'."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_config(None, dict(devices_per_process=2))
    assert D.process_devices(cfg.devices, cfg.devices_per_process, 3, 16, visible=8) == ("cuda:6", "cuda:7")
    with pytest.raises(ReplicaError, match="needs 2 GPU"):
        D.process_devices(cfg.devices, cfg.devices_per_process, 4, 16, visible=8)  # a fifth process on an 8-GPU node


def test_a_gpu_and_cpu_split_under_torchrun_is_refused_before_any_group(four_gpus, monkeypatch):
    """devices=cuda:0,cpu under torchrun: DDP takes one device type and NCCL no CPU tensor (it
    failed at DDP's first broadcast). One line, and no process group made."""
    job(monkeypatch, 0, 1)
    with pytest.raises(ReplicaError, match="split over a GPU and the CPU runs in one process only"):
        setup(devices="cuda:0,cpu")
    assert not [c for c in four_gpus.calls if c[0] == "init_process_group"]


# -- gpu_perf.py ---------------------------------------------------------------------------------

def test_gpu_perf_dry_run_runs_every_check_on_the_cpu():
    """tools/gpu_perf.py --dry-run: every check's code on the CPU (1/16 width, tiny batches, the
    graph stood in for), each a PASS line, then the summary."""
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_perf.py"), "--dry-run"], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    for check in "pmcev":
        assert re.search(rf"^PASS \({check}\)", out, re.M), (check, out[-3000:])
    assert "graph ≡ eager over 6 steps" in out and "5 of 5 checks passed" in out
    f64 = re.search(r"grouped ≡ towers in float64 \(logits within (\S+), gradients (\S+) relative\)", out)
    assert f64 and max(map(float, f64.groups())) <= 1e-9, out[-3000:]  # the wiring, to float64's rounding
    assert "1 workers: raw" in out and "2 workers: raw" in out  # end to end at two worker counts
    assert re.search(r"2 workers: raw [\d,]+, JPEG [\d,]+, JPEG with crop_on=device [\d,]+ img/s", out)
    assert re.search(r"1 workers: .*, JPEG decoded on the device [\d,]+ img/s; 2 workers", out)  # nvJPEG's row, once
    assert re.search(r"gpu_perf: SUGGEST decode=(device|workers)", out)
    assert re.search(r"gpu_perf: SUGGEST grouped=(auto|false)", out) and "gpu_perf: SUGGEST workers=" in out
    assert re.search(r"gpu_perf: SUGGEST crop_on=(device|workers)", out)
    assert re.search(r"[\d,]+ views/s eager, [\d,]+ with --graph \(the same top-1\)", out)
    assert re.search(r"gpu_perf: SUGGEST replica eval --graph (by default|stays off)", out)


def test_gpu_perf_summary_rules():
    import gpu_perf

    lines = gpu_perf.summarize({"m.b256.grouped_graph": 41_000, "m.b256.ratio_best": 1.2, "m.b256.grouped": 30_000,
                                "m.b256.towers": 20_000, "p.graph_same": 1, "m.b128.grouped_graph": 20_000,
                                "e.w8.jpeg": 19_000, "e.w12.jpeg": 20_000, "e.w14.jpeg": 21_000,
                                "c.conv1_3_channels": 1.0, "c.conv1_4_channels": 0.5})
    text = "\n".join(lines)
    assert "PASS training step, batch 256, bf16 (img/s): 41,000.00" in text
    assert "MISS training step, batch 128" in text and "MISS ten-view evaluation (views/s): not measured" in text
    assert "SUGGEST grouped=auto" in text and "SUGGEST graph=auto=on for one GPU" in text
    assert "SUGGEST conv1_channels=4" in text and "SUGGEST workers=12" in text  # 20,000 ≥ 0.95 × 21,000 = 19,950
    assert "SUGGEST grouped=false" in "\n".join(gpu_perf.summarize({"m.b128.grouped": 100, "m.b128.towers": 99}))
    crops = "\n".join(gpu_perf.summarize({"e.w8.jpeg": 10_000, "e.w12.jpeg": 12_000, "e.w8.jpeg_crop_on_device": 19_000,
                                          "e.w12.jpeg_crop_on_device": 19_500}))
    assert "SUGGEST crop_on=device" in crops and "SUGGEST workers=8" in crops  # 19,000 ≥ 0.95 × 19,500
    assert "SUGGEST crop_on=workers" in "\n".join(gpu_perf.summarize({"e.w8.jpeg": 100, "e.w8.jpeg_crop_on_device": 104}))
    nv = "\n".join(gpu_perf.summarize({"e.w8.jpeg": 10_000, "e.w8.jpeg_crop_on_device": 12_000, "e.w8.jpeg_nvjpeg": 12_700}))
    assert "SUGGEST decode=device" in nv  # 12,700 > 1.05 × 12,000, the best of the workers' two ways
    assert "SUGGEST decode=workers" in "\n".join(gpu_perf.summarize({"e.w8.jpeg": 10_000, "e.w8.jpeg_nvjpeg": 10_400}))


# -- gpu_session.sh: one lease's work in one device call ------------------------------------------

def _session(out, *args, **env):
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh"), str(out), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable, **env))


def test_gpu_session_dry_run_leaves_the_perf_log_and_the_demo_in_out(tmp_path):
    """The dry run: gpu_perf (check p alone here), then the tiny demo; into OUT what the device
    tool brings back (≤ 8 files, names of letters, digits, '.', '-'), named by date and device."""
    out = tmp_path / "out"
    r = _session(out, "--dry-run", "--only", "p")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 6 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all(re.match(r"\d{4}-\d\d-\d\d-cpu-(perf|demo)", n) for n in names), names
    perf = next(out.glob("*-perf.log")).read_text()
    assert "PASS (p)" in perf and "1 of 1 checks passed" in perf
    demo = next(out.glob("*-demo.log")).read_text()
    assert "10-view" in demo and "replica demo exited 0" in demo
    import json
    ev = json.loads(next(out.glob("*-demo-eval.json")).read_text())
    assert ev["10-view"]["images"] == 12 and ev["device"] == "cpu"  # the tiny demo's 12 validation images
    assert next(out.glob("*-demo-filters.png")).stat().st_size > 1000


def test_gpu_session_cut_short_keeps_what_ran_and_fails(tmp_path):
    """A step past its limit is killed, the next still runs, the logs stay in OUT, and the exit
    status says so (124); no OUT is a usage line, not a run."""
    out = tmp_path / "out"
    r = _session(out, "--dry-run", "--only", "p", PERF_LIMIT_S="0.3", DEMO_LIMIT_S="0.3")
    assert r.returncode == 124, r.stdout[-2000:] + r.stderr[-2000:]
    assert "replica demo exited 124" in next(out.glob("*-demo.log")).read_text()
    assert next(out.glob("*-perf.log")).exists() and "gpu_perf exited 124" in r.stderr
    u = subprocess.run(["bash", str(ROOT / "tools" / "gpu_session.sh")], capture_output=True, text=True, timeout=30)
    assert u.returncode == 2 and u.stderr.startswith("usage: tools/gpu_session.sh OUT")


# -- the graphed step's CUDA calls ----------------------------------------------------------------

def test_cuda_graphs_warm_on_a_side_stream_and_capture_into_one_pool(monkeypatch):
    """replica.steps.CudaGraphs' calls, recorded on the CPU: a warm-up step runs on a side stream
    that first waits for the current one, which then waits for it; each capture goes through
    torch.cuda.graph, the second into the first's memory pool; a replay replays."""
    from replica.steps import CudaGraphs

    calls = []

    class Stream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            calls.append(("wait", self.name, other.name))

    class Graph:
        def __init__(self):
            self.id = len([c for c in calls if c[0] == "graph"])
            calls.append(("graph", self.id))

        def pool(self):
            return f"pool{self.id}"

        def replay(self):
            calls.append(("replay", self.id))

    @contextlib.contextmanager
    def on(stream):
        calls.append(("on", stream.name))
        yield

    @contextlib.contextmanager
    def capture(g, pool=None):
        calls.append(("capture", g.id, pool))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream("current"))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    g = CudaGraphs()
    assert g.warm(lambda: calls.append(("step",)) or "loss") == "loss"
    assert calls == [("wait", "side", "current"), ("on", "side"), ("step",), ("wait", "current", "side")]
    calls.clear()
    g1, out1 = g.capture(lambda: calls.append(("body",)) or "out1")
    g2, _ = g.capture(lambda: calls.append(("body",)) or "out2")
    g.replay(g1)
    assert out1 == "out1" and calls == [("graph", 0), ("capture", 0, None), ("body",), ("graph", 1),
                                        ("capture", 1, "pool0"), ("body",), ("replay", 0)]


# -- no host reads in a step: the CPU's stand-in for gpu_check (c) ---------------------------------

@pytest.fixture(scope="module")
def meta_sgd():
    """The fused SGD update as a no-op on the meta device (it has no meta kernel): the step's
    shape of calls, as on a GPU, without its arithmetic."""
    lib = torch.library.Library("aten", "IMPL")
    for op in ("_fused_sgd_", "_fused_sgd_.tensor_lr"):
        try:
            lib.impl(op, lambda *a, **k: None, "Meta")
        except RuntimeError:  # a torch that has its own
            pass
    yield lib


@pytest.mark.parametrize("grouped,conv1_channels,graph", [(False, 3, False), (True, 3, False), (True, 4, False),
                                                          (True, 3, True)])
def test_a_training_step_reads_nothing_from_the_host(monkeypatch, meta_sgd, grouped, conv1_channels, graph):
    """On the meta device (a device that is not the CPU): the batch's finish (− mean, + colour
    shift, ÷1.1) and a float32 training step, eager (the towers, the grouped form, conv1 reading
    4 channels) or graphed (ε in the optimizer's tensors, its warm-up steps, the capture and the
    replays, an ε drop among them), pass no host tensor to any torch function and make no tensor
    from host data. On a GPU each would be a copy, a blocking one a wait for the device every
    step; gpu_check (c) checks the same with CUDA's sync-debug mode where a GPU is lent."""
    import replica.devices as devices
    from replica import augment
    from replica.config import NetOptions
    from replica.model import AlexNet
    from replica.optim import PaperSGD, param_groups
    from replica.steps import EagerGraphs, StepRunner
    from runs_helpers import HostReads

    real = devices.check_device
    monkeypatch.setattr(devices, "check_device", lambda d: torch.device("meta") if str(d) == "meta" else real(d))

    class MetaGraphs(EagerGraphs):  # the captured loss where the step runs, as a CUDA capture's is
        def capture(self, body):
            self.calls.append("capture")
            out = torch.empty((), device="meta")
            return (body, out), out

    dev = torch.device("meta")
    net = AlexNet.from_options(NetOptions(width=0.0625), 10, "meta", grouped=grouped, conv1_channels=conv1_channels)
    opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), lr_tensors=graph)
    graphs = MetaGraphs(opt)
    run = StepRunner(net, opt, devices=(dev,), bf16=False, graph=graph, graphs=graphs, eager=T.train_step)
    crops = torch.empty((4, 3, 224, 224), dtype=torch.uint8, device=dev)
    mean_crop, shift = torch.empty((3, 224, 224), device=dev), torch.empty((4, 3), device=dev)
    labels = torch.empty(4, dtype=torch.long, device=dev)
    base = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    for k in range(6):  # with a graph: 3 warm-up steps, the capture, replays; ε ÷10 at the fifth
        with HostReads() as reads:
            x = augment.finish(crops, mean_crop, shift, "as-run")
            loss = run(x, labels, dict(base, weight=0.01 if k < 4 else 0.001))
        assert loss.device == dev and reads.seen == [], (k, reads.seen)
    assert opt._fused  # the fused update ran (its no-op here), not the plain passes' float(ε)
    assert graphs.calls == (["warm"] * 3 + ["capture", "replay", "replay", "replay"] if graph else [])


@pytest.mark.parametrize("script", ["gpu_perf", "gpu_check"])
def test_a_sigterm_kills_the_running_check_and_the_script_says_so(script):
    """What a device call's limit (or gpu_session's ``timeout``) sends: the check running in a
    process group of its own goes with everything it started (in gpu_check, torchrun and its
    workers: its first check runs them), and gpu_perf still prints the summary of the checks
    that ended. Real processes, a real SIGTERM."""
    import signal
    import time
    import uuid

    mark = uuid.uuid4().hex

    def marked():  # the pids whose environment carries this test's mark
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if f"GPU_PERF_TEST={mark}".encode() in (d / "environ").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    continue
        return pids

    p = subprocess.Popen([sys.executable, str(ROOT / "tools" / f"{script}.py"), "--dry-run"],  # all: ~25 s
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), GPU_PERF_TEST=mark, OMP_NUM_THREADS="2"))
    deadline = time.monotonic() + 120
    while len(marked()) < 2 and time.monotonic() < deadline:  # gpu_perf and its check process
        time.sleep(0.2)
    assert len(marked()) >= 2, "the check process never started"
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out[-3000:]
    if script == "gpu_perf":
        assert "gpu_perf: stopped by SIGTERM during (p,m,c,e,v)" in out and "0 of 5 checks passed" in out
        assert "gpu_perf: MISS end to end from the JPEG store (img/s): not measured" in out  # the summary
    else:
        assert "gpu_check: stopped by SIGTERM during (a,b,c,d,e,f), the check killed with all it started" in out
    for _ in range(50):
        left = [pid for pid in marked() if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes {left} outlived the SIGTERM"
