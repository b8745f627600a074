"""Prepare, stats, bad inputs, sources (folder, txt index, CIFAR-10) and the loaders."""
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import write_png
from PIL import Image

from make_index import make_index
from replica import augment
from replica.cli import main
from replica.data.loaders import FileImages, TrainBatches, batch_seed, compute_stats, loader, open_images
from replica.errors import ReplicaError
from replica.data.sources import find_source
from replica.data.store import PreparedStore


from replica.data.writer import prepare


def test_eigen_system_recovered_from_pixels_with_known_covariance(tmp_path):
    """Pixels drawn from N(μ, Σ): the store's covariance is theirs, its eigen-system is Σ's."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lam = np.array([300.0, 120.0, 30.0])
    sigma = q @ np.diag(lam) @ q.T
    pix = rng.multivariate_normal([128, 120, 110], sigma, size=(12, 32, 32))
    imgs = np.clip(np.round(pix), 0, 255).astype(np.uint8)
    for i, im in enumerate(imgs):
        write_png(tmp_path / "src" / "only" / f"{i:02d}.png", im)
    m = prepare(tmp_path / "src", tmp_path / "st", size=32, workers=1, progress=False)
    assert m["splits"]["train"] == {"total": 12, "used": 12}
    st = PreparedStore(tmp_path / "st")
    pca = st.pca()
    flat = imgs.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(pca["covariance"], np.cov(flat.T, bias=True), rtol=1e-9)
    np.testing.assert_allclose(st.mean(), imgs.transpose(0, 3, 1, 2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(pca["eigenvalues"], lam, rtol=0.06)
    vecs = np.asarray(pca["eigenvectors"])
    for i in range(3):
        assert abs(vecs[:, i] @ q[:, i]) > 0.99
    # the stored rows are the images, channel-major
    u8, labels, _ = st.batch([3, 0])
    np.testing.assert_array_equal(u8[0], imgs[3].transpose(2, 0, 1))
    assert labels.tolist() == [0, 0]


def test_prepare_resizes_shorter_side_and_centre_crops(tmp_path):
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # a white band in the middle third
    write_png(tmp_path / "src" / "a" / "x.png", arr)
    prepare(tmp_path / "src", tmp_path / "st", size=64, workers=1, progress=False)
    u8, _, _ = PreparedStore(tmp_path / "st").batch([0])
    # 100×300 → 64×192, centre 64 columns = the white band (its edges blend with the black)
    assert u8[0, :, :, 2:-2].min() >= 250 and u8[0, :, :, 0].max() < 250


def _bad_inputs(root):
    good = np.full((40, 40, 3), 90, np.uint8)
    d = root / "train" / "k"
    d.mkdir(parents=True)
    Image.fromarray(good).save(d / "good.jpg")
    full = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 10)
    Image.fromarray(np.full((40, 40), 100, np.uint8), "L").save(d / "gray.png")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # pure red in CMYK
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(d / "sixteen.png")
    Image.new("L", (3000, 3000)).save(d / "bomb.png")  # 9M pixels, refused under a 4M limit
    return d


def test_every_bad_input_is_converted_or_skipped_and_listed(tmp_path):
    _bad_inputs(tmp_path / "src")
    m = prepare(tmp_path / "src", tmp_path / "st", size=32, workers=1, progress=False, max_pixels=4_000_000)
    assert m["splits"]["train"] == {"total": 10, "used": 6}
    assert m["skipped"] == 4
    report = (tmp_path / "st" / "skipped.tsv").read_text().splitlines()
    assert report[0] == "split\tpath\treason"
    reasons = {line.split("\t")[1].rsplit("/", 1)[1]: line.split("\t")[2] for line in report[1:]}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notimage.jpg", "bomb.png"}
    assert "decompression bomb" in reasons["bomb.png"] and "pixel" in reasons["bomb.png"]
    assert "truncated" in reasons["truncated.jpg"].lower()
    st = PreparedStore(tmp_path / "st")
    files = sorted(p.name for p in (tmp_path / "src" / "train" / "k").iterdir())
    used = [f for f in files if f not in reasons]
    u8, _, _ = st.batch(np.arange(len(st)))
    px = {name: u8[i, :, 16, 16].tolist() for i, name in enumerate(used)}
    assert px["gray.png"] == [100, 100, 100]
    assert px["sixteen.png"] == [128, 128, 128]
    assert px["rgba.png"] == [0, 200, 0]
    assert px["palette.png"] == [10, 20, 30]
    r, g, b = px["cmyk.jpg"]
    assert r > 200 and g < 60 and b < 60


def test_prepare_summary_on_the_command_line(tmp_path, capsys):
    _bad_inputs(tmp_path / "src")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "st"), "--size", "32", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train 7/10 images; 3 skipped (listed in skipped.tsv)" in out  # PIL's default limit admits 9M px
    assert main(["stats", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert "eigenvalues" in out and "covariance" in out


def test_prepare_resumes_after_an_interruption(tiny_tree, tmp_path):
    calls = []

    def stop_after_two(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_tree, tmp_path / "st", size=32, workers=1, chunk=3, progress=False, on_chunk=stop_after_two)
    assert (tmp_path / "st" / ".prepare-state.npz").exists()
    with pytest.raises(ReplicaError, match="did not finish"):
        PreparedStore(tmp_path / "st")
    m = prepare(tiny_tree, tmp_path / "st", size=32, workers=1, chunk=3, progress=False)
    assert m["resumed_chunks"] == 2
    fresh = prepare(tiny_tree, tmp_path / "fresh", size=32, workers=1, chunk=3, progress=False)
    assert fresh["resumed_chunks"] == 0
    for split in ("train", "val"):
        a, b = PreparedStore(tmp_path / "st", split), PreparedStore(tmp_path / "fresh", split)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(np.load(tmp_path / "st" / "mean.npy"), np.load(tmp_path / "fresh" / "mean.npy"))
    assert json.loads((tmp_path / "st" / "pca.json").read_text()) == json.loads((tmp_path / "fresh" / "pca.json").read_text())
    # again: already complete, nothing redone
    assert prepare(tiny_tree, tmp_path / "st", size=32, workers=1, progress=False)["complete"]


def test_prepare_with_worker_processes_equals_in_process(tiny_tree, tmp_path):
    prepare(tiny_tree, tmp_path / "one", size=32, workers=1, chunk=4, progress=False)
    prepare(tiny_tree, tmp_path / "two", size=32, workers=2, chunk=4, progress=False)
    np.testing.assert_array_equal(PreparedStore(tmp_path / "one").images, PreparedStore(tmp_path / "two").images)
    np.testing.assert_allclose(np.load(tmp_path / "one" / "mean.npy"), np.load(tmp_path / "two" / "mean.npy"))


def test_a_small_set_is_prepared_in_this_process_unless_workers_are_asked_for(tiny_tree, tmp_path, monkeypatch):
    """workers=None: fewer than IN_PROCESS_BELOW images in this process (a worker's start, importing
    torch, costs more than the work); from there on, one worker per CPU (at most one per chunk)."""
    import replica.data.writer as writer

    used = []
    real = writer.run_chunks
    monkeypatch.setattr(writer, "run_chunks", lambda tasks, handle, workers, *a, **k:
                        used.append(workers) or real(tasks, handle, workers, *a, **k))
    monkeypatch.setattr(writer, "usable_cpus", lambda: 2)
    prepare(tiny_tree, tmp_path / "auto", size=32, chunk=4, progress=False)  # 21 images
    prepare(tiny_tree, tmp_path / "asked", size=32, chunk=4, workers=2, progress=False)
    monkeypatch.setattr(writer, "IN_PROCESS_BELOW", 10)
    prepare(tiny_tree, tmp_path / "large", size=32, chunk=4, progress=False)
    assert used == [1, 2, 2]
    np.testing.assert_array_equal(PreparedStore(tmp_path / "auto").images, PreparedStore(tmp_path / "large").images)


def test_clear_errors_for_missing_empty_and_malformed_sources(tmp_path):
    with pytest.raises(ReplicaError, match="no such file"):
        find_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplicaError, match="found no images"):
        find_source(tmp_path / "empty")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ReplicaError, match="holds no image files"):
        find_source(tmp_path / "noimg")
    idx = tmp_path / "bad.txt"
    idx.write_text("a.jpg 0\nb.jpg\n")
    with pytest.raises(ReplicaError, match=r"bad\.txt:2: expected 'PATH LABEL'"):
        find_source(idx)
    idx.write_text("a.jpg 0\n\nb.jpg cat\n")
    with pytest.raises(ReplicaError, match=r"bad\.txt:3: label 'cat' is not an integer"):
        find_source(idx)
    assert main(["prepare", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2


def test_seed_cats_vs_dogs_layout_index_and_folder_agree(tmp_path, capsys):
    """The seed's data/catVSdog tree, its txt index (made by make_index) and the folder itself."""
    rng = np.random.default_rng(2)
    base = tmp_path / "data" / "catVSdog"
    for split, names in (("train_data", range(0, 4)), ("test_data", range(10000, 10002))):
        for c in ("cat", "dog"):
            for i in names:
                write_png(base / split / c / f"{c}.{i}.jpg".replace(".jpg", ".png"),
                          rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    written = make_index(base)
    assert written == {"train.txt": 8, "test.txt": 4}
    assert (base / "classes.txt").read_text().split() == ["cat", "dog"]
    lines = (base / "train.txt").read_text().splitlines()
    assert lines[0] == "train_data/cat/cat.0.png 0" and lines[-1] == "train_data/dog/dog.3.png 1"
    via_index = find_source(base / "train.txt", base / "test.txt")
    via_folder = find_source(base)
    assert via_index.classes == via_folder.classes == ["cat", "dog"]
    assert via_index.splits["train"].labels == via_folder.splits["train"].labels
    assert len(via_folder.splits["val"].items) == 4
    # Windows-style paths from the seed's own generator resolve too
    (base / "win.txt").write_text("train_data\\cat\\cat.0.png 0\n")
    assert find_source(base / "win.txt").splits["train"].items[0].endswith("train_data/cat/cat.0.png")
    # on the fly, same pipeline
    imgs = FileImages(via_index, "val", size=64)
    u8, labels, bad = imgs.batch([0, 3])
    assert u8.shape == (2, 3, 64, 64) and labels.tolist() == [0, 1] and bad == []


def _fake_cifar(root):
    rng = np.random.default_rng(3)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in
                                      "airplane automobile bird cat deer dog frog horse ship truck".split()]}, f)
    return d


