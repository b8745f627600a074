#!/usr/bin/env python
"""One benchmark for CPU and GPU: model step, end to end, ten-view eval, and the GPU options.

    python tools/bench.py [--device cpu|cuda] [--batch 128] [--steps 5] [--images 1024]
                          [--workers 2] [--data DIR] [--only model,e2e,eval,options]

Everything runs in one process, after warm-up, with medians over repeated steps; each
reference is measured in the same run, so a ratio survives a noisy shared machine.

1. model: the train step (forward + backward + SGD update) of the as-run two-tower net on one
   device vs ``torchvision.models.alexnet``, steps interleaved. RATIO = torchvision s / ours s.
   Our net runs as ``replica train`` runs it by default: on the CPU with the fused norms (the
   three norms as compiled loops), with an extra row for the eager norms, here and in [2]; on
   CUDA with the eager norms, and [4] times the fused ones under bf16.
   Each model updates with its own optimizer: ours with PaperSGD (what ``replica train`` runs),
   torchvision's with ``torch.optim.SGD``.
2. e2e: what a user gets: our pipeline (prepared store → crops and flips in loader workers →
   mean, PCA noise, ÷1.1 on the device) feeding our net, vs torchvision's ImageFolder +
   RandomResizedCrop + flip + ToTensor + Normalize feeding its AlexNet. Each pipeline is also
   timed alone, so the script can say which stage bounds the path.
3. eval: ten-view evaluation images/s (10 forward passes per image, probabilities averaged).
4. options: bf16 autocast, channels_last off, torch.compile and fused_norms (CUDA), augmentation on the GPU
   instead of in the workers (CUDA), and the two-device split (two GPUs, or cuda:0 + cpu as a
   functional check) against one device.

Every row prints the FLOP rate it reached (forward 0.724 GMAC per image, training 3× that,
2 FLOP per MAC) beside the device's measured matmul rate in the same precision.
Without ``--data`` it makes a synthetic set (``replica synth``) and a store in a temp folder.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from bench_model import fused, make_optimizer, race, sync, train_step_fn  # noqa: E402
from replica import augment  # noqa: E402
from replica.data import TrainBatches, decode_if_encoded, loader  # noqa: E402
from replica.evaluate import evaluate  # noqa: E402
from replica.model import AlexNet  # noqa: E402
from replica.runtime import tune_cpu_allocator  # noqa: E402
from replica.store import PreparedStore, prepare  # noqa: E402
from replica.synth import synth  # noqa: E402

MAC_FORWARD = 724_406_816  # SPEC.md §7, per 224×224 image
FLOP_TRAIN = 3 * 2 * MAC_FORWARD
FLOP_FORWARD = 2 * MAC_FORWARD


def matmul_rate(device, dtype, n: int) -> float:
    """FLOP/s of an n×n matmul in ``dtype``, median of 5 after warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = race({"mm": lambda: torch.mm(a, b)}, 5, 2, device)["mm"]
    return 2 * n ** 3 / t


