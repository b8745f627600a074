#!/usr/bin/env python
"""The project's one benchmark: every speed figure in docs/performance.md comes from here.

    python tools/bench.py model   [--device cpu|cuda] [--batch 128] [--steps 5] [--grouped] [--no-malloc-tuning]
    python tools/bench.py model --fast-paths [--bf16] [--batch 32]
    python tools/bench.py data    [--data DIR] [--images 1280] [--workers 2] [--epochs 2] [--rounds 3]
    python tools/bench.py e2e     [--device cpu|cuda] [--batch 128] [--steps 5] [--images 1024] [--data DIR]
    python tools/bench.py eval    [--device cpu|cuda] [--eval-images 128]
    python tools/bench.py gpu     [--batch 256]        (CUDA only)
    python tools/bench.py prepare [--images 600] [--classes 6] [--workers 1 2]
    python tools/bench.py host    [--steps 40]   the host's work per step: batch fetch, agree, step
    python tools/bench.py all     [--device cpu|cuda] [...]   model, e2e, eval (and gpu on CUDA)
    python tools/bench.py core    [--device cpu|cuda] [--no-fused] [--profile] [...]   what tools/gpu_check.sh times
    python tools/bench.py defaults [--device cuda] [--no-compile] [--profile] [...]   what decides the CUDA defaults

Every row is measured after warm-up; rows compared with each other are interleaved step by step,
so that a slow patch of a shared machine hits both alike, and each reports the median. Each
reference is measured in the same run, so a printed RATIO survives a noisy machine.

model: the train step (forward + backward + update) of the as-run two-tower net against
  ``torchvision.models.alexnet``, on random input: ours with PaperSGD (what ``replica train``
  runs), torchvision's with ``torch.optim.SGD``. Ours with the fused norms (the three norms as
  compiled loops, the CPU default; the first step compiles them) and the eager ones, NCHW, and
  without norms; torchvision also channels_last; then both under bf16 autocast (``--no-bf16``
  leaves them out). A second table times the cross-map LRN alone (forward + backward on tower
  a's layer-1 activations, 48×55×55) against ``torch.nn.LocalResponseNorm``. ``--grouped`` also
  times conv2/4/5 as grouped vs per-tower convs. ``--fast-paths`` times only our step, against the
  same step with one fast path turned back: the channel window sums as shifted adds instead of a
  banded matrix product (used for bf16/fp16 inputs only), and the optimizer as four plain passes
  instead of torch's fused SGD kernel.
data: our input pipeline (prepared store → random 224 crops and flips in the workers → mean, PCA
  noise, ÷1.1 in the main process, as training runs it) against torchvision's (ImageFolder
  JPEGs + RandomResizedCrop + flip + ToTensor + Normalize), the same images and workers, best of
  ``--rounds`` alternating rounds, each epoch timed from its first batch; also the JPEG store
  (decode in the workers). Then the store-format table behind the JPEG quality: bytes an image,
  decode rate on one core, how far the mean image and PCA of decoded pixels move from the raw.
e2e: what a user gets: each pipeline feeding its net (the raw store, the JPEG store, and
  torchvision's), each pipeline alone, and the model alone, so it says which stage bounds the path.
eval: ten-view evaluation images/s (10 forward passes per image, probabilities averaged).
gpu: bf16 end to end with augmentation on the GPU instead of in the workers, torch.compile, the
  two-device split (two GPUs, or cuda:0 + cpu as a functional check) against one device, and the
  fused norms under bf16 (Triton).
prepare: ``replica prepare`` on ImageNet-like JPEGs (500×375, quality 92, ~100 KB: an average
  ILSVRC-2012 training image) in the official archive layout and as class folders, 1 and 2
  workers; images/s and the hours for ILSVRC-2012's 1,281,167 training images.

Rows that train print the FLOP rate they reached (forward 0.724 GMAC per 224² image, training 3×
that, 2 FLOP per MAC) beside the device's matmul rate measured in the same precision. Without
``--data`` the data rows make a synthetic set (``replica synth``) and stores in a temp folder.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms as T  # noqa: E402

import replica.layers as layers  # noqa: E402
from replica import augment  # noqa: E402
from replica.data.loaders import PREFETCH, Feed, TrainBatches, decode_if_encoded, loader, slot_bytes  # noqa: E402
from replica.data.ring import BatchRing, CopyStream, ring_size  # noqa: E402
from replica.evaluate import evaluate  # noqa: E402
from replica.layers import local_response_norm  # noqa: E402
from replica.model import AlexNet  # noqa: E402
from replica.optim import PaperSGD, param_groups  # noqa: E402
from replica.runtime import cpu_description, set_cuda_numerics, tf32_enabled, tune_cpu_allocator  # noqa: E402
from replica.data.store import PreparedStore  # noqa: E402
from replica.data.writer import prepare  # noqa: E402
from replica.data.synth import synth  # noqa: E402
from replica.runtime import to_device  # noqa: E402

MAC_FORWARD = 724_406_816  # docs/spec.md §7, per 224×224 image
FLOP_TRAIN = 3 * 2 * MAC_FORWARD
FLOP_FORWARD = 2 * MAC_FORWARD
ILSVRC_TRAIN = 1_281_167


# ----------------------------------------------------------------------------------------------
# Timing: one set of helpers for every subcommand

def sync(device):
    """Wait for every GPU, not only ``device``'s: a two-device row queues tower b's kernels on
    cuda:1, and waiting for cuda:0 alone would stop the clock before they ran. Where the CPU
    alone computes there is nothing to wait for."""
    if device.type == "cuda" or torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def race(fns: dict, steps: int, warmup: int, device, host: dict | None = None) -> dict:
    """Median seconds per call of each fn, calls interleaved round-robin. ``host``: filled with
    each fn's median host time, the seconds until the call returns to Python, before the wait
    for the device (on a GPU: what the CPU spends queueing the work; on the CPU: all of it)."""
    times = {k: [] for k in fns}
    queued = {k: [] for k in fns}
    for i in range(warmup + steps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
                queued[k].append(t1 - t0)
    if host is not None:
        host.update({k: statistics.median(v) for k, v in queued.items()})
    return {k: statistics.median(v) for k, v in times.items()}


def throughput(fns: dict, steps: int, rounds: int, device, host: dict | None = None) -> dict:
    """Seconds per call when each fn runs ``steps`` times back to back with one wait for the
    device at the end, as a training loop runs (``race`` waits after every call: latency, not
    throughput); each fn's median over ``rounds`` rounds, the fns taking turns round by round.
    ``host``: each fn's host seconds per call (the calls' own time, before the wait)."""
    per = {k: [] for k in fns}
    queued = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            t1 = time.perf_counter()
            sync(device)
            per[k].append((time.perf_counter() - t0) / steps)
            queued[k].append((t1 - t0) / steps)
    if host is not None:
        host.update({k: statistics.median(v) for k, v in queued.items()})
    return {k: statistics.median(v) for k, v in per.items()}


def stream_rate(batches, step, steps: int, warmup: int, device, n: int) -> float:
    """Images/s of (batch → step) back to back, one wait for the device at the end: what a
    training loop gets (``timed_steps`` waits at each step: latency)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return n * steps / (time.perf_counter() - t0)


