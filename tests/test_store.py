"""The store at ImageNet scale: the JPEG format, decode in the workers or where the batch is
used, bad entries, free space, a disk that fills, a worker that dies, a source that moved, and
loader workers that receive a store's path rather than its content."""
import errno
import json
import os
import pickle
import shutil
import signal

import numpy as np
import pytest
import torch

import replica.data.chunks as chunks_mod
import replica.data.writer as store_mod
from replica.cli import main
from replica.config import load_config
from replica.data.loaders import TrainBatches
from replica.errors import ReplicaError
from replica.runs import load_checkpoint
from replica.data.store import PixelStats, PreparedStore
from replica.data.writer import prepare
from replica.data.synth import synth
from replica.train import train
from runs_helpers import NARROW


@pytest.fixture(scope="module")
def synth_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    synth(d / "s", classes=4, train_per_class=6, val_per_class=2, seed=3, workers=1, progress=False)
    return d / "s"


def test_jpeg_store_holds_the_images_in_a_fraction_of_the_bytes(synth_src, tmp_path):
    raw = prepare(synth_src, tmp_path / "raw", workers=1, progress=False, fmt="raw")
    jpg = prepare(synth_src, tmp_path / "jpg", workers=1, progress=False, fmt="jpeg")
    assert raw["format"] == "raw" and jpg["format"] == "jpeg" and jpg["quality"] == 90
    a, b = PreparedStore(tmp_path / "raw"), PreparedStore(tmp_path / "jpg")
    assert len(a) == len(b) == 24 and a.labels.tolist() == b.labels.tolist()
    x, y = a.images.astype(np.int16), b.images.astype(np.int16)
    assert np.abs(x - y).mean() < 3  # quality 90: the same pictures
    per_image = (tmp_path / "jpg" / "train" / "images.jpeg").stat().st_size / len(b)
    assert per_image < 196_608 / 4
    # the statistics are of the pixels the net will see: the decoded JPEGs
    st = PixelStats(256)
    for img in b.images:
        st.add_image(img)
    mean, pca = st.result()
    np.testing.assert_allclose(np.load(tmp_path / "jpg" / "mean.npy"), mean, rtol=1e-12)
    np.testing.assert_allclose(json.loads((tmp_path / "jpg" / "pca.json").read_text())["covariance"],
                               pca["covariance"], rtol=1e-9)


def test_auto_picks_jpeg_for_large_sets(synth_src, tmp_path, monkeypatch):
    assert prepare(synth_src, tmp_path / "small", workers=1, progress=False)["format"] == "raw"
    monkeypatch.setattr(store_mod, "JPEG_FROM_IMAGES", 10)
    assert prepare(synth_src, tmp_path / "large", workers=1, progress=False)["format"] == "jpeg"


def _cfg(data, **kw):
    base = dict(data=str(data), batch_size=4, epochs=2, steps_per_epoch=3, workers=1, devices="cpu", init="caffe",
                width=NARROW, tensorboard=False, live=False)
    base.update(kw)
    return load_config(None, base)


def test_decoding_in_the_workers_or_where_the_batch_is_used_trains_the_same(synth_src, tmp_path):
    """decode=device is the GPU path (a batched nvJPEG decode, then crops on the GPU), run here on
    the CPU: the same batches and the same weights as decoding in the loader workers."""
    prepare(synth_src, tmp_path / "jpg", workers=1, progress=False, fmt="jpeg")
    st = PreparedStore(tmp_path / "jpg")
    mean = np.load(tmp_path / "jpg" / "mean.npy")
    pca = json.loads((tmp_path / "jpg" / "pca.json").read_text())
    for i in range(3):
        a = TrainBatches(st, 4, mean, pca, seed=1, decode="workers").batch(i)
        b = TrainBatches(st, 4, mean, pca, seed=1, decode="device").batch(i)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    train(_cfg(tmp_path / "jpg", decode="workers"), tmp_path / "w", progress=False)
    train(_cfg(tmp_path / "jpg", decode="device"), tmp_path / "d", progress=False)
    x, y = load_checkpoint(tmp_path / "w"), load_checkpoint(tmp_path / "d")
    assert all(torch.equal(x.model[k], y.model[k]) for k in x.model)


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_crops_cut_in_the_workers_or_where_the_batch_is_used_train_the_same(synth_src, tmp_path, fmt):
    """crop_on=device (workers read and decode whole images; the crops are one gather where the
    batch is used), run here on the CPU: the same float batches bit for bit, through a loader
    worker's shared memory, and the same weights after a run."""
    prepare(synth_src, tmp_path / "st", workers=1, progress=False, fmt=fmt)
    st = PreparedStore(tmp_path / "st")
    mean, pca = st.mean(), st.pca()
    for i in range(3):
        a = TrainBatches(st, 4, mean, pca, seed=1, crop_on="workers").batch(i)
        b = TrainBatches(st, 4, mean, pca, seed=1, crop_on="device").batch(i)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    whole, _, _, _, _ = TrainBatches(st, 4, mean, pca, seed=1, crop_on="device")[0]
    assert whole.hwc == (fmt == "jpeg") and whole.images.shape[1:] == ((256, 256, 3) if fmt == "jpeg" else (3, 256, 256))
    train(_cfg(tmp_path / "st", crop_on="workers"), tmp_path / "w", progress=False)
    train(_cfg(tmp_path / "st", crop_on="device"), tmp_path / "d", progress=False)
    x, y = load_checkpoint(tmp_path / "w"), load_checkpoint(tmp_path / "d")
    assert all(torch.equal(x.model[k], y.model[k]) for k in x.model)