def test_cifar10_batches_prepare_and_on_the_fly(tmp_path):
    d = _fake_cifar(tmp_path / "c")
    src = find_source(tmp_path / "c")
    assert src.kind == "cifar10" and src.classes[0] == "airplane"
    assert len(src.splits["train"].items) == 20 and len(src.splits["val"].items) == 3
    m = prepare(tmp_path / "c", tmp_path / "st", size=64, workers=1, progress=False)
    assert m["splits"] == {"train": {"total": 20, "used": 20}, "val": {"total": 3, "used": 3}}
    st = PreparedStore(tmp_path / "st", "val")
    fly = FileImages(src, "val", size=64)
    np.testing.assert_array_equal(st.batch([0, 1, 2])[0], fly.batch([0, 1, 2])[0])
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert st.labels.tolist() == list(raw[b"labels"])


def test_train_batches_are_a_pure_function_of_seed_epoch_and_index(tiny_tree, tmp_path):
    prepare(tiny_tree, tmp_path / "st", size=64, workers=1, progress=False)
    st = open_images(tmp_path / "st")
    mean, pca = st.mean(), st.pca()
    common = dict(mean_image=mean, pca=pca, seed=5, crop=32)  # a 64² store: 32 crops, border 32
    a = TrainBatches(st, 4, epoch=0, **common)
    assert len(a) == 15 // 4
    x0, y0 = a.batch(1)
    x1, y1 = TrainBatches(st, 4, epoch=0, **common).batch(1)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert x0.shape == (4, 3, 32, 32) and x0.dtype == torch.float32
    other, _ = TrainBatches(st, 4, epoch=1, **common).batch(1)
    assert not torch.equal(x0, other)  # a new epoch: new order and new draws
    resumed = TrainBatches(st, 4, epoch=0, start=1, **common)
    assert resumed[0][3] == 1 and torch.equal(resumed.batch(0)[0], x0)
    # the same batches through worker processes: uint8 crops come back, finish() in this process
    seen = [(a.finish(c, s), b) for c, s, _, b, _ in loader(TrainBatches(st, 4, epoch=0, **common), workers=2)]
    assert seen[1][1] == 1 and torch.equal(seen[1][0], x0)
    crops, shift, _, _, _ = a[1]
    assert crops.dtype == torch.uint8 and shift.shape == (4, 3)
    # equal to the one-call form of the augmentation
    u8, _, _ = st.batch(a.order[4:8])
    g = torch.Generator().manual_seed(batch_seed(5, 0, 1))
    want = augment.train_batch(torch.from_numpy(u8), a.mean_crop, g, pca=pca, size=32)
    torch.testing.assert_close(x0, want)


