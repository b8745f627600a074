import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
# The suite's many tiny runs would each compile the fused norms (the CPU default): 3 more
# minutes on 2 cores. Off here (subprocesses inherit it); the fused tests switch them on.
os.environ["REPLICA_FUSED_NORMS"] = "0"
# archive member indexes (replica.data.tars) go to a folder of this run's, not the user's cache
os.environ.setdefault("REPLICA_CACHE", tempfile.mkdtemp(prefix="replica-cache-"))

# Runs of the paper's width (the demo, DDP, one exact resume) write 456 MB checkpoints, fsync'ed:
# on this project's 2-core ext4 machine a write took 0.4-2.1 s on disk and 0.3-0.5 s in memory.
# So the test folders go to /dev/shm where it has room (no test depends on the disk: kills are process
# kills, which the page cache survives). --basetemp, or REPLICA_TEST_TMP=disk, keeps them on disk.
IN_MEMORY_MIN_FREE = 8 << 30


def pytest_configure(config):
    shm = Path("/dev/shm")
    if config.option.basetemp or os.environ.get("REPLICA_TEST_TMP") == "disk" or not shm.is_dir():
        return
    try:
        roomy = os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= IN_MEMORY_MIN_FREE
    except OSError:
        roomy = False
    if roomy:
        config.option.basetemp = config._replica_in_memory = tempfile.mkdtemp(prefix="replica-tests-", dir=shm)


def pytest_unconfigure(config):
    where = getattr(config, "_replica_in_memory", None)
    if not where or not Path(where).exists():
        return
    if getattr(config, "_replica_failed", False):
        print(f"\nthe failed tests' folders are kept in memory, in {where}: remove it when done")
    else:
        shutil.rmtree(where, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    session.config._replica_failed = exitstatus != 0


@pytest.fixture
def cxx():
    """Skips where torch.compile's CPU backend has no C++ compiler (the fused norms need one;
    without it the product falls back to the eager norms, which the other tests cover)."""
    if not (shutil.which(os.environ.get("CXX") or "g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler: the fused norms cannot compile here")


def write_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def tiny_tree(tmp_path):
    """train/ and val/ class folders of small random JPEGs: 3 classes, 5 + 2 images each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            for i in range(n):
                arr = rng.integers(0, 256, (40 + 3 * i, 50, 3), dtype=np.uint8)
                p = tmp_path / "src" / split / c / f"{i}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p, quality=95)
    return tmp_path / "src"


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """A prepared store of the synthetic set: 4 classes, 6 training and 2 val images each (one for
    the whole session: tests that damage a store copy it first)."""
    from replica.data.writer import prepare
    from replica.data.synth import synth

    d = tmp_path_factory.mktemp("data")
    synth(d / "synth", classes=4, train_per_class=6, val_per_class=2, seed=1, workers=1, progress=False)
    prepare(d / "synth", d / "store", workers=1, progress=False)
    return d / "store"


@pytest.fixture(scope="session")
def whole_run(store, tmp_path_factory):
    """One uninterrupted run of ``runs_helpers.tiny(store)`` (2 epochs × 3 steps, best.pt too), for
    the tests that compare a stopped, failed or resumed run against it. Read it; never write in it.
    Returns (run folder, what ``train`` returned)."""
    from replica.train import train
    from runs_helpers import tiny

    run = tmp_path_factory.mktemp("whole-run") / "whole"
    return run, train(tiny(store), run, progress=False)