def test_a_loaders_pin_thread_pins_whole_images_too(synth_src, tmp_path, monkeypatch):
    """torch's pin thread calls a batch object's own pin_memory: the Uncropped images are the
    pinned ones, the draws go with them (pinning itself needs a GPU: recorded here)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    prepare(synth_src, tmp_path / "st", workers=1, progress=False, fmt="raw")
    st = PreparedStore(tmp_path / "st")
    batch = TrainBatches(st, 4, st.mean(), st.pca(), seed=1, crop_on="device")[0]
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(t.data_ptr()) or t.clone())
    out = pin_memory(batch)
    assert batch[0].images.data_ptr() in pinned and out[0].images.data_ptr() != batch[0].images.data_ptr()
    assert torch.equal(out[0].cut("cpu"), batch[0].cut("cpu"))


def test_bad_entries_inside_a_jpeg_store_are_skipped_and_logged(synth_src, tmp_path):
    prepare(synth_src, tmp_path / "jpg", workers=1, progress=False, fmt="jpeg")
    index = np.load(tmp_path / "jpg" / "train" / "index.npy")
    f = tmp_path / "jpg" / "train" / "images.jpeg"
    with open(f, "r+b") as fh:  # one entry garbled
        fh.seek(int(index[3, 0]))
        fh.write(b"\0" * int(index[3, 1]))
    last = int(np.argmax(index[:, 0]))
    with open(f, "r+b") as fh:  # and the file cut inside its last entry
        fh.truncate(int(index[last, 0]) + 10)
    for decode, crop_on in (("workers", "workers"), ("device", "workers"), ("workers", "device")):
        run = tmp_path / f"run-{decode}-{crop_on}"
        train(_cfg(tmp_path / "jpg", epochs=1, steps_per_epoch=6, decode=decode, crop_on=crop_on), run, progress=False)
        tsv = (run / "bad_inputs.tsv").read_text()
        assert "images.jpeg row 3\tcorrupt JPEG entry" in tsv, tsv
        assert f"images.jpeg row {last}\ttruncated store" in tsv, tsv
        assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["skipped_files"] == 2


def test_prepare_refuses_a_disk_without_room_with_the_numbers(synth_src, tmp_path, monkeypatch, capsys):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    assert main(["prepare", str(synth_src), str(tmp_path / "st"), "--format", "raw"]) == 2
    err = capsys.readouterr().err
    assert "the store needs about 6.3 MB (32 images, raw); 0.0 MB written so far and 1.0 MB free" in err
    assert "needs about" in err and "32 images, raw" in err and "free on that disk" in err and "--format jpeg" in err
    assert "Traceback" not in err


def _same_store(a, b):
    for split in ("train", "val"):
        x, y = PreparedStore(a, split), PreparedStore(b, split)
        assert np.array_equal(x.images, y.images) and x.labels.tolist() == y.labels.tolist()
    assert np.array_equal(np.load(a / "mean.npy"), np.load(b / "mean.npy"))


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_a_disk_that_fills_mid_way_ends_with_one_line_and_resumes(synth_src, tmp_path, monkeypatch, capsys, fmt):
    calls = []
    real_pwrite, real_chunk = os.pwrite, chunks_mod._worker_chunk

    def full(*a):  # raw: the worker's own write of a row; jpeg: a chunk's work
        calls.append(1)
        if len(calls) > (10 if fmt == "raw" else 2):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(*a) if fmt == "raw" else real_chunk(*a)

    monkeypatch.setattr(os, "pwrite", full) if fmt == "raw" else monkeypatch.setattr(chunks_mod, "_worker_chunk", full)
    argv = ["prepare", str(synth_src), str(tmp_path / "st"), "--workers", "1", "--chunk", "4", "--format", fmt]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same 'replica prepare' again to resume" in err
    assert "Traceback" not in err
    monkeypatch.undo()
    m = prepare(synth_src, tmp_path / "st", workers=1, chunk=4, progress=False, fmt=fmt)
    assert m["resumed_chunks"] >= 2
    prepare(synth_src, tmp_path / "fresh", workers=1, chunk=4, progress=False, fmt=fmt)
    _same_store(tmp_path / "st", tmp_path / "fresh")


def test_a_killed_prepare_worker_ends_with_one_line_not_a_hang(synth_src, tmp_path):
    import multiprocessing as mp

    def kill_one(done, total):
        if done == 1:
            os.kill(mp.active_children()[0].pid, signal.SIGKILL)  # as the OOM killer would

    with pytest.raises(ReplicaError, match="a prepare worker died .* run the same 'replica prepare' again to resume"):
        prepare(synth_src, tmp_path / "st", workers=2, chunk=2, progress=False, fmt="raw", on_chunk=kill_one)
    m = prepare(synth_src, tmp_path / "st", workers=2, chunk=2, progress=False, fmt="raw")
    assert m["resumed_chunks"] >= 1
    prepare(synth_src, tmp_path / "fresh", workers=1, chunk=2, progress=False, fmt="raw")
    _same_store(tmp_path / "st", tmp_path / "fresh")


def test_a_chunk_sent_to_a_dead_worker_is_a_dead_worker_not_a_full_disk(synth_src, tmp_path):
    """The order that was blamed on the disk ("writing the store … failed: Broken pipe; free
    space"): every worker is dead, and waited for, before the next chunk is sent to one."""
    import multiprocessing as mp

    def kill_all(done, total):
        if done == 1:
            for child in mp.active_children():
                os.kill(child.pid, signal.SIGKILL)
                child.join()

    with pytest.raises(ReplicaError, match="a prepare worker died") as e:
        prepare(synth_src, tmp_path / "st", workers=2, chunk=2, progress=False, fmt="raw", on_chunk=kill_all)
    assert "free space" not in str(e.value) and "Broken pipe" not in str(e.value)
    assert prepare(synth_src, tmp_path / "st", workers=1, chunk=2, progress=False, fmt="raw")["resumed_chunks"] >= 1


def test_a_moved_source_still_resumes(synth_src, tmp_path):
    src = tmp_path / "disk1" / "s"
    shutil.copytree(synth_src, src)

    def stop(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "st", workers=1, chunk=4, progress=False, on_chunk=stop)
    moved = tmp_path / "disk2" / "s"
    moved.parent.mkdir()
    shutil.move(str(src), str(moved))  # the same files under a new absolute path
    m = prepare(moved, tmp_path / "st", workers=1, chunk=4, progress=False)
    assert m["resumed_chunks"] == 3


def test_a_store_pickles_as_its_path_and_spawned_workers_read_it(synth_src, tmp_path):
    prepare(synth_src, tmp_path / "st", workers=1, progress=False)
    st = PreparedStore(tmp_path / "st")
    _ = st.images[0]  # the mapping is open here
    assert len(pickle.dumps(st)) < 1_000  # its path, not 4.7 MB of pixels
    mean = np.load(tmp_path / "st" / "mean.npy")
    ds = TrainBatches(st, 4, mean, None, seed=2)
    here = [ds[i][0] for i in range(len(ds))]
    it = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    there = [c for c, *_ in it]
    assert all(torch.equal(a, b) for a, b in zip(here, there)) and len(there) == len(here)


def test_a_large_image_folder_gets_advice_instead_of_an_hour_of_statistics(synth_src, tmp_path, monkeypatch):
    import replica.data.loaders as loaders

    monkeypatch.setattr(loaders, "STATS_ON_THE_FLY_MAX", 10)
    with pytest.raises(ReplicaError, match=r"holds 24 images: .* run 'replica prepare .* once"):
        train(_cfg(synth_src, workers=0), tmp_path / "run", progress=False)


def test_workers_default_to_the_cpus_this_process_may_use(synth_src, tmp_path, monkeypatch):
    """Not os.cpu_count(): a container or a job scheduler may give this process fewer CPUs."""
    seen = []
    real = store_mod.run_chunks
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one CPU of the 64
    monkeypatch.setattr(store_mod, "run_chunks", lambda tasks, handle, workers, *a, **k: seen.append(workers) or
                        real(tasks, handle, workers, *a, **k))
    prepare(synth_src, tmp_path / "st", chunk=4, progress=False)  # 8 chunks: room for 8 workers
    assert seen == [1]


def test_short_pwrites_are_completed_and_a_zero_write_is_a_full_disk(tmp_path, monkeypatch):
    """os.pwrite may write less than asked: the rest is written (a row is never left partly zero
    and marked ok), and a write of nothing is ENOSPC."""
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real(fd, bytes(data[:7]), off))  # 7 bytes a call
    path = tmp_path / "rows"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        data = bytes(range(256)) * 3
        chunks_mod.pwrite_all(fd, data, 100)
        assert path.read_bytes()[100:] == data
        monkeypatch.setattr(os, "pwrite", lambda fd, data, off: 0)
        with pytest.raises(OSError) as e:
            chunks_mod.pwrite_all(fd, b"abc", 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["append", "flush", "finish"])
