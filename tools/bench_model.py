#!/usr/bin/env python
"""Train-step speed of the faithful model against torchvision's AlexNet, in one process.

    python tools/bench_model.py [--device cpu|cuda] [--batch 128] [--steps 5] [--grouped]
    python tools/bench_model.py --fast-paths [--batch 32] [--bf16]

Each row is forward + backward + SGD step on random input, after warm-up (ours with the
optimizer ``replica train`` runs, :class:`replica.optim.PaperSGD`; torchvision's with
``torch.optim.SGD`` as its users call it); the models take
turns step by step, so that a slow patch of a shared machine hits both alike, and each row
reports the median. The ratio is torchvision's step time over ours: ≥ 1.0 means ours is at
least as fast. A second table times the cross-map LRN alone (forward + backward on tower a's
layer-1 activations, 48×55×55) against ``torch.nn.LocalResponseNorm``.

Our net is timed twice: with its three norms as compiled fused loops (``fused_norms``, what
``replica train`` uses on the CPU by default; the first, warm-up, step compiles) and with the
eager norms (``fused_norms=false``).

``--fast-paths`` times only our step (PaperSGD, optionally under bf16 autocast; in float32
also with the fused norms, which ``replica train`` uses on the CPU by default), against the
same step with one fast path turned back: the channel window sums as shifted adds instead of
a banded matrix product (the product is used for bf16/fp16 inputs only), and the optimizer as
four plain passes instead of torch's fused SGD kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

import replica.layers as layers  # noqa: E402
from replica.layers import local_response_norm  # noqa: E402
from replica.model import AlexNet  # noqa: E402
from replica.optim import PaperSGD, param_groups  # noqa: E402
from replica.runtime import tune_cpu_allocator  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(model):
    """What each model trains with: PaperSGD for ours (as ``replica train``), torch's SGD for torchvision's."""
    if isinstance(getattr(model, "_orig_mod", model), AlexNet):  # also under torch.compile
        return PaperSGD(param_groups(model, 1e-4, 5e-4, 2e-4))
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)


def train_step_fn(model, x, y):
    opt = make_optimizer(model)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def fused(model, fn):
    """``fn`` with ``model``'s norms as compiled fused loops (``fused_norms``), off again after."""
    def call(*args):
        model.fused_norms = True
        try:
            fn(*args)
        finally:
            model.fused_norms = False
    return call


def race(fns: dict, steps: int, warmup: int, device) -> dict:
    """Median seconds per call of each fn, calls interleaved round-robin."""
    times = {k: [] for k in fns}
    for i in range(warmup + steps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fast_paths(device, n: int, bf16: bool, steps: int, warmup: int) -> None:
    """Our train step with all fast paths, and with each one turned back in turn."""
    x = (torch.randn(n, 3, 224, 224, device=device) * 50).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (n,), device=device)
    model = AlexNet(devices=str(device))
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def stepper(fused=True, band=True):
        opt = PaperSGD(param_groups(model, 1e-4, 5e-4, 2e-4))
        opt._fused = fused

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

    rows = {"all fast paths, eager norms": stepper(),
            "window sums as shifted adds": stepper(band=False),
            "optimizer as 4 plain passes (not fused)": stepper(fused=False)}
    if not bf16:
        del rows["window sums as shifted adds"]  # float32 uses shifted adds anyway
        rows["all, fused norms (CPU default, float32)"] = fused(model, stepper())
    t = race(rows, steps, warmup, device)
    base = t["all fast paths, eager norms"]
    print(f"\n{'train step, batch ' + str(n) + (', bf16 autocast' if bf16 else ', float32'):<42} {'s/step':>8} "
          f"{'img/s':>8} {'vs all':>7}")
    for k, v in t.items():
        print(f"{k:<42} {v:8.3f} {n / v:8.1f} {base / v:7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--grouped", action="store_true", help="also time conv2/4/5 as grouped vs per-tower convs")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as it is")
    p.add_argument("--fast-paths", action="store_true", help="only our step, with each fast path turned back in turn")
    p.add_argument("--bf16", action="store_true", help="with --fast-paths: under bf16 autocast, as the demo trains")
    args = p.parse_args(argv)
    tuned = False if args.no_malloc_tuning else tune_cpu_allocator()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_model: --device cuda given, but no CUDA device is visible")
    torch.manual_seed(0)
    n = args.batch
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" batch {n}, median of {args.steps} steps after {args.warmup} warm-up; torch {torch.__version__};"
          f" malloc tuning {'on' if tuned else 'off'}")

    if args.fast_paths:
        fast_paths(device, n, args.bf16, args.steps, args.warmup)
        return

    x = torch.randn(n, 3, 224, 224, device=device) * 50
    y = torch.randint(0, 1000, (n,), device=device)
    models = {
        "replica as-run, eager norms": AlexNet(devices=str(device)),
        "torchvision alexnet": torchvision.models.alexnet().to(device),
        "replica as-run, NCHW layout": AlexNet(devices=str(device), channels_last=False),
        "replica without norms (run 148)": AlexNet(devices=str(device), norm=False),
        "torchvision alexnet, channels_last": torchvision.models.alexnet().to(device, memory_format=torch.channels_last),
    }
    fns = {k: train_step_fn(m, x.contiguous(memory_format=torch.channels_last) if "channels_last" in k else x, y)
           for k, m in models.items()}
    net = models["replica as-run, eager norms"]
    fns["replica as-run, fused norms"] = fused(net, train_step_fn(net, x, y))
    t = race(fns, args.steps, args.warmup, device)
    ours, ref = t["replica as-run, eager norms"], t["torchvision alexnet"]
    print(f"\n{'train step':<38} {'s/step':>8} {'img/s':>8}")
    for k, v in t.items():
        print(f"{k:<38} {v:8.3f} {n / v:8.1f}")
    print(f"RATIO model step, fused norms (replica train's CPU default; torchvision / replica, "
          f"≥ 1.0 = replica at least as fast): {ref / t['replica as-run, fused norms']:.2f}")
    print(f"RATIO model step, eager norms (fused_norms=false): {ref / ours:.2f}")

    del models, fns
    a = (torch.randn(n, 48, 55, 55, device=device) * 40).requires_grad_()
    g = torch.randn_like(a)
    a_cl = a.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    g_cl = g.contiguous(memory_format=torch.channels_last)  # as the model's pooling hands it back
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)
    lrn = {
        "replica LRN, eager": lambda: local_response_norm(a_cl, 5, 1e-4, 0.75, 2.0).backward(g_cl),
        "replica LRN, fused": lambda: local_response_norm(a_cl, 5, 1e-4, 0.75, 2.0, fused=True).backward(g_cl),
        "replica LRN, NCHW": lambda: local_response_norm(a, 5, 1e-4, 0.75, 2.0).backward(g),
        "torch LocalResponseNorm": lambda: torch_lrn(a).backward(g),
    }
    t = race(lrn, args.steps, args.warmup, device)
    print(f"\n{'LRN fwd+bwd, ' + str(n) + '×48×55×55':<38} {'s':>8}")
    for k, v in t.items():
        print(f"{k:<38} {v:8.3f}")
    print(f"RATIO LRN (torch / replica): {t['torch LocalResponseNorm'] / t['replica LRN, eager']:.2f} eager; "
          f"{t['torch LocalResponseNorm'] / t['replica LRN, fused']:.2f} fused")

    if args.grouped:
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
        t = race(convs, args.steps, args.warmup, device)
        print(f"\n{'conv fwd+bwd':<38} {'s':>8}")
        for k, v in t.items():
            print(f"{k:<38} {v:8.3f}")


if __name__ == "__main__":
    main()