def timed_steps(batches, step, steps: int, warmup: int, device) -> float:
    """Median seconds per (batch → step), fetching each batch inside the timed span."""
    times, it = [], iter(batches)
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        x, y = next(it)
        step(x, y)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def loader_rate(batches, steps: int, warmup: int, device, n: int) -> float:
    """Images/s of a batch iterator alone (median seconds per batch after warm-up)."""
    it, times = iter(batches), []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        next(it)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def epoch_rate(it, epochs: int) -> float:
    """Steady-state images/s over ``epochs`` passes: each pass timed from its first batch on,
    so that worker start-up, paid once per epoch by both pipelines alike, is left out."""
    n, seconds = 0, 0.0
    for _ in range(epochs):
        t0 = None
        for batch in it():
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += len(batch[0])
        seconds += time.perf_counter() - t0
    return n / seconds


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of an n×n matmul in ``dtype``, median of 5 after warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = race({"mm": lambda: torch.mm(a, b)}, 5, 2, device)["mm"]
    return 2 * n ** 3 / t


# ----------------------------------------------------------------------------------------------
# Train steps

def make_optimizer(model):
    """What each model trains with: PaperSGD for ours (as ``replica train``), torch's SGD for torchvision's."""
    if isinstance(getattr(model, "_orig_mod", model), AlexNet):  # also under torch.compile
        return PaperSGD(param_groups(model, 1e-4, 5e-4, 2e-4))
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)


def stepper(model, amp=None):
    """step(x, y): forward (under ``amp`` if given), loss, backward, update."""
    opt = make_optimizer(model)

    def step(x, y):
        with amp or contextlib.nullcontext():
            out = model(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    return step


def first_call(fn, device) -> float:
    """Seconds of ``fn()``'s first call, the device waited for: what a compile costs once."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def on(step, x, y):
    """A no-argument call of ``step`` on a fixed batch (for :func:`race`)."""
    return lambda: step(x, y)


def fused(model, fn):
    """``fn`` with ``model``'s norms as compiled fused loops (``fused_norms``), off again after."""
    def call(*args):
        model.fused_norms = True
        try:
            return fn(*args)
        finally:
            model.fused_norms = False
    return call


class Bench:
    """What the subcommands share: the device, the batch, the FLOP table and the ratios."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(getattr(args, "device", "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("bench: --device cuda given, but no CUDA device is visible")
        self.cuda = self.device.type == "cuda"
        self.n = args.batch
        workers = getattr(args, "workers", None)
        self.workers = workers if workers is not None else (8 if self.cuda else 2)
        self.tuned = False if getattr(args, "no_malloc_tuning", False) else tune_cpu_allocator()
        torch.manual_seed(0)
        if self.cuda:  # what `replica train` sets: cudnn.benchmark on, TF32 per --tf32 (off: true fp32)
            set_cuda_numerics(tf32=getattr(args, "tf32", False), benchmark=True)
        self.name = (torch.cuda.get_device_name(self.device) if self.cuda else
                     f"{cpu_description()}; {torch.get_num_threads()} threads")
        self.peak, self.rows, self.ratios = {}, [], {}
        self.stores = None
        self.tmp = tempfile.TemporaryDirectory()
        self.bf16 = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        self.default_norms = "fused norms"  # what `replica train` runs in float32 here (runtime.fused_norms_for)

    def alone_note(self, in_workers: bool = True) -> str:
        """The note of a "data alone" row. A pipeline whose work is done in the loader workers
        has ``workers`` × 2 batches prefetched: timing no more batches than that times a queue
        (on the H200, 222,661 img/s for a 16-batch set), so such a row is then marked."""
        a = self.args
        if in_workers and a.steps + a.warmup <= 2 * self.workers:
            return f"(no model; UPPER BOUND: {a.steps + a.warmup} batches ≤ the {2 * self.workers} prefetched)"
        return "(no model)"

    def header(self, what: str):
        a = self.args
        print(f"bench {what}: device {self.device} ({self.name}), batch {self.n}, median of {a.steps} steps after "
              f"{a.warmup} warm-up, {self.workers} loader workers; torch {torch.__version__}; "
              f"malloc tuning {'on' if self.tuned else 'off'}")

    def measure_peaks(self):
        big = 8192 if self.cuda else 2048
        self.peak["fp32"] = matmul_rate(self.device, torch.float32, big)
        if not getattr(self.args, "no_bf16", False):  # emulated bf16 (no native support) takes minutes here
            with contextlib.suppress(RuntimeError):
                self.peak["bf16"] = matmul_rate(self.device, torch.bfloat16, big)
        print("matmul: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in self.peak.items())
              + ((" (TF32 on)" if tf32_enabled() else " (TF32 off: true fp32)") if self.cuda else ""))

    def add(self, name: str, img_s: float, flop_per_img: float, precision: str = "fp32", note: str = ""):
        rate = img_s * flop_per_img
        peak = self.peak.get(precision)
        self.rows.append((name, img_s, rate, rate / peak if peak else float("nan"), precision, note))
        print(f"  {name:<56} {img_s:9.1f} img/s  {rate / 1e9:9.1f} GFLOP/s  "
              f"{100 * rate / peak if peak else float('nan'):5.1f}% of {precision} matmul  {note}", flush=True)

    def summary(self):
        print("\n" + "=" * 100)
        print(f"summary ({self.device}, {self.name}, batch {self.n})")
        print(f"{'row':<56} {'img/s':>9} {'GFLOP/s':>9} {'of mm':>6}")
        for name, img_s, rate, frac, prec, note in self.rows:
            print(f"{name:<56} {img_s:9.1f} {rate / 1e9:9.1f} {100 * frac:5.1f}%  {note}".rstrip())
        for k, v in self.ratios.items():
            print(f"RATIO {k}: {v:.2f}")

    def batch(self):
        x = (torch.randn(self.n, 3, 224, 224, device=self.device) * 50).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (self.n,), device=self.device)
        return x, y

    def data(self):
        """(raw store, JPEG store, training image folder), made once."""
        if self.stores is None:
            a, root = self.args, Path(self.tmp.name)
            data = Path(a.data) if a.data else root / "synth"
            need = self.n * (getattr(a, "steps", -1) + getattr(a, "warmup", 0) + 1)  # `data` times whole epochs
            if not a.data:
                synth(data, 10, -(-max(a.images, need) // 10), 1, seed=0, progress=False)
            w = min(os.cpu_count() or 1, 8)
            prepare(data, root / "store", workers=w, progress=False, fmt="raw")
            prepare(data, root / "jstore", workers=w, progress=False, fmt="jpeg")
            os.sync()  # let the freshly written stores reach the disk before anything is timed
            self.stores = PreparedStore(root / "store"), PreparedStore(root / "jstore"), data / "train"
            if len(self.stores[0]) < need:
                sys.exit(f"bench: {len(self.stores[0])} training images; the end-to-end rows need {need} (--images)")
            print(f"\ndata: {len(self.stores[0])} training images from {data}")
        return self.stores

    def ours_batches(self, st, decode="workers", crop_on="workers", background=None):
        """Our pipeline as ``replica train`` runs it, batches on the device. ``crop_on="device"``:
        the workers hand over whole uint8 images, cut by one gather on the device. ``background``:
        loader workers at lower priority (default: on the CPU, as training runs them)."""
        background = not self.cuda if background is None else background
        device, n = self.device, self.n
        mean, pca = st.mean(), st.pca()
        ds = TrainBatches(st, n, mean, pca, seed=0, decode=decode, crop_on=crop_on)
        mean_crop = ds.mean_crop.to(device)
        # as a run feeds itself (replica.train.open_feed): a ring of shared slots, a copy stream on CUDA
        ring = BatchRing(ring_size(self.workers, PREFETCH), slot_bytes(ds)) if self.workers and decode != "device" \
            else None
        if ring is not None and self.cuda and not ring.register():
            print(f"  (the batch ring is not page-locked: {ring.why}; each copy stages through pageable memory)",
                  flush=True)
        feed = Feed(ds, self.workers, device, ring=ring, copy=CopyStream(device) if self.cuda else None,
                    background=background)
        try:
            for crops, shift, labels, _, _ in feed:
                crops, shift, labels, _ = decode_if_encoded(crops, shift, labels, device)  # nvJPEG, or the gather
                xb = augment.finish(to_device(crops, device), mean_crop, to_device(shift, device), "as-run")
                yield xb, to_device(labels, device)
        finally:
            feed.close()
            if ring is not None and self.cuda:
                ring.unregister()

    def tv_batches(self, folder):
        """torchvision's standard ImageNet training pipeline on the same JPEGs."""
        ds = torchvision.datasets.ImageFolder(str(folder), tv_transform())
        for xb, yb in torch.utils.data.DataLoader(ds, self.n, shuffle=True, num_workers=self.workers, drop_last=True,
                                                  pin_memory=self.cuda, persistent_workers=False):
            yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)


