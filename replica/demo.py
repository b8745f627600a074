"""``replica demo``: the whole loop on embedded data, nothing downloaded.

synthetic dataset → prepared store with mean and PCA → train the two-tower as-run net →
evaluate with one view and ten views → say where everything is. Each stage reuses what a
previous run left: the dataset, the store, and a finished (or resumable) training run.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from .analysis import filters, report
from .config import load_config
from .errors import ReplicaError
from .predict import format_eval, run_eval
from .runtime import fast_bf16
from .store import prepare
from .synth import synth
from .train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FULL = dict(train_per_class=400, val_per_class=20)
TINY = dict(train_per_class=4, val_per_class=2)  # seconds: for the tests


def demo(out="replica-demo", tiny: bool = False, devices: str = "auto", progress: bool = True) -> dict:
    out = Path(out)
    sizes = TINY if tiny else FULL
    try:
        data = synth(out / "synth", classes=10, seed=0, progress=progress, **sizes)
    except ReplicaError as e:
        raise ReplicaError(f"{e} (an older demo made it): delete {out}, or run: replica demo --out NEW_FOLDER") from None
    print(f"[1/4] dataset: {data['path']} ({'reused' if data['reused'] else 'written'})")
    meta = prepare(out / "synth", out / "store", progress=progress)
    print(f"[2/4] prepared store with mean image and RGB PCA: {out / 'store'}"
          f"{' (reused)' if 'seconds' not in meta else ''}")
    overrides = dict(data=str(out / "store"), devices=devices)
    first = ("cuda:0" if torch.cuda.is_available() else "cpu") if devices == "auto" else str(devices).split(",")[0]
    overrides["bf16"] = fast_bf16(first)  # the same net and weights in float32; convolutions in bfloat16
    if tiny:
        overrides.update(batch_size=8, epochs=1, steps_per_epoch=2, workers=0)
    cfg = load_config(CONFIGS / "demo.yaml", overrides)
    run = out / "run"
    _check_same_recipe(run, cfg, out)
    if (run / "last.pt").exists() and _finished(run):
        print(f"[3/4] training: {run} (finished earlier, reused)")
    else:
        resume = (run / "last.pt").exists()
        print(f"[3/4] training the two-tower as-run net{' (resuming)' if resume else ''}: {run} "
              f"(bf16 autocast {'on' if cfg.bf16 else 'off: no native bf16 on ' + first})")
        train(cfg, run, resume=resume, progress=progress)
    result = run_eval(run, views=(1, 10), devices=devices, progress=progress)
    print("[4/4] evaluation on the synthetic val set (error; chance is 90% top-1):")
    print(format_eval(result))
    rep = report([run])
    fil = filters([run])[0]
    print(f"\nrun folder: {run}  (config.yaml, metrics.jsonl, last.pt, best.pt, eval.json)")
    print(f"report: {rep}  curves: {rep.parent / 'curves.png'}  conv1 filters by tower: {fil['png']}")
    return result


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

    return bool(load_checkpoint(run / "last.pt")["progress"].get("done"))