def test_train_batches_shard_across_processes(tiny_tree, tmp_path):
    prepare(tiny_tree, tmp_path / "st", size=64, workers=1, progress=False)
    st = open_images(tmp_path / "st")
    kw = dict(mean_image=st.mean(), pca=None, seed=1, crop=32)
    whole = TrainBatches(st, 6, **kw)
    r0, r1 = TrainBatches(st, 3, rank=0, world=2, **kw), TrainBatches(st, 3, rank=1, world=2, **kw)
    assert len(r0) == len(r1) == len(whole)
    assert torch.equal(torch.cat([r0[0][2], r1[0][2]]), whole[0][2])  # labels: the shards tile the batch
    assert torch.equal(torch.cat([r0[0][0], r1[0][0]]), whole[0][0])  # and so do the crops and flips
    with pytest.raises(ReplicaError, match="fewer than one batch"):
        TrainBatches(st, 100, **kw)
    with pytest.raises(ReplicaError, match="crop 224 is larger"):
        TrainBatches(st, 2, mean_image=st.mean(), pca=None)


def test_on_the_fly_reports_bad_files_and_compute_stats_matches_prepare(tmp_path):
    _bad_inputs(tmp_path / "src")
    src = find_source(tmp_path / "src")
    fly = FileImages(src, size=32, max_pixels=4_000_000)
    u8, labels, bad = fly.batch(np.arange(len(fly)))
    assert len(u8) == len(labels) == 6 and len(bad) == 4
    prepare(tmp_path / "src", tmp_path / "st", size=32, workers=1, progress=False, max_pixels=4_000_000)
    good = FileImages(find_source(tmp_path / "src"), size=32, max_pixels=4_000_000)
    good.items = [it for it in good.items if it not in {b[0] for b in bad}]
    assert sorted(k for _, _, k in bad) == sorted(fly.items.index(b[0]) for b in bad)
    good.labels = good.labels[:len(good.items)]
    mean, pca = compute_stats(good)
    np.testing.assert_allclose(mean, np.load(tmp_path / "st" / "mean.npy"))
    np.testing.assert_allclose(pca["covariance"], json.loads((tmp_path / "st" / "pca.json").read_text())["covariance"])