def tv_transform():
    return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


# ----------------------------------------------------------------------------------------------
# model

def cmd_model(b: Bench):
    a, device, n = b.args, b.device, b.n
    if a.fast_paths:
        return fast_paths(b)
    x, y = b.batch()
    xn = x.contiguous()
    ours = AlexNet(devices=str(device), grouped=False)  # the towers' form; the grouped form has rows of its own
    grouped = AlexNet(devices=str(device), grouped=True)
    models = {
        "replica as-run, eager norms": (ours, x),
        "torchvision alexnet": (torchvision.models.alexnet().to(device), xn),
        "replica as-run, NCHW layout": (AlexNet(devices=str(device), channels_last=False), xn),
        "replica without norms (run 148)": (AlexNet(devices=str(device), norm=False), x),
        "torchvision alexnet, channels_last": (torchvision.models.alexnet().to(device, memory_format=torch.channels_last), x),
    }
    fns = {k: on(stepper(m), xb, y) for k, (m, xb) in models.items()}
    fns["replica as-run, fused norms"] = fused(ours, on(stepper(ours), x, y))
    fns["replica as-run, grouped form, eager norms"] = on(stepper(grouped), x, y)
    fns["replica as-run, grouped form, fused norms"] = fused(grouped, on(stepper(grouped), x, y))
    print("\n[model] train step, random input")
    t = race(fns, a.steps, a.warmup, device)
    for k, v in t.items():
        b.add(f"model step: {k}", n / v, FLOP_TRAIN)
    tv = t["torchvision alexnet"]
    for norms in ("eager norms", "fused norms"):  # grouped=auto decides by these (replica.model.AlexNet.place)
        b.ratios[f"grouped form / towers, {norms} (towers s / grouped s)"] = \
            t[f"replica as-run, {norms}"] / t[f"replica as-run, grouped form, {norms}"]
    b.ratios[f"model step, {b.default_norms} (replica train's default here; torchvision s / replica s, "
             f"≥ 1.0 = replica at least as fast)"] = tv / t[f"replica as-run, {b.default_norms}"]
    other = "eager norms" if not b.cuda else "fused norms"
    b.ratios[f"model step, {other} (torchvision s / replica s)"] = tv / t[f"replica as-run, {other}"]
    if not a.no_bf16:
        tvm = models["torchvision alexnet"][0]
        t = race({"ours": on(stepper(ours, b.bf16()), x, y), "tv": on(stepper(tvm, b.bf16()), xn, y)},
                 a.steps, a.warmup, device)
        b.add("model step, bf16 autocast: replica, eager norms", n / t["ours"], FLOP_TRAIN, "bf16")
        b.add("model step, bf16 autocast: torchvision", n / t["tv"], FLOP_TRAIN, "bf16")
        b.ratios["model step bf16 (torchvision s / replica s)"] = t["tv"] / t["ours"]
    del models, fns, ours, grouped

    act = (torch.randn(n, 48, 55, 55, device=device) * 40).requires_grad_()
    g = torch.randn_like(act)
    act_cl = act.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g_cl = g.contiguous(memory_format=torch.channels_last)  # as the model's pooling hands it back
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    lrn = {
        "replica LRN, eager": lambda: local_response_norm(act_cl, 5, 1e-4, 0.75, 2.0).backward(g_cl),
        "replica LRN, fused": lambda: local_response_norm(act_cl, 5, 1e-4, 0.75, 2.0, fused=True).backward(g_cl),
        "replica LRN, NCHW": lambda: local_response_norm(act, 5, 1e-4, 0.75, 2.0).backward(g),
        "torch LocalResponseNorm": lambda: torch_lrn(act).backward(g),
    }
    t = race(lrn, a.steps, a.warmup, device)
    print(f"\n  {'LRN fwd+bwd, ' + str(n) + '×48×55×55':<38} {'s':>8}")
    for k, v in t.items():
        print(f"  {k:<38} {v:8.3f}")
    b.ratios["LRN, eager (torch LocalResponseNorm s / replica s)"] = t["torch LocalResponseNorm"] / t["replica LRN, eager"]
    b.ratios["LRN, fused (torch LocalResponseNorm s / replica s)"] = t["torch LocalResponseNorm"] / t["replica LRN, fused"]

    if a.grouped:
        torch.manual_seed(1)
        convs = {}
        for name, cin, cout, hw, pad in (("conv2", 48, 128, 27, 2), ("conv4", 192, 192, 13, 1), ("conv5", 192, 128, 13, 1)):
            k = 5 if name == "conv2" else 3
            h = torch.randn(n, 2 * cin, hw, hw, device=device).contiguous(memory_format=torch.channels_last)
            w = (torch.randn(2 * cout, cin, k, k, device=device) * 0.01).requires_grad_()
            ha, hb = (t.contiguous(memory_format=torch.channels_last) for t in h.chunk(2, 1))
            convs[f"{name} grouped"] = lambda h=h, w=w, pad=pad: F.conv2d(h, w, padding=pad, groups=2).sum().backward()
            convs[f"{name} per tower"] = lambda ha=ha, hb=hb, w=w, pad=pad, c=cout: (
                F.conv2d(ha, w[:c], padding=pad).sum() + F.conv2d(hb, w[c:], padding=pad).sum()).backward()
        t = race(convs, a.steps, a.warmup, device)
        print(f"\n  {'conv fwd+bwd':<38} {'s':>8}")
        for k, v in t.items():
            print(f"  {k:<38} {v:8.3f}")


def fast_paths(b: Bench) -> None:
    """Our train step with all fast paths, and with each one turned back in turn."""
    a, device, n = b.args, b.device, b.n
    x, y = b.batch()
    model = AlexNet(devices=str(device))
    amp = b.bf16 if a.bf16 else contextlib.nullcontext

    def step_with(fused_opt=True, band=True):
        opt = PaperSGD(param_groups(model, 1e-4, 5e-4, 2e-4))
        opt._fused = fused_opt

        def step():
            saved = layers._band_sum
            if not band:
                layers._band_sum = layers._shift_sum  # what the window sum was before the product
            try:
                with amp():
                    out = model(x)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(out.float(), y).backward()
                opt.step()
            finally:
                layers._band_sum = saved
        return step

    rows = {"all fast paths, eager norms": step_with(),
            "window sums as shifted adds": step_with(band=False),
            "optimizer as 4 plain passes (not fused)": step_with(fused_opt=False)}
    if not a.bf16:
        del rows["window sums as shifted adds"]  # float32 uses shifted adds anyway
        rows["all, fused norms (CPU default, float32)"] = fused(model, step_with())
    t = race(rows, a.steps, a.warmup, device)
    base = t["all fast paths, eager norms"]
    print(f"\n{'train step, batch ' + str(n) + (', bf16 autocast' if a.bf16 else ', float32'):<42} {'s/step':>8} "
          f"{'img/s':>8} {'vs all':>7}")
    for k, v in t.items():
        print(f"{k:<42} {v:8.3f} {n / v:8.1f} {base / v:7.2f}")