def test_enospc_in_the_main_process_writes_is_one_line_and_resumes(synth_src, tmp_path, monkeypatch, capsys, where):
    """A JPEG prepare appends the encoded bytes in the main process: a full disk there (in the
    write, the flush that precedes each state, or the final files) is one line, and the same
    command resumes to the store a clean run makes."""
    import builtins

    real_open, real_save = builtins.open, np.save
    writes = []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            writes.append(len(b))
            if where == "append" and len(writes) > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def flush(self):
            if where == "flush" and len(writes) > 5:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.flush()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if mode == "ab" and str(path).endswith("images.jpeg") else f

    def save(path, *a, **k):
        if where == "finish" and str(path).endswith("labels.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(path, *a, **k)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(np, "save", save)
    argv = ["prepare", str(synth_src), str(tmp_path / "st"), "--workers", "1", "--chunk", "4", "--format", "jpeg"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same 'replica prepare' again to resume" in err, err
    assert "Traceback" not in err
    monkeypatch.undo()
    prepare(synth_src, tmp_path / "st", workers=1, chunk=4, progress=False, fmt="jpeg")
    prepare(synth_src, tmp_path / "fresh", workers=1, chunk=4, progress=False, fmt="jpeg")
    _same_store(tmp_path / "st", tmp_path / "fresh")


def test_a_second_prepare_into_the_same_out_is_refused(synth_src, tmp_path, capsys):
    """While one prepare holds OUT, another is refused with one line (not interleaved writes)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "st"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; import replica.data.writer as s\n"
        "with s._locked(Path(sys.argv[1])):\n"
        "    print('held', flush=True); sys.stdin.read()\n"), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["prepare", str(synth_src), str(out), "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert f"another 'replica prepare' is writing this store (pid {holder.pid} on " in err and "Traceback" not in err
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    time.sleep(0.1)
    m = prepare(synth_src, out, workers=1, progress=False)  # the lock went with its process
    assert m["complete"]


def test_the_resume_state_is_written_rarely_and_at_the_end(synth_src, tmp_path, monkeypatch):
    """Not once a second: every STATE_EVERY_S seconds and on the way out. A fast prepare writes it
    once; an interrupted one keeps every finished chunk (the state written on the way out)."""
    saves = []
    real = store_mod.atomic_write
    monkeypatch.setattr(store_mod, "atomic_write",
                        lambda p, w: (saves.append(p.name) if p.name == store_mod.STATE else None) or real(p, w))
    prepare(synth_src, tmp_path / "st", workers=1, chunk=2, progress=False, fmt="raw")
    assert saves.count(store_mod.STATE) == 1  # 16 chunks in under 30 s: the final state only
    saves.clear()

    def stop_at(done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(synth_src, tmp_path / "cut", workers=1, chunk=2, progress=False, fmt="raw", on_chunk=stop_at)
    assert saves == [store_mod.STATE]  # only the one on the way out: it keeps the 5 finished chunks
    assert prepare(synth_src, tmp_path / "cut", workers=1, chunk=2, progress=False, fmt="raw")["resumed_chunks"] == 5
    _same_store(tmp_path / "cut", tmp_path / "st")


def test_a_killed_prepare_loses_at_most_the_chunks_since_the_last_state(synth_src, tmp_path):
    """SIGKILL of prepare itself (no way out to save on) after its 6th chunk: with a state after
    every chunk (STATE_EVERY_S = 0) the resume redoes none; with none since the start (an interval
    longer than the run) it redoes all 6. Either way the store ends equal to a fresh one."""
    import subprocess
    import sys

    code = ("import os, signal, sys\n"
            "import replica.data.writer as w\n"
            "w.STATE_EVERY_S = float(sys.argv[3])\n"
            "def kill(done, total):\n"
            "    if done == 6: os.kill(os.getpid(), signal.SIGKILL)\n"
            "w.prepare(sys.argv[1], sys.argv[2], workers=1, chunk=2, progress=False, fmt='raw', on_chunk=kill)\n")
    prepare(synth_src, tmp_path / "fresh", workers=1, chunk=2, progress=False, fmt="raw")
    for every, kept in ((0.0, 6), (1e9, 0)):
        out = tmp_path / f"cut-{kept}"
        r = subprocess.run([sys.executable, "-c", code, str(synth_src), str(out), str(every)], timeout=120)
        assert r.returncode == -signal.SIGKILL
        m = prepare(synth_src, out, workers=1, chunk=2, progress=False, fmt="raw")
        assert m["resumed_chunks"] == kept
        _same_store(out, tmp_path / "fresh")


def test_prepare_workers_start_single_threaded():
    before = os.environ.get("OMP_NUM_THREADS")
    with chunks_mod.single_threaded_children():
        assert all(os.environ[k] == "1" for k in chunks_mod.WORKER_THREADS)
    assert os.environ.get("OMP_NUM_THREADS") == before


def test_a_chunks_pixel_sums_travel_exactly_in_a_quarter_of_the_bytes():
    rng = np.random.default_rng(4)
    st = PixelStats(16)
    for _ in range(64):
        st.add_image(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8))
    c = chunks_mod._compact(st)
    assert c["image_sum"].dtype == np.uint16 and c["image_sum"].nbytes == st.image_sum.nbytes // 4
    back = PixelStats.from_arrays(c)
    assert np.array_equal(back.image_sum, st.image_sum) and back.image_sum.dtype == np.float64
    full = PixelStats(16)
    full.image_sum[:] = 255 * 300  # more than 257 images' worth: uint32
    full.images = 300
    assert chunks_mod._compact(full)["image_sum"].dtype == np.uint32


def test_reading_a_store_never_loads_the_writer():
    """The writer (pool, resume state, lock) is its own module: a reader, the training loop, never loads it."""
    import subprocess
    import sys

    code = ("import sys, replica.data.store, replica.data.loaders, replica.train, replica.inference\n"
            "print('replica.data.writer' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stdout + r.stderr


def test_a_raw_prepare_never_imports_torch_in_its_process_or_its_workers(synth_src, tmp_path):
    """``replica prepare`` into a raw store, with 2 worker processes: torch is imported nowhere
    (~2 s and ~0.6 GB a process); only a JPEG store's encoder needs it (torchvision's)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    r = subprocess.run([sys.executable, "-m", "replica", "prepare", str(synth_src), str(tmp_path / "st"), "--workers",
                        "2", "--format", "raw"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    imports = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert imports.count("replica.data.chunks") == 3, imports.count("replica.data.chunks")  # the main process, 2 workers
    assert imports.count("replica.data.writer") == 1  # a worker loads the chunks' code only
    assert "torch" not in imports and "torchvision" not in imports
    assert json.loads((tmp_path / "st" / "meta.json").read_text())["format"] == "raw"


def test_pixel_sums_cross_from_the_workers_rarely_and_the_store_is_the_same(synth_src, tmp_path, monkeypatch):
    """Each worker keeps its chunks' pixel sums and sends them with its first result, then every
    STATS_EVERY_CHUNKS chunks, and when it stops: far fewer messages than chunks, and the mean
    image and PCA equal those of a prepare in one process."""
    sent = []
    real = store_mod.run_chunks

    def spy(tasks, handle, workers, *a, handle_stats=None, **k):
        def counted(sums):
            sent.append(len(sums[1]))
            return handle_stats(sums)
        return real(tasks, handle, workers, *a, handle_stats=counted, **k)

    monkeypatch.setattr(store_mod, "run_chunks", spy)
    prepare(synth_src, tmp_path / "pool", workers=2, chunk=1, progress=False, fmt="raw")  # 24 training chunks
    assert sum(sent) == 24 and len(sent) <= 2 * 3  # per worker: its first, one more of 16 at most, its last
    monkeypatch.undo()
    prepare(synth_src, tmp_path / "one", workers=1, chunk=1, progress=False, fmt="raw")
    _same_store(tmp_path / "pool", tmp_path / "one")
    assert json.loads((tmp_path / "pool" / "pca.json").read_text()) == json.loads((tmp_path / "one" / "pca.json").read_text())