def test_batch_seed_is_stable():
    assert batch_seed(0, 0, 0) == batch_seed(0, 0, 0)
    assert len({batch_seed(s, e, i) for s in range(3) for e in range(3) for i in range(3)}) == 27


def test_train_batches_from_files_on_the_fly_skip_and_report_bad_files(tmp_path):
    _bad_inputs(tmp_path / "src")
    fly = FileImages(find_source(tmp_path / "src"), size=64, max_pixels=4_000_000)
    ds = TrainBatches(fly, 10, np.zeros((3, 64, 64)), None, seed=2, crop=32)
    crops, shift, labels, b, bad = ds[0]
    assert crops.shape == (6, 3, 32, 32) and len(labels) == 6 and shift is None
    assert sorted(p.rsplit("/", 1)[1] for p, _, _ in bad) == ["bomb.png", "empty.jpg", "notimage.jpg", "truncated.jpg"]
    whole, _, labels2, _, bad2 = TrainBatches(fly, 10, np.zeros((3, 64, 64)), None, seed=2, crop=32, crop_on="device")[0]
    assert torch.equal(whole.cut("cpu"), crops) and torch.equal(labels2, labels) and bad2 == bad  # the same crops


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        import os
        return os.nice(0)


def test_cpu_training_loader_workers_yield_to_the_training_threads():
    """On the CPU the loader workers run niced (docs/performance.md), the training process is untouched."""
    import os

    from replica.data.loaders import WORKER_NICE, loader

    mine = os.nice(0)
    background = list(loader(_Niceness(), workers=1, background=True))
    level = list(loader(_Niceness(), workers=1))
    assert background == [min(mine + WORKER_NICE, 19)] * 2 and level == [mine] * 2 and os.nice(0) == mine


