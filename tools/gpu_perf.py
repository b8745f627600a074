#!/usr/bin/env python
"""The GPU performance run: every row beside torchvision's AlexNet in the same run, on one H100
or H200 in at most 7 minutes, each result printed as it ends; then the targets, PASS or MISS,
and the defaults the figures suggest.

    python tools/gpu_perf.py [--dry-run] [--only p,m,c,e,v] | tee docs/gpu-runs/DATE-GPU-gpu_perf.log

  (p) correctness on the device, before anything is timed: the grouped form against the towers
      (logits and every gradient: held to 1e-9 in float64, where no rounding tie decides a ReLU or
      a pooling window; float32 with TF32 off and bf16 reported, float32's logits held to 1e-4),
      and the graphed step against the eager one over 6 steps with an ε drop (losses and
      parameters); each comparison runs and says its verdict even when the other fails;
  (m) the training step, bf16, channels_last, at batch 256 and 128: torchvision's AlexNet (eager,
      NCHW, torch's SGD: the reference), replica's towers, the grouped form, the grouped form with
      conv1 reading 4 channels (``conv1_channels=4``), the grouped form replayed from a CUDA graph,
      all with the fused norms; throughput (steps back to back, one
      wait a round) and the host's time to queue a step;
  (c) per layer, forward and backward in bf16: conv1 reading 3 channels, 4 and 8 (zero channels
      past the third, which cuDNN need not pad), conv2/4/5 grouped against one convolution per
      tower; then the profile of 3 grouped steps, its top 25 kernels by device time;
  (e) end to end from the raw and the JPEG store (decoded in the workers; the JPEG store also with
      crop_on=device) at 8, 12 and 14 loader workers (as many as the cores allow), back to back,
      with the CPU's model name; at the first count also the JPEG store decoded on the device
      (nvJPEG, ``decode=device``); the stores made once for all counts;
  (v) ten-view evaluation, views a second, eager and with `replica eval --graph` (same figures).

Each check runs in a process group of its own under a limit (``gpu_check.stream``), so a hang
loses that check only. ``--dry-run`` runs all of it on the CPU at 1/16 width and tiny batches,
the graph stood in for by ``replica.steps.EagerGraphs`` (tests/test_gpu_paths.py runs it). The
timing pieces are ``tools/bench.py``'s (``throughput``, ``race``, ``stream_rate``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CHECKS = "pmcev"
LIMITS = {"p": 45, "m": 120, "c": 40, "e": 170, "v": 40}  # seconds, 415 in all: ≤ 7 minutes with start-ups
TARGETS = [  # (result key, what, the target, True: at least it / False: at most it)
    ("m.b256.grouped_graph", "training step, batch 256, bf16 (img/s)", 40_000, True),
    ("m.b256.ratio_best", "the same, torchvision's time / ours", 1.0, True),
    ("m.b128.grouped_graph", "training step, batch 128, bf16 (img/s)", 25_000, True),
    ("m.b256.grouped_graph_host_ms", "host time to queue a step with the graph (ms)", 1.0, False),
    ("e.best_jpeg", "end to end from the JPEG store (img/s)", 20_000, True),
    ("v.views", "ten-view evaluation (views/s)", 40_000, True),
]


def result(key: str, value: float) -> None:
    """One figure for the summary (the main process reads these lines back)."""
    print(f"RESULT {key} {value:.6g}", flush=True)


class Sizes:
    def __init__(self, dry: bool):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        self.width = 0.0625 if dry else 1.0
        self.batches = (4,) if dry else (256, 128)
        self.steps, self.rounds = (2, 2) if dry else (30, 3)
        self.workers = (1, 2) if dry else tuple(w for w in (8, 12, 14) if w <= (os.cpu_count() or 8))


def nets(s: Sizes, bf16: bool = True, conv1_channels: int = 3):
    """(towers, grouped) on the device, the same weights."""
    import torch

    from replica.config import NetOptions
    from replica.model import AlexNet

    torch.manual_seed(0)
    net = NetOptions(width=s.width)
    towers = AlexNet.from_options(net, 1000, s.device, grouped=False)
    grouped = AlexNet.from_options(net, 1000, s.device, grouped=True, conv1_channels=conv1_channels)
    grouped.load_state_dict(towers.state_dict())
    return towers, grouped


def check_p(s: Sizes) -> str:
    import torch
    import torch.nn.functional as F

    from replica.optim import PaperSGD, param_groups
    from replica.runtime import autocast, set_cuda_numerics
    from replica.steps import EagerGraphs, StepRunner
    from replica.train import train_step

    set_cuda_numerics(tf32=False, benchmark=True)
    dev = torch.device(s.device)
    torch.manual_seed(0)  # the same input every run
    x = torch.randn(4, 3, 224, 224, device=dev) * 50
    y = torch.arange(4, device=dev)
    lines, failed = [], []

    def grouped_against_towers(dtype, bf16):
        """(logits, the worst parameter's gradient): relative differences, the gradient's in norm."""
        towers, grouped = nets(s)
        if dtype == torch.float64:
            towers, grouped = towers.double(), grouped.double()
            grouped.pack_parameters()  # (.double() undid it)
        outs, grads = [], []
        for m in (towers, grouped):
            torch.manual_seed(7)
            with autocast((dev,), bf16):
                out = m(x.to(dtype))
            F.cross_entropy(out if dtype == torch.float64 else out.float(), y).backward()
            outs.append(out.detach().double())
            grads.append({n: p.grad.double() for n, p in m.named_parameters()})
        logits = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
        grad = max(((grads[1][n] - g).norm() / g.norm().clamp_min(1e-300)).item() for n, g in grads[0].items())
        return logits, grad

    # The wiring is checked in float64, where rounding cannot decide a ReLU or a pooling window
    # otherwise: in float32 such a tie moved conv1's gradient by 1.6% in 1 of 40 random inputs
    # (logits within 1.5e-7), which a bound on the float32 gradients failed by chance.
    l64, g64 = grouped_against_towers(torch.float64, False)
    l32, g32 = grouped_against_towers(torch.float32, False)
    l16, g16 = grouped_against_towers(torch.float32, True)
    if not (l64 <= 1e-9 and g64 <= 1e-9):
        failed.append(f"grouped against towers, float64: logits off by {l64:.2e}, a gradient by {g64:.2e}")
    if not l32 <= 1e-4:
        failed.append(f"grouped against towers, float32: logits off by {l32:.2e}")
    lines.append(f"grouped ≡ towers in float64 (logits within {l64:.0e}, gradients {g64:.0e} relative); float32 "
                 f"logits within {l32:.0e}, gradients {g32:.0e}; bf16 logits {l16:.0e}, gradients {g16:.0e}")
    base = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
    runs = []
    for graphed in (False, True):
        _, net = nets(s)
        opt = PaperSGD(param_groups(net, 0.01, 5e-4, 0.02), lr_tensors=graphed)
        graphs = EagerGraphs(opt) if s.dry else None
        run = StepRunner(net, opt, devices=(dev,), bf16=True, graph=graphed, graphs=graphs, eager=train_step)
        losses = []
        for k in range(6):
            torch.manual_seed(100 + k)
            losses.append(run(x, y, dict(base, weight=0.01 if k < 4 else 0.001)).item())
        runs.append((losses, [p.detach().float().clone() for p in net.parameters()], run.replays))
    (l0, p0, _), (l1, p1, replays) = runs
    off = max(((b - a).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(p0, p1))
    if replays != 3:
        failed.append(f"{replays} replays of 6 steps (3 warm-up steps, then 3 replays expected)")
    elif not (max(abs(a - b) for a, b in zip(l0, l1)) <= 1e-3 * max(map(abs, l0)) and off <= 1e-3):
        failed.append(f"graph against eager: losses {l0} vs {l1}, parameters off by {off:.2e}")
    else:
        result("p.graph_same", 1)
        lines.append(f"graph ≡ eager over 6 steps (losses {'equal' if l0 == l1 else 'within 1e-3'}, parameters "
                     f"within {off:.1e})")
    assert not failed, "; ".join(failed + lines)  # each comparison ran: one failing leaves the other's verdict
    return "; ".join(lines)


def check_m(s: Sizes) -> str:
    import torch
    import torchvision

    import bench
    from replica.optim import PaperSGD, param_groups
    from replica.runtime import set_cuda_numerics
    from replica.steps import EagerGraphs, StepRunner
    from replica.train import train_step

    set_cuda_numerics(tf32=False, benchmark=True)
    dev = torch.device(s.device)
    out = []
    for n in s.batches:
        towers, grouped = nets(s)
        _, graphed = nets(s)
        _, grouped4 = nets(s, conv1_channels=4)  # the input written with a zero fourth channel
        for m in (towers, grouped, graphed, grouped4):
            m.fused_norms = not s.dry  # (on the CPU a compile takes half a minute: the dry run runs eager)
        tv = torchvision.models.alexnet().to(dev)
        x = (torch.randn(n, 3, 224, 224, device=dev) * 50).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (n,), device=dev)
        amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731  (re-entered each step)
        opt = PaperSGD(param_groups(graphed, 0.01, 5e-4, 0.02), lr_tensors=True)
        runner = StepRunner(graphed, opt, devices=(dev,), bf16=True, graph=True,
                            graphs=EagerGraphs(opt) if s.dry else None, eager=train_step)
        lrs = {"weight": 0.01, "bias": 0.02, "conv1.weight": 0.01, "conv1.bias": 0.02}
        fns = {"torchvision": bench.on(bench.stepper(tv, amp()), x.contiguous(), y),
               "towers": bench.on(bench.stepper(towers, amp()), x, y),
               "grouped": bench.on(bench.stepper(grouped, amp()), x, y),
               "grouped_conv1_4ch": bench.on(bench.stepper(grouped4, amp()), x, y),
               "grouped_graph": lambda: runner(x, y, lrs)}
        for fn in fns.values():  # compiles, cuDNN's search, the graph's warm-up and capture
            for _ in range(2 if s.dry else 5):
                fn()
        host = {}
        t = bench.throughput(fns, s.steps, s.rounds, dev, host)
        for k, v in t.items():
            result(f"m.b{n}.{k}", n / v)
            result(f"m.b{n}.{k}_host_ms", 1e3 * host[k])
        best = min(t[k] for k in ("towers", "grouped", "grouped_graph"))
        result(f"m.b{n}.ratio_best", t["torchvision"] / best)
        out.append(f"batch {n}: " + ", ".join(f"{k} {n / v:,.0f} img/s (host {1e3 * host[k]:.1f} ms)"
                                              for k, v in t.items()))
        del towers, grouped, graphed, grouped4, tv, opt, fns
    return "; ".join(out)


def check_c(s: Sizes) -> str:
    import torch
    import torch.nn.functional as F

    import bench

    dev = torch.device(s.device)
    n, cl = s.batches[0], torch.channels_last
    dt = torch.bfloat16 if not s.dry else torch.float32
    w = lambda *shape: (torch.randn(*shape, device=dev, dtype=dt) * 0.01).requires_grad_()  # noqa: E731
    x3 = (torch.randn(n, 3, 227, 227, device=dev, dtype=dt)).contiguous(memory_format=cl).requires_grad_()
    c = max(1, round(96 * s.width))
    fns = {}
    for ch in (3, 4, 8):  # zero channels past the third: what cuDNN would otherwise pad each step
        xc = F.pad(x3.detach(), (0, 0, 0, 0, 0, ch - 3)).contiguous(memory_format=cl).requires_grad_()
        fns[f"conv1, {ch} channels"] = lambda xc=xc, wc=w(c, ch, 11, 11): F.conv2d(xc, wc, stride=4).sum().backward()
    for name, cin, cout, hw, k, pad in (("conv2", 48, 128, 27, 5, 2), ("conv4", 192, 192, 13, 3, 1),
                                        ("conv5", 192, 128, 13, 3, 1)):
        cin, cout = max(1, round(cin * s.width)), max(1, round(cout * s.width))
        h = torch.randn(n, 2 * cin, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl)
        ha, hb = (t.contiguous(memory_format=cl) for t in h.chunk(2, 1))
        wt = w(2 * cout, cin, k, k)
        fns[f"{name} grouped"] = lambda h=h, wt=wt, pad=pad: F.conv2d(h, wt, padding=pad, groups=2).sum().backward()
        fns[f"{name} per tower"] = lambda ha=ha, hb=hb, wt=wt, pad=pad, c=cout: (
            F.conv2d(ha, wt[:c], padding=pad).sum() + F.conv2d(hb, wt[c:], padding=pad).sum()).backward()
    t = bench.throughput(fns, s.steps, s.rounds, dev)
    for k, v in t.items():
        result("c." + re.sub(r"\W+", "_", k), 1e3 * v)
    # the whole grouped step's kernels, by device time: which layer owns the slow ones
    _, grouped = nets(s)
    grouped.fused_norms = not s.dry
    x = (torch.randn(n, 3, 224, 224, device=dev) * 50).contiguous(memory_format=cl)
    y = torch.randint(0, 1000, (n,), device=dev)
    step = bench.stepper(grouped, torch.autocast(dev.type, dtype=torch.bfloat16))
    bench.profile_step(bench.on(step, x, y), dev, steps=3, top=25, title="grouped form, fused norms")
    return ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in t.items())


def check_e(s: Sizes) -> str:
    import subprocess as sp

    import torch

    import bench
    from replica.model import AlexNet

    cpu = next((ln.split(":", 1)[1].strip() for ln in sp.run(["lscpu"], capture_output=True, text=True).stdout
                .splitlines() if ln.startswith("Model name")), "?") if not s.dry else "the CPU"
    n = s.batches[0]
    out = [f"{os.cpu_count()} cores of {cpu}"]
    best = 0.0
    first = None  # the first worker count's Bench: its temporary folder holds the stores every count reads
    for workers in s.workers:
        args = bench.parser().parse_args(["e2e", "--device", s.device, "--batch", str(n), "--steps", str(s.steps),
                                          "--warmup", "2", "--workers", str(workers),
                                          "--images", str(n * (s.steps + 4))])
        b = bench.Bench(args)
        if first is None:
            first = b
        else:
            b.stores = first.data()  # made once (synthesis and two prepares: seconds each on a GPU's host)
        st, jst, _ = b.data()
        model = AlexNet(devices=s.device, width=s.width)
        model.fused_norms = not s.dry
        step = bench.stepper(model, b.bf16())
        rows = [("raw", st, "workers", "workers"), ("jpeg", jst, "workers", "workers"),
                ("jpeg_crop_on_device", jst, "workers", "device")]
        if b is first:  # nvJPEG (decode=device) once: its rate hardly depends on the workers, who only read
            rows.append(("jpeg_nvjpeg", jst, "device", "workers"))
        rates = {name: bench.stream_rate(b.ours_batches(store, decode=decode, crop_on=where), step, s.steps, 2,
                                         b.device, n)
                 for name, store, decode, where in rows}
        for name, r in rates.items():
            result(f"e.w{workers}.{name}", r)
        best = max(best, rates["jpeg"], rates["jpeg_crop_on_device"], rates.get("jpeg_nvjpeg", 0.0))
        out.append(f"{workers} workers: raw {rates['raw']:,.0f}, JPEG {rates['jpeg']:,.0f}, JPEG with crop_on=device "
                   f"{rates['jpeg_crop_on_device']:,.0f}" + (f", JPEG decoded on the device {rates['jpeg_nvjpeg']:,.0f}"
                                                             if "jpeg_nvjpeg" in rates else "") + " img/s")
        del model
        if b is not first:
            del b
        torch.cuda.empty_cache() if not s.dry else None
    del first
    result("e.best_jpeg", best)
    return "; ".join(out)


def check_v(s: Sizes) -> str:
    import torch

    import bench
    from replica.data.synth import synth
    from replica.data.writer import prepare
    from replica.data.store import PreparedStore
    from replica.evaluate import evaluate_members
    from replica.model import AlexNet
    from replica.steps import EagerGraphs

    k = 32 if s.dry else 4096
    with tempfile.TemporaryDirectory() as tmp:
        synth(Path(tmp) / "s", 8, k // 8, 1, seed=0, progress=False)
        prepare(Path(tmp) / "s", Path(tmp) / "st", workers=min(8, os.cpu_count() or 1), progress=False, fmt="raw")
        st = PreparedStore(Path(tmp) / "st")
        model = AlexNet(devices=s.device, width=s.width).eval()
        bf16 = not s.dry
        batch = s.batches[0]
        rates, figures = {}, {}
        for graph in (False, True):  # the graph stood in for on the CPU (replica.steps.EagerGraphs)
            members = [dict(model=model, mean=st.mean(), bf16=bf16)]
            how = dict(views=10, batch=batch, workers=2, graph=graph, graphs=EagerGraphs() if s.dry and graph else None)
            evaluate_members(members, st, max_batches=2, **how)  # warm-up (a graph: its capture)
            bench.sync(torch.device(s.device))
            t0 = time.perf_counter()
            r = evaluate_members(members, st, **how)["members"][0]
            bench.sync(torch.device(s.device))
            rates[graph], figures[graph] = 10 * r["images"] / (time.perf_counter() - t0), r
        if figures[True]["top1_err"] != figures[False]["top1_err"]:
            raise AssertionError(f"the graphed eval's top-1 error {figures[True]['top1_err']} is not the eager "
                                 f"{figures[False]['top1_err']}")
    result("v.views_eager", rates[False])
    result("v.views_graph", rates[True])
    result("v.views", max(rates.values()))
    return (f"{rates[False]:,.0f} views/s eager, {rates[True]:,.0f} with --graph (the same top-1); {r['images']:,} "
            f"images, batch {batch}, {'bf16' if bf16 else 'fp32'}, eager norms, 2 workers")


def summarize(results: dict) -> list[str]:
    """The targets, PASS or MISS, and the defaults the figures suggest (fixed rules)."""
    lines = []
    for key, what, goal, least in TARGETS:
        v = results.get(key)
        met = v is not None and (v >= goal if least else v <= goal)
        lines.append(f"{'PASS' if met else 'MISS'} {what}: {'not measured' if v is None else f'{v:,.2f}'} "
                     f"(target {'≥' if least else '≤'} {goal:,})")
    for n in sorted({int(m.group(1)) for m in map(re.compile(r"m\.b(\d+)\.").match, results) if m}, reverse=True):
        g, t, gg = (results.get(f"m.b{n}.{k}") for k in ("grouped", "towers", "grouped_graph"))
        if g and t:
            lines.append(f"SUGGEST grouped={'auto' if g > 1.05 * t else 'false'}  (batch {n}: grouped {g:,.0f} "
                         f"against towers {t:,.0f} img/s)")
        if gg and g and results.get("p.graph_same"):
            lines.append(f"SUGGEST graph={'auto=on for one GPU' if gg > 1.05 * g else 'false'}  (batch {n}: graphed "
                         f"{gg:,.0f} against eager {g:,.0f} img/s; graph ≡ eager checked in (p))")
    conv1 = {ch: results[f"c.conv1_{ch}_channels"] for ch in (3, 4, 8) if f"c.conv1_{ch}_channels" in results}
    if conv1:
        better = {ch: v for ch, v in conv1.items() if ch != 3 and v < 0.95 * conv1.get(3, float("inf"))}
        pick = min(better, key=better.get) if better else 3
        lines.append(f"SUGGEST conv1_channels={pick}  (" + ", ".join(f"{ch}: {v:.3f} ms" for ch, v in
                                                                          conv1.items()) + ")")
    ve, vg = results.get("v.views_eager"), results.get("v.views_graph")
    if ve and vg:
        lines.append(f"SUGGEST replica eval --graph {'by default' if vg > 1.05 * ve else 'stays off'}  (ten views: "
                     f"{vg:,.0f} views/s graphed against {ve:,.0f} eager)")
    w = {int(k.split(".")[1][1:]): v for k, v in results.items() if re.fullmatch(r"e\.w\d+\.jpeg", k)}
    d = {int(k.split(".")[1][1:]): v for k, v in results.items() if re.fullmatch(r"e\.w\d+\.jpeg_crop_on_device", k)}
    if w and d:
        lines.append(f"SUGGEST crop_on={'device' if max(d.values()) > 1.05 * max(w.values()) else 'workers'}  (best JPEG "
                     f"rate with the crops on the device {max(d.values()):,.0f} against in the workers "
                     f"{max(w.values()):,.0f} img/s)")
        w = {k: max(v, d.get(k, 0)) for k, v in w.items()}
    nv = next((v for k, v in results.items() if re.fullmatch(r"e\.w\d+\.jpeg_nvjpeg", k)), None)
    if nv and w:
        lines.append(f"SUGGEST decode={'device' if nv > 1.05 * max(w.values()) else 'workers'}  (JPEG decoded on the "
                     f"device {nv:,.0f} against the best in the workers {max(w.values()):,.0f} img/s)")
    if w:
        pick = min(k for k, v in w.items() if v >= 0.95 * max(w.values()))
        lines.append(f"SUGGEST workers={pick}  (the fewest within 5% of the best JPEG rate: "
                     + ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(w.items())) + ")")
    return lines


def run_one(checks: str, dry: bool) -> int:
    failed = 0
    for i, c in enumerate(checks):
        t0 = time.monotonic()
        try:
            line = globals()[f"check_{c}"](Sizes(dry))
        except Exception as e:  # noqa: BLE001  (each failure is a result line)
            print(f"FAIL ({c}) {time.monotonic() - t0:5.1f} s: {type(e).__name__}: {str(e)[-2000:]}", flush=True)
            failed |= 1 << i
            continue
        print(f"PASS ({c}) {time.monotonic() - t0:5.1f} s: {line}", flush=True)
    return failed


def main(argv=None) -> int:
    import gpu_check

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="all of it on the CPU: tiny sizes, the graph stood in for")
    p.add_argument("--only", default=CHECKS, help="checks to run, e.g. p,m (default: all)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        return run_one(a.one, a.dry_run)
    import torch

    say = gpu_check.say
    say("gpu_perf" + (" --dry-run (CPU)" if a.dry_run else "") + ": " + " | ".join(gpu_check.versions()))
    if not a.dry_run and not torch.cuda.is_available():
        say(f"gpu_perf: no CUDA device visible to {sys.executable}; --dry-run runs it on the CPU")
        return 1
    wanted = [c for c in CHECKS if c in a.only.replace(",", "")]
    groups = ["".join(wanted)] if a.dry_run else wanted  # the dry run: one process, as gpu_check's
    results, failed, t0, stopped = {}, [], time.monotonic(), None
    gpu_check.stop_on_sigterm()  # a SIGTERM: the running check killed with all it started, then the summary
    with tempfile.TemporaryDirectory(prefix="gpu_perf-"):
        for group in groups:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", group] + (["--dry-run"] if a.dry_run else [])
            try:
                rc, lines = gpu_check.stream(cmd, sum(LIMITS[c] for c in group) * (3 if a.dry_run else 1), "",
                                             env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"))
            except gpu_check.Stopped:
                stopped = group
                break
            for ln in lines:
                if ln.startswith("RESULT "):
                    _, k, v = ln.split()
                    results[k] = float(v)
            if rc:
                failed += [c for i, c in enumerate(group) if rc == 124 or rc >> i & 1 or rc >= 1 << len(group)]
    if stopped:
        say(f"gpu_perf: stopped by SIGTERM during ({','.join(stopped)}); the summary of the checks that ended")
        failed += [c for c in wanted[wanted.index(stopped[0]):]]
    for line in summarize(results):
        say("gpu_perf: " + line)
    say(f"gpu_perf: {len(wanted) - len(failed)} of {len(wanted)} checks passed in {time.monotonic() - t0:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 143 if stopped else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