# ----------------------------------------------------------------------------------------------
# data

def cmd_data(b: Bench):
    a = b.args
    # the main process only finishes batches; with the workers busy on every core, more threads
    # here spin against them (measured: the rate halved in some runs)
    torch.set_num_threads(1)
    st, jst, folder = b.data()
    print(f"bench data: {cpu_description()}; batch {a.batch}; {a.workers} loader workers; "
          f"{a.epochs} timed epochs after one warm-up; torch {torch.__version__}; "
          f"malloc tuning {'on' if b.tuned else 'off'}")

    def pipeline(store_):
        ds = TrainBatches(store_, a.batch, store_.mean(), store_.pca(), seed=0)

        def run():  # workers: read (+ decode) + crop (uint8); this process: − mean, + PCA shift, ÷1.1 (float32)
            for crops, shift, labels, _, _ in loader(ds, a.workers):
                yield ds.finish(crops, shift), labels
        return run

    images = torchvision.datasets.ImageFolder(str(folder), tv_transform())
    tv = lambda: torch.utils.data.DataLoader(images, a.batch, shuffle=True, num_workers=a.workers,  # noqa: E731
                                             drop_last=True)
    runs = {"ours": pipeline(st), "jpeg": pipeline(jst), "tv": tv}
    rates = {k: [] for k in runs}
    for _ in range(a.rounds):
        for name, it in runs.items():
            epoch_rate(it, 1)  # warm-up: workers start, files enter the page cache
            rates[name].append(epoch_rate(it, a.epochs))
    # best of the rounds for all: on a shared machine a round can lose half its speed to others
    best = {k: max(v) for k, v in rates.items()}
    w = a.workers
    print(f"\n{'pipeline':<58} {'img/s':>9} {'per worker':>11}")
    for k, label in (("ours", "ours: raw store → crops, flips, mean, PCA noise"),
                     ("jpeg", "ours: JPEG store → decode, crops, flips, mean, PCA noise"),
                     ("tv", "torchvision: ImageFolder JPEG → RandomResizedCrop … Normalize")):
        print(f"{label:<58} {best[k]:9.1f} {best[k] / w:11.1f}   (rounds: {', '.join(f'{r:.0f}' for r in rates[k])})")
    print(f"RATIO input pipeline (ours raw / torchvision, best of {a.rounds} rounds each, target ≥ 3): "
          f"{best['ours'] / best['tv']:.2f}")
    print(f"RATIO JPEG store / raw store: {best['jpeg'] / best['ours']:.2f}; JPEG store / torchvision: "
          f"{best['jpeg'] / best['tv']:.2f}")
    med = statistics.median(rates["ours"]) / statistics.median(rates["tv"])
    print(f"ratio of the medians (raw / torchvision): {med:.2f}")
    formats()


def formats(n: int = 256):
    """Store formats on ImageNet-like pictures (:func:`realistic_jpeg`, resized as prepare does):
    bytes an image, decode rate on one core, and how far the mean image and the PCA eigenvalues
    of the decoded pixels move from the raw pixels'."""
    from replica.data.imageio import read_prepared
    from replica.data.jpeg import decode_jpeg, encode_jpeg
    from replica.data.store import PixelStats

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    imgs = [read_prepared(io.BytesIO(realistic_jpeg(rng)), 256) for _ in range(n)]
    raw = PixelStats(256)
    for im in imgs:
        raw.add_image(im)
    m0, p0 = raw.result()
    t0 = time.perf_counter()
    for im in imgs:
        np.array(im)
    raw_rate = n / (time.perf_counter() - t0)
    print(f"\n{n} ImageNet-like images, 256×256 (one core of {cpu_description()})")
    out = np.empty((3, 224, 224), np.uint8)

    def crop(img):  # what a worker does after reading: a 224 crop at (16, 16), mirrored
        out[:] = img[:, 16:240, 16:240][:, :, ::-1]

    t0 = time.perf_counter()
    for im in imgs:
        crop(im)
    raw_crop = n / (time.perf_counter() - t0)
    print(f"{'store format':<22} {'bytes/image':>12} {'decode img/s':>13} {'+crop img/s':>12} {'mean |Δ| vs raw':>16}"
          f"  eigenvalues Δ vs raw")
    print(f"{'raw uint8 rows':<22} {imgs[0].nbytes:12,} {raw_rate:13,.0f} {raw_crop:12,.0f} {0:16.3f}  —")
    for q in (75, 85, 90, 95):
        enc = [encode_jpeg(torch.from_numpy(np.ascontiguousarray(im)), quality=q) for im in imgs]
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            dec = [decode_jpeg(e) for e in enc]
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for e in enc:
            crop(decode_jpeg(e).numpy())
        with_crop = n / (time.perf_counter() - t0)
        stats = PixelStats(256)
        for d in dec:
            stats.add_image(d.numpy())
        m, p = stats.result()
        eig = ", ".join(f"{(x - y) / y:+.1%}" for x, y in zip(p["eigenvalues"], p0["eigenvalues"]))
        print(f"{f'JPEG quality {q}':<22} {statistics.mean(len(e) for e in enc):12,.0f} "
              f"{n / statistics.median(times):13,.0f} {with_crop:12,.0f} {np.abs(m - m0).mean():16.3f}  {eig}")


# ----------------------------------------------------------------------------------------------
# e2e, eval, gpu

def cmd_e2e(b: Bench):
    a, device, n = b.args, b.device, b.n
    st, jst, folder = b.data()
    x, y = b.batch()
    print("\n[e2e] end to end: data pipeline feeding the train step")
    ours, tv = AlexNet(devices=str(device)), torchvision.models.alexnet().to(device)
    s_ours, s_tv = stepper(ours), stepper(tv)
    s_default = s_ours if b.cuda else fused(ours, s_ours)  # what replica train runs on this device
    e_ours = n / timed_steps(b.ours_batches(st), s_default, a.steps, a.warmup, device)
    e_tv = n / timed_steps(b.tv_batches(folder), s_tv, a.steps, a.warmup, device)
    b.add(f"end to end: replica (store → workers), {b.default_norms}", e_ours, FLOP_TRAIN,
          note="(each step waited for: latency)")
    jdec = "device" if b.cuda else "workers"
    e_jpeg = n / timed_steps(b.ours_batches(jst, decode=jdec), s_default, a.steps, a.warmup, device)
    b.add(f"end to end: replica (JPEG store, decode in {'nvJPEG' if b.cuda else 'workers'})", e_jpeg, FLOP_TRAIN)
    b.add("end to end: torchvision (ImageFolder JPEG pipeline)", e_tv, FLOP_TRAIN)
    b.ratios["end to end (replica img/s / torchvision img/s)"] = e_ours / e_tv
    # back to back, as training runs (the rows above wait for each step: latency); on a GPU ≥ 30 steps
    tp = max(a.steps, 30) if b.cuda else a.steps
    need = n * (tp + a.warmup)
    if len(st) >= need:
        for name, batches in (("raw store", b.ours_batches(st)), ("JPEG store", b.ours_batches(jst))):
            b.add(f"end to end, back to back: replica ({name}), {b.default_norms}",
                  stream_rate(batches, s_default, tp, a.warmup, device, n), FLOP_TRAIN, note=f"({tp} steps, one wait)")
    else:
        print(f"  (back-to-back rows left out: {tp + a.warmup} batches need {need} images, the store has {len(st)})")
    if not b.cuda:
        e_level = n / timed_steps(b.ours_batches(jst, background=False), s_default, a.steps, a.warmup, device)
        b.add("end to end: replica (JPEG store), workers at normal priority", e_level, FLOP_TRAIN)
        e_eager = n / timed_steps(b.ours_batches(st), s_ours, a.steps, a.warmup, device)
        b.add("end to end: replica, eager norms", e_eager, FLOP_TRAIN)
        b.ratios["end to end, eager norms (replica img/s / torchvision img/s)"] = e_eager / e_tv
    d_ours = loader_rate(b.ours_batches(st), a.steps, a.warmup, device, n)
    d_tv = loader_rate(b.tv_batches(folder), a.steps, a.warmup, device, n)
    t = race({"ours": on(s_default, x, y), "tv": on(s_tv, x.contiguous(), y)}, a.steps, 1, device)
    b.add("data alone: replica pipeline", d_ours, 0, note="(no model)")
    b.add("data alone: torchvision pipeline", d_tv, 0, note="(no model)")
    b.ratios["end to end from the raw store / model alone"] = e_ours / (n / t["ours"])
    b.ratios["end to end from the JPEG store / model alone (target ≥ 0.95)"] = e_jpeg / (n / t["ours"])
    if not b.cuda:
        b.ratios["end to end from the JPEG store, workers at normal priority / model alone"] = e_level / (n / t["ours"])
    d_jpeg = loader_rate(b.ours_batches(jst, decode=jdec), a.steps, a.warmup, device, n)
    b.add("data alone: replica pipeline, JPEG store", d_jpeg, 0, note="(no model)")
    for who, d, m in (("replica", d_ours, n / t["ours"]), ("torchvision", d_tv, n / t["tv"])):
        print(f"  bottleneck, {who}: {'the model' if m < d else 'the input pipeline'} "
              f"(model alone {m:.0f} img/s, data alone {d:.0f} img/s)")
    if b.peak.get("bf16") and not a.no_bf16:
        e_bf = n / timed_steps(b.ours_batches(st), stepper(ours, b.bf16()), a.steps, a.warmup, device)
        b.add("end to end: replica, bf16 autocast", e_bf, FLOP_TRAIN, "bf16")
        b.ratios["end to end, replica bf16 vs torchvision fp32"] = e_bf / e_tv