class Table:
    def __init__(self, peak: dict):
        self.peak, self.rows = peak, []

    def add(self, name: str, img_s: float, flop_per_img: float, precision: str = "fp32", note: str = ""):
        rate = img_s * flop_per_img
        peak = self.peak.get(precision)
        self.rows.append((name, img_s, rate, rate / peak if peak else float("nan"), precision, note))
        print(f"  {name:<56} {img_s:9.1f} img/s  {rate / 1e9:9.1f} GFLOP/s  "
              f"{100 * rate / peak if peak else float('nan'):5.1f}% of {precision} matmul  {note}", flush=True)

    def render(self) -> str:
        lines = [f"{'row':<56} {'img/s':>9} {'GFLOP/s':>9} {'of mm':>6}"]
        for name, img_s, rate, frac, prec, note in self.rows:
            lines.append(f"{name:<56} {img_s:9.1f} {rate / 1e9:9.1f} {100 * frac:5.1f}%  {note}".rstrip())
        return "\n".join(lines)


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
    it, times = iter(batches), []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        next(it)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def stepper(model, device, amp=None):
    opt = make_optimizer(model)

    def step(x, y):
        with amp or contextlib.nullcontext():
            out = model(x)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", type=int, default=1024, help="synthetic training images to make without --data")
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 2 on CPU, 8 on CUDA)")
    p.add_argument("--data", help="an ImageFolder with train/ (default: a synthetic one)")
    p.add_argument("--only", default="model,e2e,eval,options", help="comma-separated rows to run")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    tuned = tune_cpu_allocator()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda given, but no CUDA device is visible")
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (8 if cuda else 2)
    n = args.batch
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"bench: device {device} ({name}), batch {n}, median of {args.steps} steps after {args.warmup} "
          f"warm-up, {workers} loader workers; torch {torch.__version__}; malloc tuning {'on' if tuned else 'off'}")
    if cuda:
        torch.backends.cudnn.benchmark = True
    peak = {"fp32": matmul_rate(device, torch.float32, 8192 if cuda else 2048)}
    with contextlib.suppress(RuntimeError):
        peak["bf16"] = matmul_rate(device, torch.bfloat16, 8192 if cuda else 2048)
    print("matmul: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peak.items())
          + (" (TF32 off: true fp32)" if cuda and not torch.backends.cuda.matmul.allow_tf32 else ""))
    table = Table(peak)
    ratios = {}

    x = (torch.randn(n, 3, 224, 224, device=device) * 50).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (n,), device=device)
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16)
    # what `replica train` runs by default: the fused norms on the CPU, the eager ones on CUDA
    default_norms = "eager norms" if cuda else "fused norms"  # the device's default

    def as_default(model, step):
        return step if cuda else fused(model, step)

    if "model" in only:
        print("\n[1] model train step, synthetic input")
        ours, tv = AlexNet(devices=str(device)), torchvision.models.alexnet().to(device)
        rows = {"ours": as_default(ours, train_step_fn(ours, x, y)), "tv": train_step_fn(tv, x.contiguous(), y)}
        if not cuda:  # on CUDA the fused norms are timed in [4], under bf16
            rows["eager"] = train_step_fn(ours, x, y)
        t = race(rows, args.steps, args.warmup, device)
        table.add(f"model step: replica as-run, {default_norms}", n / t["ours"], FLOP_TRAIN)
        table.add("model step: torchvision alexnet", n / t["tv"], FLOP_TRAIN)
        ratios["model step (torchvision s / replica s)"] = t["tv"] / t["ours"]
        if not cuda:
            table.add("model step: replica as-run, eager norms", n / t["eager"], FLOP_TRAIN)
            ratios["model step, eager norms (torchvision s / replica s)"] = t["tv"] / t["eager"]
        s_bf = stepper(ours, device, bf16)
        s_tv = stepper(tv, device, bf16)
        t = race({"ours": lambda: s_bf(x, y), "tv": lambda: s_tv(x.contiguous(), y)}, args.steps, args.warmup, device)
        table.add("model step, bf16 autocast: replica", n / t["ours"], FLOP_TRAIN, "bf16")
        table.add("model step, bf16 autocast: torchvision", n / t["tv"], FLOP_TRAIN, "bf16")
        ratios["model step bf16 (torchvision s / replica s)"] = t["tv"] / t["ours"]
        del ours, tv, s_bf, s_tv

    tmp = tempfile.TemporaryDirectory()
    store_st = folder = None
    if only & {"e2e", "eval", "options"}:
        data = Path(args.data) if args.data else Path(tmp.name) / "synth"
        need = n * (args.steps + args.warmup + 1)
        if not args.data:
            synth(data, 10, -(-max(args.images, need) // 10), 1, seed=0, progress=False)
        prepare(data, Path(tmp.name) / "store", workers=min(os.cpu_count() or 1, 8), progress=False, fmt="raw")
        prepare(data, Path(tmp.name) / "jstore", workers=min(os.cpu_count() or 1, 8), progress=False, fmt="jpeg")
        os.sync()
        store_st = PreparedStore(Path(tmp.name) / "store")
        jpeg_st = PreparedStore(Path(tmp.name) / "jstore")
        folder = data / "train"
        if len(store_st) < need:
            sys.exit(f"bench: {len(store_st)} training images; the e2e rows need {need} (--images)")
        print(f"\ndata: {len(store_st)} training images from {data}")

    def ours_batches(on_gpu_aug=False, st=None, decode="workers"):
        st = st or store_st
        mean, pca = st.mean(), st.pca()
        ds = TrainBatches(st, n, mean, pca, seed=0, decode=decode)
        mean_crop = ds.mean_crop.to(device)
        if not on_gpu_aug:
            for crops, shift, labels, _, _ in loader(ds, workers, pin_memory=cuda):
                crops, shift, labels, _ = decode_if_encoded(crops, shift, labels, device)  # JPEG: nvJPEG on CUDA
                xb = augment.finish(crops.to(device, non_blocking=True), mean_crop, shift.to(device), "as-run")
                yield xb, labels.to(device, non_blocking=True)
            return
        # GPU augmentation: workers hand over whole 256² uint8 images; crops, flips, mean and
        # noise are done on the device
        g = torch.Generator().manual_seed(0)
        whole = torch.utils.data.DataLoader(_Whole(store_st, n), batch_size=None, num_workers=workers,
                                            pin_memory=True, prefetch_factor=4)
        for u8, labels in whole:
            oy, ox, fl, shift = augment.draw_train(len(u8), g, pca=pca, border=store_st.size - 224)
            u8 = u8.to(device, non_blocking=True)
            crops = augment.crop(u8, oy.to(device), ox.to(device), fl.to(device), 224)
            yield augment.finish(crops, mean_crop, shift.to(device), "as-run"), labels.to(device, non_blocking=True)

    def tv_batches():
        tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        ds = torchvision.datasets.ImageFolder(str(folder), tf)
        for xb, yb in torch.utils.data.DataLoader(ds, n, shuffle=True, num_workers=workers, drop_last=True,
                                                  pin_memory=cuda, persistent_workers=False):
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)

    if "e2e" in only:
        print("\n[2] end to end: data pipeline feeding the train step")
        ours, tv = AlexNet(devices=str(device)), torchvision.models.alexnet().to(device)
        s_ours, s_tv = stepper(ours, device), stepper(tv, device)
        s_default = as_default(ours, s_ours)  # what replica train runs on this device
        e_ours = n / timed_steps(ours_batches(), s_default, args.steps, args.warmup, device)
        e_tv = n / timed_steps(tv_batches(), s_tv, args.steps, args.warmup, device)
        table.add(f"end to end: replica (store → workers), {default_norms}", e_ours, FLOP_TRAIN)
        jdec = "device" if cuda else "workers"
        e_jpeg = n / timed_steps(ours_batches(st=jpeg_st, decode=jdec), s_default, args.steps, args.warmup, device)
        table.add(f"end to end: replica (JPEG store, decode in {'nvJPEG' if cuda else 'workers'})", e_jpeg, FLOP_TRAIN)
        table.add("end to end: torchvision (ImageFolder JPEG pipeline)", e_tv, FLOP_TRAIN)
        ratios["end to end (replica img/s / torchvision img/s)"] = e_ours / e_tv
        if not cuda:
            e_eager = n / timed_steps(ours_batches(), s_ours, args.steps, args.warmup, device)
            table.add("end to end: replica, eager norms", e_eager, FLOP_TRAIN)
            ratios["end to end, eager norms (replica img/s / torchvision img/s)"] = e_eager / e_tv
        d_ours = loader_rate(ours_batches(), args.steps, args.warmup, device, n)
        d_tv = loader_rate(tv_batches(), args.steps, args.warmup, device, n)
        t = race({"ours": lambda: s_default(x, y), "tv": lambda: s_tv(x.contiguous(), y)}, args.steps, 1, device)
        table.add("data alone: replica pipeline", d_ours, 0, note="(no model)")
        table.add("data alone: torchvision pipeline", d_tv, 0, note="(no model)")
        ratios["end to end from the JPEG store / model alone (target ≥ 0.95)"] = e_jpeg / (n / t["ours"])
        d_jpeg = loader_rate(ours_batches(st=jpeg_st, decode=jdec), args.steps, args.warmup, device, n)
        table.add("data alone: replica pipeline, JPEG store", d_jpeg, 0, note="(no model)")
        for who, d, m in (("replica", d_ours, n / t["ours"]), ("torchvision", d_tv, n / t["tv"])):
            print(f"  bottleneck, {who}: {'the model' if m < d else 'the input pipeline'} "
                  f"(model alone {m:.0f} img/s, data alone {d:.0f} img/s)")
        if peak.get("bf16"):
            s_bf = stepper(ours, device, bf16)
            e_bf = n / timed_steps(ours_batches(), s_bf, args.steps, args.warmup, device)
            table.add("end to end: replica, bf16 autocast", e_bf, FLOP_TRAIN, "bf16")
            ratios["end to end, replica bf16 vs torchvision fp32"] = e_bf / e_tv
        del ours, tv, s_ours, s_tv, s_default

    if "eval" in only:
        print("\n[3] ten-view evaluation")
        model = AlexNet(devices=str(device))
        k = min(args.eval_images, len(store_st))
        sub = _Subset(store_st, k)
        evaluate(model, sub, store_st.mean(), views=10, batch=min(n, 64), max_batches=1)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        evaluate(model, sub, store_st.mean(), views=10, batch=min(n, 64))
        sync(device)
        table.add("ten-view eval (10 forward passes per image)", k / (time.perf_counter() - t0), 10 * FLOP_FORWARD)
        del model

    if "options" in only:
        print("\n[4] options")
        ours = AlexNet(devices=str(device))
        nchw = AlexNet(devices=str(device), channels_last=False)
        t = race({"cl": train_step_fn(ours, x, y), "nchw": train_step_fn(nchw, x.contiguous(), y)}, args.steps,
                 args.warmup, device)
        table.add("channels_last on (default)", n / t["cl"], FLOP_TRAIN)
        table.add("channels_last off (NCHW)", n / t["nchw"], FLOP_TRAIN)
        del nchw
        if cuda:
            s_bf = stepper(ours, device, bf16)
            gpu = n / timed_steps(ours_batches(on_gpu_aug=True), s_bf, args.steps, args.warmup, device)
            cpu = n / timed_steps(ours_batches(), s_bf, args.steps, args.warmup, device)
            table.add("end to end bf16, crops/flips in CPU workers", cpu, FLOP_TRAIN, "bf16")
            table.add("end to end bf16, crops/flips on the GPU", gpu, FLOP_TRAIN, "bf16")
            d_gpu = loader_rate(ours_batches(on_gpu_aug=True), args.steps, args.warmup, device, n)
            d_cpu = loader_rate(ours_batches(), args.steps, args.warmup, device, n)
            table.add("data alone, crops in workers", d_cpu, 0, note="(no model)")
            table.add("data alone, crops on the GPU", d_gpu, 0, note="(no model)")
            try:
                compiled = torch.compile(ours)
                s_c = stepper(compiled, device, bf16)
                t0 = time.perf_counter()
                s_c(x, y)
                sync(device)
                print(f"  torch.compile: first step (compilation) {time.perf_counter() - t0:.1f} s")
                tc = race({"c": lambda: s_c(x, y), "e": lambda: s_bf(x, y)}, args.steps, args.warmup, device)
                table.add("model step bf16, torch.compile", n / tc["c"], FLOP_TRAIN, "bf16")
                table.add("model step bf16, eager", n / tc["e"], FLOP_TRAIN, "bf16")
            except Exception as e:  # a compiler toolchain problem is a finding, not a crash
                print(f"  torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            pair = ("cuda:0", "cuda:1") if torch.cuda.device_count() > 1 else ("cuda:0", "cpu")
            small = 16 if pair[1] == "cpu" else n
            two = AlexNet(devices=pair)
            one = AlexNet(devices="cuda:0")
            two.load_state_dict(one.state_dict())
            xs, ys = x[:small], y[:small]
            t = race({"two": train_step_fn(two, xs, ys), "one": train_step_fn(one, xs, ys)}, args.steps,
                     args.warmup, device)
            note = "(functional check: tower b on the CPU)" if pair[1] == "cpu" else ""
            table.add(f"two devices {pair[0]} + {pair[1]}, batch {small}", small / t["two"], FLOP_TRAIN, note=note)
            table.add(f"one device cuda:0, batch {small}", small / t["one"], FLOP_TRAIN)
            # last: the norms' first compile (Triton) is the slowest part of [4]
            s_f = fused(ours, lambda: s_bf(x, y))
            s_f()  # compiles the norms (on failure: one warning, then the eager norms)
            tf = race({"f": s_f, "e": lambda: s_bf(x, y)}, args.steps, args.warmup, device)
            table.add("model step bf16, fused_norms=true", n / tf["f"], FLOP_TRAIN, "bf16")
            table.add("model step bf16, eager norms", n / tf["e"], FLOP_TRAIN, "bf16")

    print("\n" + "=" * 100)
    print(f"summary ({device}, {name}, batch {n})")
    print(table.render())
    for k, v in ratios.items():
        print(f"RATIO {k}: {v:.2f}")
    tmp.cleanup()


class _Whole(torch.utils.data.Dataset):
    """Batch i of a store as whole uint8 images (for augmentation on the device)."""

    def __init__(self, st, batch):
        self.st, self.batch = st, batch
        self.order = torch.randperm(len(st), generator=torch.Generator().manual_seed(0)).numpy()

    def __len__(self):
        return len(self.st) // self.batch

    def __getitem__(self, i):
        u8, labels, _ = self.st.batch(self.order[i * self.batch:(i + 1) * self.batch])
        return torch.from_numpy(u8), torch.from_numpy(labels)


class _Subset:
    """The first k images of a store, for evaluate()."""

    def __init__(self, st, k):
        self.st, self.k, self.size = st, k, st.size

    def __len__(self):
        return self.k

    def batch(self, positions):
        return self.st.batch(positions)


if __name__ == "__main__":
    main()