def test_a_dead_loader_worker_is_reported_by_the_next_batch_not_in_the_middle_of_a_step(tmp_path):
    """torch's SIGCHLD handler raises a worker's death wherever the main thread is: mid-step, in
    DDP's backward, where one process of a job would leave the others waiting. After
    ``worker_deaths_at_next_batch`` it surfaces in ``next()``, where the loop can agree to stop.
    A real worker, really SIGKILLed while the main thread runs a "step" (plain Python work) that
    lasts until the worker is seen dead: ordered by a file and the worker's state, not by time.
    In a process of its own (torch's handler is set once per process).

    Only what replica guarantees is asserted: with the call, the step is never interrupted and
    the next batch says the worker died. Without it, whether torch's handler raises mid-step
    depends on when the kernel delivers SIGCHLD (mid-step 9 runs in 10 here, 5 in 8 on a 2-core
    EPYC; the rest in next()), so torch's own behaviour is not a test: with the call taken out,
    this test fails whenever the signal lands inside the step, as it usually does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = r"""
import os, signal, sys, time
from pathlib import Path
import torch
from replica.data.loaders import loader, worker_deaths_at_next_batch

flag, pidfile = Path(sys.argv[2]) / "step-started", Path(sys.argv[2]) / "worker-pid"

class Dies(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        if i == 1:  # as the OOM killer would, once batch 0 is in use
            pidfile.write_text(str(os.getpid()))
            while not flag.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(2)

def dead(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"
    except FileNotFoundError:
        return True

it = iter(loader(Dies(), workers=1))
if sys.argv[1] == "fixed":
    worker_deaths_at_next_batch()
next(it)
try:
    flag.touch()  # the step begins
    while not pidfile.exists() or not dead(int(pidfile.read_text())):
        sum(range(1000))
    for _ in range(20000):  # the pending signal is handled between two of these, if a handler raises
        sum(range(100))
except RuntimeError as e:
    print("MID-STEP:", str(e).splitlines()[0]); sys.exit(0)
try:
    next(it)
except RuntimeError as e:
    print("NEXT BATCH:", str(e).splitlines()[0])
"""
    out = {}
    for mode in ("fixed",):  # "torch" (any other word) runs without the call: torch's own handler
        (tmp_path / mode).mkdir()
        r = subprocess.run([sys.executable, "-c", code, mode, str(tmp_path / mode)], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        out[mode] = r.stdout.strip() or r.stderr[-1500:]
    assert out["fixed"].startswith("NEXT BATCH: DataLoader worker") and "exited unexpectedly" in out["fixed"], out