def cmd_eval(b: Bench):
    st = b.data()[0]
    print("\n[eval] the ten views of a batch: stacked slices (the old path) against one gather (replica eval's)")
    u8 = torch.from_numpy(st.batch(np.arange(min(b.n, len(st))))[0]).to(b.device)
    mean_crop = augment.centre_crop_of(torch.as_tensor(st.mean()), 224).to(b.device)
    tv = race({"stack": lambda: augment.ten_views(u8, mean_crop),
               "gather": lambda: augment.ten_views_gathered(u8, mean_crop)}, b.args.steps, b.args.warmup, b.device)
    b.add("ten views made by stacking slices", len(u8) / tv["stack"], 0, note="(no model)")
    b.add("ten views made by one gather", len(u8) / tv["gather"], 0, note=f"(no model; {tv['stack'] / tv['gather']:.2f}× "
                                                                           "the stacked slices' rate)")
    print("\n[eval] ten-view evaluation")
    model = AlexNet(devices=str(b.device))
    k = min(b.args.eval_images, len(st))
    sub = _Subset(st, k)
    evaluate(model, sub, st.mean(), views=10, batch=min(b.n, 64), max_batches=1)  # warm-up
    sync(b.device)
    t0 = time.perf_counter()
    evaluate(model, sub, st.mean(), views=10, batch=min(b.n, 64))
    sync(b.device)
    b.add("ten-view eval (10 forward passes per image)", k / (time.perf_counter() - t0), 10 * FLOP_FORWARD)


def cmd_gpu(b: Bench):
    a, device, n = b.args, b.device, b.n
    st = b.data()[0]
    x, y = b.batch()
    print("\n[gpu] options")
    ours = AlexNet(devices=str(device))
    s_bf = stepper(ours, b.bf16())
    gpu = n / timed_steps(b.ours_batches(st, crop_on="device"), s_bf, a.steps, a.warmup, device)
    cpu = n / timed_steps(b.ours_batches(st), s_bf, a.steps, a.warmup, device)
    b.add("end to end bf16, crops/flips in CPU workers", cpu, FLOP_TRAIN, "bf16")
    b.add("end to end bf16, crops/flips on the GPU", gpu, FLOP_TRAIN, "bf16")
    d_gpu = loader_rate(b.ours_batches(st, crop_on="device"), a.steps, a.warmup, device, n)
    d_cpu = loader_rate(b.ours_batches(st), a.steps, a.warmup, device, n)
    b.add("data alone, crops in workers", d_cpu, 0, note="(no model)")
    b.add("data alone, crops on the GPU", d_gpu, 0, note="(no model)")
    try:
        compiled = torch.compile(ours)
        s_c = stepper(compiled, b.bf16())
        print(f"  torch.compile: first step (compilation) {first_call(on(s_c, x, y), device):.1f} s")
        tc = race({"c": on(s_c, x, y), "e": on(s_bf, x, y)}, a.steps, a.warmup, device)
        b.add("model step bf16, torch.compile", n / tc["c"], FLOP_TRAIN, "bf16")
        b.add("model step bf16, eager", n / tc["e"], FLOP_TRAIN, "bf16")
    except Exception as e:  # a compiler toolchain problem is a finding, not a crash
        print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    pair = ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cpu")
    small = 16 if pair[1] == "cpu" else n
    two = AlexNet(devices=pair)
    one = AlexNet(devices="cuda:0")
    two.load_state_dict(one.state_dict())
    xs, ys = x[:small], y[:small]
    t = race({"two": on(stepper(two), xs, ys), "one": on(stepper(one), xs, ys)}, a.steps, a.warmup, device)
    note = "(functional check: tower b on the CPU)" if pair[1] == "cpu" else ""
    b.add(f"two devices {pair[0]} + {pair[1]}, batch {small}", small / t["two"], FLOP_TRAIN, note=note)
    b.add(f"one device cuda:0, batch {small}", small / t["one"], FLOP_TRAIN)
    # last: the norms' first compile (Triton) is the slowest part
    s_f = fused(ours, on(s_bf, x, y))
    s_f()  # compiles the norms (on failure: one warning, then the eager norms)
    tf = race({"f": s_f, "e": on(s_bf, x, y)}, a.steps, a.warmup, device)
    b.add("model step bf16, fused_norms=true", n / tf["f"], FLOP_TRAIN, "bf16")
    b.add("model step bf16, eager norms", n / tf["e"], FLOP_TRAIN, "bf16")


class _Subset:
    """The first k images of a store, for evaluate()."""

    def __init__(self, st, k):
        self.st, self.k, self.size = st, k, st.size

    def __len__(self):
        return self.k

    def batch(self, positions):
        return self.st.batch(positions)


# ----------------------------------------------------------------------------------------------
# prepare

