"""``replica demo``: the whole loop on embedded data, nothing downloaded.

synthetic dataset → prepared store with mean and PCA → train the two-tower as-run net →
evaluate with one view and ten views → say where everything is. Each stage reuses what a
previous run left: the dataset, the store, and a finished (or resumable) training run.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from .filters import filters
from .report import report
from .config import load_config
from .errors import ReplicaError
from .inference import format_eval, run_eval
from .runtime import cpu_description, fast_bf16
from .data.writer import prepare
from .data.synth import synth
from .train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASSES = 6  # 3 shapes × 3 colours, each in two classes: neither alone suffices (docs/demo.md)
FULL = dict(train_per_class=200, val_per_class=84)  # 504 val images
TINY = dict(train_per_class=4, val_per_class=2)  # seconds: for the tests


def demo(out="replica-demo", tiny: bool = False, devices: str = "auto", progress: bool = True,
         fp32: bool = False) -> dict:
    """``fp32``: train in float32 even where the device has native bf16 (what most CPUs get)."""
    t0 = t = time.time()
    out = Path(out)

    def took() -> str:  # seconds since the previous stage ended
        nonlocal t
        dt, t = time.time() - t, time.time()
        return f"{dt:.0f} s"
    sizes = TINY if tiny else FULL
    try:
        data = synth(out / "synth", classes=CLASSES, seed=0, progress=progress, **sizes)
    except ReplicaError as e:
        raise ReplicaError(f"{e} (an older demo made it): delete {out}, or run: replica demo --out NEW_FOLDER") from None
    print(f"[1/4] dataset: {data['path']} ({'reused' if data['reused'] else 'written'}, {took()})")
    meta = prepare(out / "synth", out / "store", progress=progress)
    print(f"[2/4] prepared store with mean image and RGB PCA: {out / 'store'} "
          f"({'reused, ' if 'seconds' not in meta else ''}{took()})")
    overrides = dict(data=str(out / "store"), devices=devices)
    first = ("cuda:0" if torch.cuda.is_available() else "cpu") if devices == "auto" else str(devices).split(",")[0]
    overrides["bf16"] = not fp32 and fast_bf16(first)  # the same net and weights in float32; convolutions in bfloat16
    if tiny:
        overrides.update(batch_size=8, epochs=1, steps_per_epoch=2, workers=0)
    cfg = load_config(CONFIGS / "demo.yaml", overrides)
    run = out / "run"
    _check_same_recipe(run, cfg, out)
    if (run / "last.pt").exists() and _finished(run):
        print(f"[3/4] training: {run} (finished earlier, reused)")
    else:
        resume = (run / "last.pt").exists()
        why = "--fp32 given" if fp32 else "no native bf16 on " + first
        print(f"[3/4] training the two-tower as-run net{' (resuming)' if resume else ''}: {run} "
              f"(bf16 autocast {'on' if cfg.bf16 else 'off: ' + why})")
        done = train(cfg, run, resume=resume, progress=progress)
        if done.get("stopped"):  # Ctrl-C or SIGTERM: saved; nothing to evaluate yet
            again = "replica demo" + ("" if str(out) == "replica-demo" else f" --out {out}") + (" --fp32" if fp32 else "")
            print(f"demo stopped before the end of training; run `{again}` again to resume it")
            return dict(stopped=done["stopped"])
        print(f"      trained in {took()}")
    result = run_eval(run, views=(1, 10), devices=devices, progress=progress,
                      workers=cfg.workers if cfg.workers is not None else 2)
    print(f"[4/4] evaluation on the synthetic val set ({took()}; error; chance is {1 - 1 / CLASSES:.0%} top-1, "
          "colour alone or shape alone 50%):")
    print(format_eval(result))
    rep = report([run])
    fil = filters([run])[0]
    print(summary(out, run, rep, fil, time.time() - t0, "bf16 autocast" if cfg.bf16 else "float32"))
    return result


def summary(out: Path, run: Path, rep: Path, fil: dict, seconds: float, precision: str) -> str:
    """Every file the demo wrote, what the filter picture can and cannot show yet (its caption),
    what to run next."""
    m, s = divmod(round(seconds), 60)
    return "\n".join([
        f"\ndone in {m} min {s:02d} s ({precision}; {cpu_description()}). Files:",
        f"  {out / 'synth'}/{{train,val}}/<class>/*.jpg   the synthetic images (shape × colour classes)",
        f"  {out / 'store'}/   the prepared store: images, mean image (mean.png), RGB PCA (pca.json)",
        f"  {run}/config.yaml, metrics.jsonl   the run's settings and its epoch-by-epoch record",
        f"  {run}/last.pt   the final network (the demo keeps no best.pt: save_best=false)",
        f"  {run}/eval.json   the figures above and how they were measured",
        f"  {rep}, {rep.parent / 'curves.png'}   the report and its curves",
        f"  {fil['png']}   conv1's kernels, tower a left, tower b right",
        "What the filter picture shows (its caption):",
        *(f"  {line}" for line in fil["caption"]),
        "Next:",
        f"  replica report {run}          the report again (add more runs to compare them)",
        f"  replica filters {run}         conv1's kernels and each tower's colour specificity",
        f"  replica predict {run} {_example(out)}   the top classes of any image",
        "  replica prepare MY_IMAGES/ MY_STORE/ && replica train configs/demo.yaml data=MY_STORE --out runs/mine",
        "                                   your own data (class folders with train/ and val/) with the demo's",
        "                                   CPU-sized recipe; configs/alexnet-2gpu.yaml is the paper's 91 epochs at",
        "                                   full width: days on GPUs, not a CPU (docs/imagenet.md)",
    ])


def _example(out: Path) -> str:
    first = sorted((out / "synth" / "val").glob("*/*.jpg"))[:1]
    return str(first[0]) if first else "IMAGE.jpg"


def _check_same_recipe(run: Path, cfg, out: Path) -> None:
    """A run folder left by another demo recipe is neither reused nor resumed: say so."""
    if not (run / "config.yaml").exists():
        return
    try:
        old = load_config(None, yaml.safe_load((run / "config.yaml").read_text())).to_dict()
    except (ReplicaError, OSError, yaml.YAMLError):
        old = {}
    new = cfg.to_dict()
    changed = sorted(k for k in new if k not in ("devices", "workers", "data", "val_data") and old.get(k) != new[k])
    if changed:
        raise ReplicaError(f"{run} was trained with another demo recipe (differs in {', '.join(changed[:6])}); "
                           f"delete {out}, or run: replica demo --out NEW_FOLDER")


def _finished(run: Path) -> bool:
    from .runs import load_checkpoint

    return bool(load_checkpoint(run / "last.pt").progress.done)
