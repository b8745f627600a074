#!/usr/bin/env python
"""Train each claim's baseline and ablation on one dataset, evaluate each, and write the table.

    python tools/reproduce.py --data STORE [--epochs 91] [--seeds 0] [--out runs/reproduce]
                              [--ablations no-norm no-overlap ...] [--baseline NAME] [key=value ...]
    python tools/reproduce.py --tiny --data STORE     # seconds per run, 1/16 width: a check that it all runs

Each of the paper's claims (replica.report.CLAIMS) is measured against its own baseline recipe:
run 145's (``configs/alexnet-2gpu.yaml``) for LRN, overlapping pooling, PCA noise and dropout;
run 145-2010's (``configs/alexnet-2010.yaml``) for two GPUs, as the original pair 145-half −
145-2010 was. An ablation is its baseline's config plus the claim's one change, in
``OUT/<ablation>-seed<S>``; each baseline in ``OUT/<baseline>-seed<S>``. ``--baseline NAME``
pairs every ablation with ``configs/NAME.yaml`` instead (``demo``: minutes a run on a CPU), and
the report says where that is not the claim's recipe.
A run that exists is resumed (or reused if finished), so the script can be stopped and restarted.
The report (``OUT/report.md``, ``OUT/curves.png``) pairs each ablation with its baseline by
seed and names the baseline on each row, beside the paper's claim and the original runs' pair.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replica.report import CLAIMS, report  # noqa: E402
from replica.config import load_config, parse_overrides  # noqa: E402
from replica.errors import ReplicaError  # noqa: E402
from replica.inference import run_eval  # noqa: E402
from replica.runtime import tune_cpu_allocator  # noqa: E402
from replica.train import train  # noqa: E402

ABLATIONS = [c.config for c in CLAIMS]
# --baseline: any recipe in configs/ (the demo's for a CPU-scale ablation: docs/analysis.md)
RECIPES = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
# --tiny: the plumbing, not the figures: one step of the net at 1/16 of its width (a 2 MB checkpoint
# a run, not 456 MB: six runs took 2.6 GB at full width), He's init scale (at that width the paper's
# gives every image the same output: predictions and verdicts would say nothing), no best.pt
TINY = dict(batch_size=4, epochs=1, steps_per_epoch=1, workers=0, val_batches=1, save_best=False, width=0.0625,
            init="he", tensorboard=False, live=False)


def plan(ablations=ABLATIONS, baseline=None) -> list[tuple[str, str, dict]]:
    """(run name, the config it starts from, its change) of each run a seed needs: the baselines
    first (run 145's recipe first of all: the report's fallback), then the ablations."""
    claims = [c for c in CLAIMS if c.config in ablations]
    bases = [baseline] if baseline else sorted({c.baseline for c in claims} | {"alexnet-2gpu"},
                                               key=lambda b: b != "alexnet-2gpu")
    return [(b, b, {}) for b in bases] + [(c.config, baseline or c.baseline, {c.key: c.value}) for c in claims]


def reproduce(data, out, epochs=None, seeds=(0,), ablations=ABLATIONS, overrides=(), tiny=False, progress=True,
              baseline=None):
    out = Path(out)
    extra = dict(TINY) if tiny else {}
    if epochs is not None:
        extra["epochs"] = epochs
    extra.update(parse_overrides(overrides))
    runs = []
    for seed in seeds:
        for name, start, change in plan(ablations, baseline):
            cfg = load_config(ROOT / "configs" / f"{start}.yaml", dict(extra, **change, data=str(data), seed=seed))
            run = out / f"{name}-seed{seed}"
            print(f"== {run.name}" + (f" ({start} + {', '.join(f'{k}={v}' for k, v in change.items())})"
                                      if change else ""), flush=True)
            train(cfg, run, resume=(run / "last.pt").exists(), progress=progress)
            run_eval(run, views=(1, 10), progress=progress, batch=8 if tiny else 32)
            runs.append(run)
    return report(runs, out)


OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*=")  # a config override (a path such as runs/x=1 is not one)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared store (or image folder)")
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ablations", nargs="*", default=ABLATIONS, choices=ABLATIONS)
    p.add_argument("--baseline", choices=RECIPES, default=None, metavar="RECIPE",
                   help="pair every ablation with configs/RECIPE.yaml (default: each claim's own, as the original "
                        "runs were; demo: a CPU-scale ablation)")
    p.add_argument("--tiny", action="store_true", help="one step per run of the net at 1/16 width: checks the whole path in seconds")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, in any position")
    argv = list(sys.argv[1:] if argv is None else argv)
    # key=value anywhere: after --seeds or --ablations too, whose nargs would otherwise take them
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = p.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = overrides
    tune_cpu_allocator()
    try:
        path = reproduce(args.data, args.out, args.epochs, args.seeds, args.ablations, args.overrides, args.tiny,
                         baseline=args.baseline)
    except ReplicaError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