def realistic_jpeg(rng, w=500, h=375, quality=92) -> bytes:
    """An ImageNet-like JPEG: smooth content plus fine texture, ~100 KB at 500×375, quality 92."""
    from PIL import Image, ImageFilter

    base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    # texture as photos have it: mostly in brightness (one value for R, G, B), a little in colour
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-18, 19, (h, w, 1)) + rng.integers(-4, 5, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _add(tf, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def imagenet_like(root: Path, images: int, classes: int, seed: int = 0):
    """The same JPEGs as ILSVRC2012_img_train.tar (one tar per class) and as class folders."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{10000000 + i:08d}" for i in range(classes)]
    per = images // classes
    arch, folders = root / "archives", root / "folders"
    arch.mkdir(parents=True)
    sizes = []
    with tarfile.open(arch / "ILSVRC2012_img_train.tar", "w") as outer:
        for w in wnids:
            buf = io.BytesIO()
            (folders / "train" / w).mkdir(parents=True)
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(per):
                    data = realistic_jpeg(rng)
                    sizes.append(len(data))
                    _add(inner, f"{w}_{k}.JPEG", data)
                    (folders / "train" / w / f"{w}_{k}.JPEG").write_bytes(data)
            _add(outer, f"{w}.tar", buf.getvalue())
    return per * classes, float(np.mean(sizes))


def small_archive(root: Path, images: int, classes: int = 100, seed: int = 0) -> Path:
    """ILSVRC2012_img_train.tar of ``images`` small JPEGs (48×40, ~1 KB): many members, few bytes,
    so the time and the writes that grow with the count (headers, state, index) show."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    per = -(-images // classes)
    done = 0
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c in range(classes):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(min(per, images - done)):
                    arr = np.clip(rng.normal(40 + 2 * c, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
                    out = io.BytesIO()
                    Image.fromarray(arr).save(out, "JPEG", quality=85)
                    _add(inner, f"n{10000000 + c:08d}_{k}.JPEG", out.getvalue())
                    done += 1
            _add(outer, f"n{10000000 + c:08d}.tar", buf.getvalue())
    return root


_MEASURE = r"""
import json, os, resource, sys, time
from replica.data.writer import prepare
src, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
io0 = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
t = time.perf_counter()
m = prepare(src, out, workers=workers, progress=False, fmt="jpeg")
sec = time.perf_counter() - t
io1 = dict(l.split(": ") for l in open("/proc/self/io").read().splitlines())
store = sum(f.stat().st_size for f in __import__("pathlib").Path(out).rglob("*") if f.is_file())
print(json.dumps(dict(seconds=sec, images=sum(v["used"] for v in m["splits"].values()), store=store,
    wchar=int(io1["wchar"]) - int(io0["wchar"]), write_bytes=int(io1["write_bytes"]) - int(io0["write_bytes"]),
    rss_main=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    rss_worker=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)))
"""


def cmd_prepare_scale(b: Bench):
    """Per-image time, bytes written per store byte and peak RSS of a JPEG prepare at each
    --scale size, each in a fresh process (its /proc/self/io holds every write of a JPEG prepare:
    the workers encode, this process appends, keeps the state and writes the final files)."""
    import json
    import subprocess

    a = b.args
    workers = a.workers[-1]
    print(f"bench prepare --scale: small archive images (48×40 JPEG), JPEG store, {workers} workers; "
          f"{cpu_description()}")
    print(f"{'images':>9} {'seconds':>8} {'ms/image':>9} {'img/s':>7} {'store MB':>9} {'written/store':>14} "
          f"{'wchar/store':>12} {'peak RSS main':>14} {'worker':>8}")
    rows = []
    for n in a.scale:
        d = Path(b.tmp.name) / f"scale-{n}"
        small_archive(d / "src", n)
        os.sync()
        r = subprocess.run([sys.executable, "-c", _MEASURE, str(d / "src"), str(d / "st"), str(workers)],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
        if r.returncode:
            sys.exit(r.stderr[-2000:])
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(m)
        print(f"{m['images']:>9,} {m['seconds']:>8.1f} {1000 * m['seconds'] / m['images']:>9.3f} "
              f"{m['images'] / m['seconds']:>7.0f} {m['store'] / 1e6:>9.1f} {m['write_bytes'] / m['store']:>14.3f} "
              f"{m['wchar'] / m['store']:>12.3f} {m['rss_main'] / 2**20:>11.0f} MB {m['rss_worker'] / 2**20:>5.0f} MB")
        shutil.rmtree(d, ignore_errors=True)
    if len(rows) > 1:
        per = [r["seconds"] / r["images"] for r in rows]
        print(f"per-image time, largest / smallest size: {per[-1] / per[0]:.2f} (flat: 1.00)")


def cmd_prepare(b: Bench):
    a = b.args
    if a.scale:
        return cmd_prepare_scale(b)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    d = Path(b.tmp.name)
    n, mean_bytes = imagenet_like(d, a.images, a.classes)
    print(f"bench prepare: {n:,} JPEGs, 500×375 quality 92, mean {mean_bytes / 1000:.0f} KB; {cpus} CPUs usable; "
          f"{cpu_description()}")
    print(f"{'source':<34} {'workers':>7} {'img/s':>8} {'per worker':>11} {'1.28 M images':>14}")
    for label, src in (("official archive (read in the tar)", d / "archives"), ("class folders", d / "folders")):
        for w in a.workers:
            t = time.perf_counter()
            m = prepare(src, d / f"st-{label[:4]}-{w}", workers=w, progress=False)
            r = sum(v["used"] for v in m["splits"].values()) / (time.perf_counter() - t)
            print(f"{label:<34} {w:>7} {r:>8.0f} {r / w:>11.0f} {ILSVRC_TRAIN / r / 3600:>12.1f} h")


# ----------------------------------------------------------------------------------------------

def cmd_core(b: Bench):
    """What the GPU check needs, every compile once: the model step in float32 and bf16 beside
    torchvision's, with host time per step; the fused norms against the eager ones in bf16 (one
    compile); end to end from the raw and the JPEG store in bf16 beside torchvision's pipeline;
    ten-view evaluation."""
    a, device, n = b.args, b.device, b.n
    x, y = b.batch()
    xn = x.contiguous()
    ours, tv = AlexNet(devices=str(device)), torchvision.models.alexnet().to(device)
    form = "grouped form" if ours.grouped else "towers"  # as replica train runs it here (grouped=auto)
    print(f"\n[core] model train step, random input; host = the CPU's time to queue one step; replica's {form}")
    host = {}
    t = race({"ours": on(stepper(ours), x, y), "tv": on(stepper(tv), xn, y)}, a.steps, a.warmup, device, host)
    b.add(f"model step fp32: replica as-run, {form}, eager norms", n / t["ours"], FLOP_TRAIN,
          note=f"host {1e3 * host['ours']:.1f} of {1e3 * t['ours']:.1f} ms")
    b.add("model step fp32: torchvision alexnet", n / t["tv"], FLOP_TRAIN,
          note=f"host {1e3 * host['tv']:.1f} of {1e3 * t['tv']:.1f} ms")
    b.ratios["model step fp32 (torchvision s / replica s)"] = t["tv"] / t["ours"]
    s_bf, s_tv_bf = stepper(ours, b.bf16()), stepper(tv, b.bf16())
    fns = {"ours": on(s_bf, x, y), "tv": on(s_tv_bf, xn, y)}
    if not a.no_fused:  # the norms' one compile (Triton), timed apart from the rows
        s_f = fused(ours, on(s_bf, x, y))
        print(f"  fused norms: first step (compiles them) {first_call(s_f, device):.1f} s; "
              f"{'compiled' if layers.fused_norms_available() else 'FAILED, eager: ' + str(layers._BROKEN['why'])}")
        fns["fused"] = s_f
    other = AlexNet(devices=str(device), grouped=not ours.grouped)  # the other form, beside it
    fns["other"] = on(stepper(other, b.bf16()), x, y)
    host = {}
    t = race(fns, a.steps, a.warmup, device, host)
    other_form = "towers" if ours.grouped else "grouped form"
    for k, name in (("ours", f"replica as-run, {form}, eager norms"), ("fused", f"replica as-run, {form}, fused norms"),
                    ("other", f"replica as-run, {other_form}, eager norms"), ("tv", "torchvision alexnet")):
        if k in t:
            b.add(f"model step bf16: {name}", n / t[k], FLOP_TRAIN, "bf16",
                  note=f"host {1e3 * host[k]:.1f} of {1e3 * t[k]:.1f} ms")
    b.ratios["model step bf16, eager norms (torchvision s / replica s, ≥ 1.0 = replica at least as fast)"] = \
        t["tv"] / t["ours"]
    if "fused" in t:
        b.ratios["model step bf16, fused norms (torchvision s / replica s)"] = t["tv"] / t["fused"]
        b.ratios["fused norms against eager, bf16 (eager s / fused s, > 1 = fused faster)"] = t["ours"] / t["fused"]
    b.ratios[f"{form} against {other_form}, bf16 eager norms ({other_form} s / {form} s)"] = t["other"] / t["ours"]
    del other
    model_alone = n / t["ours"]
    if a.profile:
        profile_step(on(s_bf, x, y), device)

    st, jst, folder = b.data()
    print("\n[core] end to end, bf16: data pipeline feeding the train step")
    e_raw = n / timed_steps(b.ours_batches(st), s_bf, a.steps, a.warmup, device)
    b.add("end to end bf16: replica, raw store", e_raw, FLOP_TRAIN, "bf16")
    jdec = "device" if b.cuda else "workers"
    e_jpeg = n / timed_steps(b.ours_batches(jst, decode=jdec), s_bf, a.steps, a.warmup, device)
    b.add(f"end to end bf16: replica, JPEG store ({'nvJPEG' if b.cuda else 'decoded in workers'})", e_jpeg,
          FLOP_TRAIN, "bf16")
    e_tv = n / timed_steps(b.tv_batches(folder), s_tv_bf, a.steps, a.warmup, device)
    b.add("end to end bf16: torchvision (ImageFolder JPEG pipeline)", e_tv, FLOP_TRAIN, "bf16")
    d_raw = loader_rate(b.ours_batches(st), a.steps, a.warmup, device, n)
    d_jpeg = loader_rate(b.ours_batches(jst, decode=jdec), a.steps, a.warmup, device, n)
    b.add("data alone: replica, raw store", d_raw, 0, note=b.alone_note())
    b.add("data alone: replica, JPEG store", d_jpeg, 0, note=b.alone_note(jdec == "workers"))
    b.ratios["end to end bf16 from the raw store / model alone"] = e_raw / model_alone
    b.ratios["end to end bf16 from the JPEG store / model alone (target ≥ 0.95)"] = e_jpeg / model_alone
    b.ratios["end to end bf16 (replica raw store img/s / torchvision img/s)"] = e_raw / e_tv

    print("\n[core] ten-view evaluation (10 forward passes per image)")
    k = min(a.eval_images, len(st))
    sub = _Subset(st, k)
    for bf16 in (False, True):
        kw = dict(views=10, batch=min(n, 128), bf16=bf16, workers=min(b.workers, 2))
        evaluate(ours, sub, st.mean(), max_batches=1, **kw)  # warm-up: workers, cuDNN's search
        sync(device)
        t0 = time.perf_counter()
        evaluate(ours, sub, st.mean(), **kw)
        sync(device)
        rate = 10 * k / (time.perf_counter() - t0)
        b.add(f"ten-view eval {'bf16' if bf16 else 'fp32'}, {k} images (views/s)", rate, FLOP_FORWARD,
              "bf16" if bf16 else "fp32")


def cmd_defaults(b: Bench):
    """What decides each CUDA default, every row beside torchvision's in the same race: the
    norms (eager or fused), the layout (channels_last or NCHW), torch.compile of the whole
    model, TF32 for float32, at batch ``--batch`` and half of it; then the JPEG store decoded
    on the device (nvJPEG) or in the workers, end to end. The whole-model compile comes last."""
    a, device, n = b.args, b.device, b.n
    from replica.runtime import set_tf32

    def model_race(title, fns, batch, precision):
        host = {}
        t = race(fns, a.steps, a.warmup, device, host)
        print(f"\n  {title}")
        for k, v in t.items():
            b.add(f"{k}, batch {batch}", batch / v, FLOP_TRAIN, precision,
                  note=f"host {1e3 * host[k]:.1f} of {1e3 * v:.1f} ms; vs torchvision {t['torchvision'] / v:.2f}")

    x, y = b.batch()
    ours = AlexNet(devices=str(device))
    nchw = AlexNet(devices=str(device), channels_last=False)
    nchw.load_state_dict(ours.state_dict())
    bare = AlexNet(devices=str(device), norm=False)
    tv = torchvision.models.alexnet().to(device)
    t0 = time.perf_counter()
    for dtype in (torch.bfloat16, torch.float32):  # the fused norms' compiles, out of the timed rows
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            fused(ours, on(stepper(ours), x[:8], y[:8]))()
    sync(device)
    print(f"\n[defaults] fused norms compiled (bf16, fp32) in {time.perf_counter() - t0:.1f} s: "
          f"{'ok' if layers.fused_norms_available() else layers._BROKEN['why']}")
    for batch in (n, n // 2):
        xb, xn, yb = x[:batch], x[:batch].contiguous(), y[:batch]
        bf = b.bf16()
        model_race(f"bf16 autocast, batch {batch}: norms and layout", {
            "bf16 eager norms, channels_last": on(stepper(ours, bf), xb, yb),
            "bf16 fused norms, channels_last": fused(ours, on(stepper(ours, bf), xb, yb)),
            "bf16 eager norms, NCHW": on(stepper(nchw, bf), xn, yb),
            "bf16 no norms (run 148), channels_last": on(stepper(bare, bf), xb, yb),
            "torchvision": on(stepper(tv, bf), xn, yb)}, batch, "bf16")
    xb, xn, yb = x, x.contiguous(), y
    for tf32 in (False, True):
        set_tf32(tf32)
        model_race(f"float32, TF32 {'on' if tf32 else 'off'}", {
            f"fp32 TF32 {'on' if tf32 else 'off'}, eager norms": on(stepper(ours), xb, yb),
            f"fp32 TF32 {'on' if tf32 else 'off'}, fused norms": fused(ours, on(stepper(ours), xb, yb)),
            "torchvision": on(stepper(tv), xn, yb)}, n, "fp32")
    set_tf32(False)

    st, jst, folder = b.data()
    print("\n[defaults] JPEG store end to end, bf16, fused norms: decode on the device or in the workers")
    s_f = fused(ours, stepper(ours, b.bf16()))
    for dec in ("device", "workers"):
        e = n / timed_steps(b.ours_batches(jst, decode=dec), s_f, a.steps, a.warmup, device)
        b.add(f"end to end bf16, fused norms, JPEG store, decode={dec}", e, FLOP_TRAIN, "bf16")
        d = loader_rate(b.ours_batches(jst, decode=dec), a.steps, a.warmup, device, n)
        b.add(f"data alone, JPEG store, decode={dec}", d, 0, note=b.alone_note(dec == "workers"))
    e = n / timed_steps(b.ours_batches(st), s_f, a.steps, a.warmup, device)
    b.add("end to end bf16, fused norms, raw store", e, FLOP_TRAIN, "bf16")

    if not a.no_compile:
        print("\n[defaults] torch.compile of the whole model (eager norms inside), bf16")
        try:
            compiled = torch.compile(ours)
            s_c = stepper(compiled, b.bf16())
            print(f"  first step (compilation) {first_call(on(s_c, x, y), device):.1f} s")
            model_race("compile=true against eager, bf16", {
                "bf16 torch.compile(model)": on(s_c, x, y),
                "bf16 fused norms, eager model": fused(ours, on(stepper(ours, b.bf16()), x, y)),
                "torchvision": on(stepper(tv, b.bf16()), x.contiguous(), y)}, n, "bf16")
        except Exception as e:  # noqa: BLE001  (a compiler problem is a finding, not a crash)
            print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if a.profile:
        profile_step(fused(ours, on(stepper(ours, b.bf16()), x, y)), device, title="fused norms")


def profile_step(step, device, steps: int = 3, top: int = 12, title: str = "eager norms") -> None:
    """Where a step's time goes: torch.profiler over ``steps`` steps, the top kernels by device
    time and the host's share. A profiler that cannot run here prints one line, not a crash."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        step()
        sync(device)
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            sync(device)
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)
    except Exception as e:  # noqa: BLE001  (CUPTI missing or refused: a finding, not a crash)
        print(f"  profiler failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return
    print(f"\n  profile of {steps} bf16 steps of replica ({title}), top {top} by {key}:")
    for line in table.splitlines():
        print("  " + line)


_AGREE = r"""
import statistics, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
from replica.dist import Ranks
r = Ranks(dist.get_rank(), dist.get_world_size(), None, distributed=True)
n = int(sys.argv[1])
for _ in range(50):
    r.agree(stop=False)
ts = []
for _ in range(n):
    t0 = time.perf_counter()
    r.agree(stop=False, save=False, error=False)
    ts.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    ts.sort()
    print(f"AGREE {1e6 * statistics.median(ts):.0f} {1e6 * ts[int(0.9 * len(ts))]:.0f}")
dist.destroy_process_group()
"""


def cmd_host(b: Bench):
    """The host's work per training step, where compute is small (the net at 1/16 width, batch
    4, CPU): the batch's fetch, the processes' decision (``Ranks.agree``: one gloo all-reduce,
    timed alone in a 2-process torchrun job) and the step itself, each the median of its calls."""
    import subprocess

    import replica.train as T
    from replica.config import load_config

    a = b.args
    root = Path(b.tmp.name)
    synth(root / "s", 4, 40, 2, seed=1, progress=False)
    prepare(root / "s", root / "st", workers=1, progress=False, fmt="raw")
    cfg = load_config(None, dict(data=str(root / "st"), batch_size=4, epochs=1, steps_per_epoch=a.steps, workers=0,
                                 devices="cpu", init="caffe", width=0.0625, fused_norms=False, checkpoint_minutes=60,
                                 val_batches=1, save_best=False))
    spent = {"next_batch": [], "train_step": []}
    real = {k: getattr(T, k) for k in spent}

    def timed(name):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return real[name](*args, **kw)
            finally:
                spent[name].append(time.perf_counter() - t0)
        return call

    T.train(cfg, root / "warm", progress=False)
    for k in spent:
        setattr(T, k, timed(k))
    try:
        t0 = time.perf_counter()
        T.train(cfg, root / "run", progress=False)
        wall = time.perf_counter() - t0
    finally:
        for k, f in real.items():
            setattr(T, k, f)
    (root / "agree.py").write_text(_AGREE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(root / "agree.py"), "2000"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    agree = next((ln.split()[1:] for ln in r.stdout.splitlines() if ln.startswith("AGREE")), None)
    print(f"\nbench host: {cpu_description()}; the net at 1/16 width, batch 4, {a.steps} steps, one process "
          f"({wall:.2f} s in all, start-up and one validation included)")
    for k, v in spent.items():
        print(f"  {k:<12} median {1e3 * statistics.median(v):7.2f} ms")
    print(f"  agree        median {agree[0]} µs, 90th percentile {agree[1]} µs (gloo all-reduce, 2 processes)"
          if agree else f"  agree: the torchrun job failed: {r.stderr[-500:]}")


def cmd_all(b: Bench):
    cmd_model(b)
    cmd_e2e(b)
    cmd_eval(b)
    if b.cuda:
        cmd_gpu(b)


COMMANDS = {"model": cmd_model, "data": cmd_data, "e2e": cmd_e2e, "eval": cmd_eval, "gpu": cmd_gpu, "core": cmd_core,
            "defaults": cmd_defaults, "host": cmd_host,
            "prepare": cmd_prepare, "all": cmd_all}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common.add_argument("--batch", type=int, default=128)
    common.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    common.add_argument("--warmup", type=int, default=2)
    common.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as it is")
    common.add_argument("--tf32", action="store_true", help="CUDA: float32 convs/matmuls in TF32 (default: true fp32)")
    common.add_argument("--no-bf16", action="store_true",
                        help="leave out the bf16 rows and the bf16 matmul reference (slow where bf16 is emulated)")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--images", type=int, default=1024, help="synthetic training images to make without --data")
    data.add_argument("--eval-images", type=int, default=128)
    data.add_argument("--workers", type=int, default=None, help="loader workers (default: 2 on CPU, 8 on CUDA)")
    data.add_argument("--data", help="an ImageFolder with train/ (default: a synthetic one)")
    for name, parents, text in (("model", [common], "train step vs torchvision's AlexNet; LRN vs torch's"),
                                ("e2e", [common, data], "each pipeline feeding its net"),
                                ("eval", [common, data], "ten-view evaluation rate"),
                                ("gpu", [common, data], "CUDA options: GPU augmentation, compile, two devices"),
                                ("all", [common, data], "model, e2e, eval (and gpu on CUDA), one summary"),
                                ("core", [common, data], "what tools/gpu_check.sh times: model step fp32/bf16 "
                                                         "with host time, fused vs eager norms (bf16), end to end "
                                                         "from both stores, ten-view eval; one compile"),
                                ("defaults", [common, data], "what decides each CUDA default: norms, layout, "
                                                             "compile, TF32, JPEG decode")):
        s = sub.add_parser(name, parents=parents, help=text)
        if name == "core":
            s.add_argument("--no-fused", action="store_true", help="leave out the fused norms (no Triton toolchain)")
        if name in ("core", "defaults"):
            s.add_argument("--profile", action="store_true", help="also print the top kernels of 3 bf16 steps")
        if name == "defaults":
            s.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the whole model")
        if name in ("model", "all"):
            s.add_argument("--grouped", action="store_true", help="also time conv2/4/5 as grouped vs per-tower convs")
        if name == "model":
            s.add_argument("--fast-paths", action="store_true",
                           help="only our step, with each fast path turned back in turn")
            s.add_argument("--bf16", action="store_true", help="with --fast-paths: under bf16 autocast")
    d = sub.add_parser("data", help="input pipelines vs torchvision's; store formats")
    d.add_argument("--data", help="an ImageFolder with train/ (default: a synthetic one)")
    d.add_argument("--images", type=int, default=1280, help="synthetic training images to make")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--batch", type=int, default=128)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--rounds", type=int, default=3, help="alternating measurements of each pipeline")
    h = sub.add_parser("host", help="the host's work per step at 1/16 width: batch fetch, agree, step")
    h.add_argument("--steps", type=int, default=40)
    h.set_defaults(batch=4)
    pr = sub.add_parser("prepare", help="replica prepare on ImageNet-like JPEGs; hours for ILSVRC-2012")
    pr.add_argument("--images", type=int, default=600)
    pr.add_argument("--classes", type=int, default=6)
    pr.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    pr.add_argument("--scale", type=int, nargs="+", default=None,
                    help="instead: per-image time, bytes written per store byte and peak RSS at these many small "
                         "archive images (e.g. 10000 100000)")
    pr.set_defaults(batch=0)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    args.fast_paths = getattr(args, "fast_paths", False)
    if args.command == "gpu" and args.device != "cuda":
        sys.exit("bench gpu: needs --device cuda (GPU augmentation, torch.compile, two devices, Triton norms)")
    b = Bench(args)
    try:
        if args.command in ("model", "e2e", "eval", "gpu", "all", "core", "defaults"):
            b.header(args.command)
            if not args.fast_paths:
                b.measure_peaks()
        COMMANDS[args.command](b)
        if b.rows or b.ratios:
            b.summary()
    finally:
        b.tmp.cleanup()


if __name__ == "__main__":
    main()
