"""The ``replica`` command line: argv → one call per subcommand, no logic of its own."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import INITS, PRESETS, VARIANTS
from .errors import ReplicaError


DEVICES_HELP = "auto (two GPUs, else one, else the CPU), cpu, cuda:0, or a pair such as cuda:0,cuda:1"


def _split_settings(items) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: an argument with ``=`` is an override, the first other one a config."""
    config = [a for a in items if "=" not in a]
    if len(config) > 1:
        raise ReplicaError(f"expected one CONFIG and key=value overrides, got {len(config)} configs: {config}")
    return (config[0] if config else None), [a for a in items if "=" in a]


def _cmd_model(args) -> int:
    from .config import load_config
    from .model import AlexNet
    from .summary import summary

    config, overrides = _split_settings(args.settings)
    flags = [f"{k}={getattr(args, k)}" for k in ("preset", "variant", "init", "width") if getattr(args, k) is not None]
    flags += [f"{k}=false" for k in ("norm", "overlap", "dropout") if getattr(args, f"no_{k}")]
    cfg = load_config(config, flags + overrides)  # the net a training config describes, key=value as in train
    model = AlexNet.from_options(cfg.net, args.classes, devices=args.devices, grouped=cfg.grouped)
    print(summary(model, batch=args.batch, bf16=cfg.bf16))
    return 0


def _cmd_synth(args) -> int:
    from .data.synth import synth

    r = synth(args.out, args.classes, args.train_per_class, args.val_per_class, args.seed, args.workers)
    n = r["classes"] * (r["train_per_class"] + r["val_per_class"])
    print(f"{'reused' if r['reused'] else 'wrote'} {n:,} images ({r['classes']} classes) in {r['path']} "
          f"(train/ and val/, 256×256 JPEG)")
    return 0


def _cmd_prepare(args) -> int:
    from .data.writer import prepare

    m = prepare(args.src, args.out, val=args.val, size=args.size, workers=args.workers, chunk=args.chunk,
                fmt=args.format, quality=args.quality)
    used = ", ".join(f"{k} {v['used']:,}/{v['total']:,}" for k, v in m["splits"].items())
    print(f"prepared {args.out} ({m.get('format', 'raw')}): {len(m['classes'])} classes; {used} images; "
          f"{m['skipped']} skipped"
          + (" (listed in skipped.tsv)" if m["skipped"] else "")
          + (f"; resumed after {m['resumed_chunks']} finished chunks" if m.get("resumed_chunks") else ""))
    return 0


def _cmd_stats(args) -> int:
    from .data.store import describe_stats

    print(describe_stats(args.store))
    return 0


def _cmd_train(args) -> int:
    import yaml

    from .config import load_config
    from .train import train

    if args.resume:
        run = Path(args.resume)
        if not (run / "config.yaml").exists():
            raise ReplicaError(f"{run}: not a run folder (no config.yaml)")
        if args.config or args.overrides:
            raise ReplicaError("--resume continues a run as it was configured; give no CONFIG or overrides")
        cfg = load_config(None, {}, base=yaml.safe_load((run / "config.yaml").read_text()))
        result = train(cfg, run, resume=True)
    else:
        if not args.config:
            raise ReplicaError("give a CONFIG (e.g. configs/demo.yaml) or --resume RUN_DIR")
        if "=" in args.config and not Path(args.config).exists():
            raise ReplicaError(f"the first argument is the CONFIG (a file, or a preset name such as alexnet-2gpu or "
                               f"demo); {args.config!r} is an override: give it after the CONFIG")
        cfg = load_config(args.config, args.overrides)
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        if (out / "last.pt").exists():
            raise ReplicaError(f"{out} already holds a run; continue it with --resume {out}, or choose --out")
        result = train(cfg, out)
        run = out
    if not result.get("stopped") and os.environ.get("RANK", "0") == "0":
        kept = [n for n in ("metrics.jsonl", "last.pt", "best.pt") if (run / n).exists()]  # save_best=false: no best.pt
        print(f"finished: {run} ({', '.join(kept)})")
    return stop_status(result.get("stopped"))


# A run stopped by a signal (saved, resumable) is not a finished one: a shell's `&&` or a cluster's
# requeue script must be able to tell. The codes a shell gives a process ended by the signal.
STOP_STATUS = {"SIGINT": 130, "SIGTERM": 143}


def stop_status(stopped) -> int:
    """0 for a finished run; 130 after SIGINT, 143 after SIGTERM (or a signal another process of
    the job got). Under torchrun only rank 0 says so: another rank's non-zero exit would make
    torchrun end rank 0, perhaps before its checkpoint is written."""
    if not stopped or os.environ.get("RANK", "0") != "0":
        return 0
    return STOP_STATUS.get(stopped, 143)


def _cmd_eval(args) -> int:
    from .inference import format_eval, run_eval

    views = (1, 10) if args.views is None else (args.views,)
    if args.per_view and 10 not in views:
        raise ReplicaError("--per-view: each of the ten views' figures needs the ten views (leave out --views 1)")
    how = dict(bf16=False if args.fp32 else None, checkpoint=args.checkpoint, split=args.split, workers=args.workers,
               graph=args.graph, per_view=args.per_view)
    if len(args.target) > 1 or args.out or args.weights:
        from .inference import run_ensemble_eval

        r = run_ensemble_eval(args.target, args.data, views, args.devices, args.batch, out=args.out,
                              weights=args.weights, **how)
    else:
        r = run_eval(args.target[0], args.data, views, args.devices, args.batch, **how)
    print(format_eval(r))
    if r.get("record") and r.get("ensemble"):
        print(f"wrote {r['record']}")
    return 0


def _cmd_predict(args) -> int:
    from .inference import predict

    from .data.imageio import is_image_name

    images = []
    for item in args.images:  # a folder means every image in it (sorted, its subfolders too)
        if Path(item).is_dir():
            found = sorted(str(f) for f in Path(item).rglob("*") if f.is_file() and is_image_name(f.name))
            if not found:
                raise ReplicaError(f"{item}: a folder with no image files in it")
            images += found
        else:
            images.append(item)
    failed = 0
    for path, result in predict(args.checkpoint, images, args.topk, args.views, args.devices):
        if isinstance(result, str):
            print(f"replica: error: {path}: {result}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in result))
    return 1 if failed else 0


def _cmd_demo(args) -> int:
    from .demo import demo

    result = demo(args.out, tiny=args.tiny, devices=args.devices, fp32=args.fp32)
    return stop_status(result.get("stopped"))


def _cmd_filters(args) -> int:
    from .filters import filters, format_filters

    print(format_filters(filters(args.runs, args.out)))
    return 0


def _cmd_report(args) -> int:
    from .report import report

    path = report(args.runs, args.out)
    print(f"wrote {path} and {path.parent / 'curves.png'}")
    return 0


def _cmd_import(args) -> int:
    from .weights import BVLC_BAND, BVLC_SHA1, import_weights

    src = import_weights(args.file, args.out, mean=args.mean, classes=args.classes, data=args.data, crop=args.crop,
                         fmt=args.format, force=args.force)
    same = "matches the BVLC readme's" if src["matches_bvlc"] else f"not the BVLC release's ({BVLC_SHA1[:12]}…)"
    print(f"imported {args.file} ({src['format']}, {src['schema']}) into {args.out}: sha1 {src['sha1']}, {same}; "
          f"mean from {src['mean_from']}; classes from {src['classes_from']}")
    if src.get("removed"):
        print(f"--force: removed the previous run's {', '.join(src['removed'])} from {args.out}")
    b1, b5 = BVLC_BAND["top1_err"], BVLC_BAND["top5_err"]
    expect = (f" (bvlc_alexnet's one view on ILSVRC-2012 val: top-1 error {b1[0]}-{b1[1]} %, top-5 {b5[0]}-{b5[1]} % "
              f"expected; docs/analysis.md)") if src["matches_bvlc"] else ""
    print(f"next: replica eval {args.out} --data STORE{expect}, replica filters {args.out}")
    return 0


def _cmd_export(args) -> int:
    from .export import export_onnx

    r = export_onnx(args.run, args.onnx, checkpoint=args.checkpoint, raw_net=args.raw_net, check=not args.no_check,
                    opset=args.opset)
    print(f"wrote {r['path']} ({r['bytes'] / 1e6:,.1f} MB, opset {r['opset']}, input {r['input']}, "
          f"{r['lrn_nodes']} LRN nodes)")
    if r.get("check"):
        c = r["check"]
        print(f"checked with onnxruntime {c['onnxruntime']}: max |Δlogit| {c['max_abs_diff']:.2e} "
              f"(tolerance {c['tolerance']:.2e}) over {c['images']} random images; top-1 agrees: {c['top1_agree']}")
    return 0


def _cmd_neighbors(args) -> int:
    from .neighbors import neighbors

    dest = neighbors(args.run, args.queries, args.k, args.data, args.out, args.devices)
    print(dest.with_suffix(".txt").read_text(), end="")
    print(f"wrote {dest} (rows: a validation image, then its nearest training images) and {dest.with_suffix('.txt')}")
    return 0


TRAIN_EPILOG = """\
Watching a run: RUN/curves.png and RUN/filters.png are redrawn at each epoch's end (live=false:
not); with TensorBoard installed (pip install -e '.[tensorboard]' in replica's folder), RUN/tb/ holds the loss,
learning rates, images/s, validation errors, each tower's colour specificity and conv1 kernels:
tensorboard --logdir runs/ (tensorboard=false: not written). docs/training.md lists the tags.

Exit status: 0 finished; 130 after Ctrl-C (SIGINT) and 143 after SIGTERM, once the checkpoint is
saved (continue with --resume RUN); 2 an error, said in one line.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replica",
        description="A faithful PyTorch replication of the two-GPU AlexNet (Krizhevsky et al., 2012).",
    )
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log more detail (before or after the command)")
    p.add_argument("--version", action="version", version=f"replica {__version__} (the distribution replica-alexnet)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="the whole loop on a synthetic dataset: make, prepare, train, evaluate")
    d.add_argument("--out", default="replica-demo", help="folder for the dataset, store and run")
    d.add_argument("--tiny", action="store_true", help="a seconds-long version (what the tests run)")
    d.add_argument("--devices", default="auto", help=DEVICES_HELP)
    d.add_argument("--fp32", action="store_true",
                   help="train in float32 even where the CPU has native bf16 (as most CPUs train)")
    d.set_defaults(func=_cmd_demo)

    m = sub.add_parser("model", help="build the net, print its layers, parameters and devices, time one step",
                       description="The net a config describes: replica model [CONFIG] [key=value ...], the same "
                                   "CONFIG and overrides as train (e.g. replica model no-norm, replica model "
                                   "preset=paper-text width=0.5); the flags below are the same switches.")
    m.add_argument("settings", nargs="*", metavar="[CONFIG] [key=value]",
                   help="a YAML config and/or overrides, as for train; only the net's keys matter here")
    m.add_argument("--preset", default=None, choices=list(PRESETS), help="what the net computes (default as-run: run 145)")
    m.add_argument("--variant", default=None, choices=list(VARIANTS),
                   help="two towers (default), run 145-half's one, or run 146's six conv layers (Table 2's 1 CNN*)")
    m.add_argument("--init", default=None, choices=list(INITS), help="weight init scheme (default: the preset's)")
    m.add_argument("--no-norm", action="store_true", help="ablation 148: no LRN, no spatial norm")
    m.add_argument("--no-overlap", action="store_true", help="ablation 147: non-overlapping pooling")
    m.add_argument("--no-dropout", action="store_true", help="ablation: dropout off")
    m.add_argument("--classes", type=int, default=1000, help="fc8's outputs (default 1000)")
    m.add_argument("--width", type=float, default=None, help="every layer's filters and units × this (1: the paper's net)")
    m.add_argument("--devices", default="auto", help="auto, cpu, cuda:0, or a pair such as cuda:0,cuda:1")
    m.add_argument("--batch", type=int, default=8,
                   help="batch for the timed train step, then the kernels a step dispatches (0: neither)")
    m.set_defaults(func=_cmd_model)

    s = sub.add_parser("synth", help="write the deterministic synthetic dataset (shape × colour classes)")
    s.add_argument("out", help="output folder (gets train/ and val/ class folders)")
    s.add_argument("--classes", type=int, default=10, help="shape × colour classes (default 10)")
    s.add_argument("--train-per-class", type=int, default=100, help="training images per class (default 100)")
    s.add_argument("--val-per-class", type=int, default=20, help="validation images per class (default 20)")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes the same images")
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.set_defaults(func=_cmd_synth)

    pr = sub.add_parser("prepare", help="resize once to 256×256 into a store, with the mean image and RGB PCA")
    pr.add_argument("src", help="class-folder tree (train/ + val/), a 'path label' txt index, or CIFAR-10 batches")
    pr.add_argument("out", help="store folder to write (an interrupted run resumes here)")
    pr.add_argument("--val", default=None, help="validation source, if SRC does not hold one")
    pr.add_argument("--size", type=int, default=256, help="stored image size (default 256)")
    pr.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs this process may use)")
    pr.add_argument("--chunk", type=int, default=64, help="images per unit of work and of resumption")
    pr.add_argument("--format", choices=["auto", "raw", "jpeg"], default="auto",
                    help="raw uint8 rows (196,608 bytes an image) or JPEG (~28 KB at quality 90); auto: JPEG from "
                         "50,000 images on (ImageNet: ~36 GB instead of 262 GB), raw below")
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality of --format jpeg (default 90)")
    pr.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="train per a config: replica train CONFIG [key=value ...] [--out RUN_DIR]",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    t.add_argument("config", nargs="?", help="a YAML preset from configs/ (holds only its differences)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data=store epochs=10")
    t.add_argument("--out", help="run folder (default: runs/<config name>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="top-1/top-5 error with one view and ten views")
    e.add_argument("target", nargs="+",
                   help="a run folder (its final network, last.pt) or a checkpoint file; several: their ensemble "
                        "(Table 2's '5 CNNs': the probabilities averaged), each member's figures beside it")
    e.add_argument("--out", help="with several targets: the folder for the ensemble's eval.json")
    e.add_argument("--weights", type=float, nargs="+", default=None,
                   help="with several targets: one coefficient each, Σ c_k·P_k (default: the plain average)")
    e.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="of a run folder: last (the final network, as the 2012 run was tested; default) or best "
                        "(lowest validation error during training: chosen on these same images, so optimistic)")
    e.add_argument("--data", help="prepared store or image folder (default: the run's validation data)")
    e.add_argument("--split", choices=["val", "test", "train"], default="val",
                   help="val (default; an error if the data has none), test (ILSVRC-2010's labelled test set, "
                        "the paper's Table 1) or train (reported as training images)")
    e.add_argument("--views", type=int, choices=[1, 10], default=None,
                   help="only this many views (default: both, from one pass of ten views)")
    e.add_argument("--per-view", action="store_true",
                   help="each of the ten views' own top-1/top-5 error as well (the corners, the centre, each "
                        "flipped), from the same pass: where the ten-view average gains or loses")
    e.add_argument("--batch", type=int, default=None,
                   help="images per forward pass, each giving ten views (default: 256 on a GPU, 32 on the CPU)")
    e.add_argument("--workers", type=int, default=2, help="loader processes reading the images")
    e.add_argument("--devices", default="auto", help=DEVICES_HELP)
    e.add_argument("--graph", action="store_true",
                   help="on a GPU, replay each batch's forward from a CUDA graph (the same figures; not yet measured "
                        "on a GPU, so off by default); ignored on the CPU")
    e.add_argument("--fp32", action="store_true",
                   help="evaluate in float32 even if the run trained with bf16=true (default: as it trained, "
                        "where the device has native bf16)")
    e.set_defaults(func=_cmd_eval)

    pd = sub.add_parser("predict", help="top-k classes of images, in any format PIL reads")
    pd.add_argument("checkpoint", help="a checkpoint file or a run folder")
    pd.add_argument("images", nargs="+", help="image files, or folders: every image in them")
    pd.add_argument("--topk", type=int, default=5, help="classes to print per image (default 5)")
    pd.add_argument("--views", type=int, choices=[1, 10], default=1, help="1: the centre crop; 10: the paper's ten views, averaged")
    pd.add_argument("--devices", default="auto", help=DEVICES_HELP)
    pd.set_defaults(func=_cmd_predict)

    rp = sub.add_parser("report", help="Markdown + curves: final errors, config differences, the paper's numbers")
    rp.add_argument("runs", nargs="+", help="run folders; with several, the first is the baseline of an ablation table")
    rp.add_argument("--out", help="folder for report.md and curves.png (default: the first run)")
    rp.set_defaults(func=_cmd_report)

    fl = sub.add_parser("filters", help="Fig. 3: per-tower conv1 kernels as a PNG, and their colour specificity")
    fl.add_argument("runs", nargs="+", help="run folders (last.pt) or checkpoints; several seeds test 'every run'")
    fl.add_argument("--out", help="folder for the PNGs (default: beside each checkpoint)")
    fl.set_defaults(func=_cmd_filters)

    nb = sub.add_parser("neighbors", help="Fig. 4: validation images and their nearest training images by fc7")
    nb.add_argument("run", help="a run folder (last.pt) or a checkpoint")
    nb.add_argument("--queries", type=int, default=8, help="validation images, one row each (default 8)")
    nb.add_argument("--k", type=int, default=6, help="nearest training images per row (default 6)")
    nb.add_argument("--data", help="store or image folder (default: the run's data)")
    nb.add_argument("--out", help="PNG path (default: RUN/neighbors.png)")
    nb.add_argument("--devices", default="auto", help=DEVICES_HELP)
    nb.set_defaults(func=_cmd_neighbors)

    im = sub.add_parser("import", help="Caffe's trained bvlc_alexnet (caffemodel or ONNX zoo) into a run folder",
                        description="Reads bvlc_alexnet.caffemodel (or the ONNX zoo's bvlcalexnet-*.onnx) into the "
                                    "two towers (preset caffe) and writes a run folder that eval, predict, filters, "
                                    "neighbors, report and export read.")
    im.add_argument("file", help="a .caffemodel, or an .onnx of the ONNX model zoo")
    im.add_argument("--out", required=True, help="the run folder to write")
    im.add_argument("--mean", help="a .binaryproto or .npy mean image (BGR, as Caffe's), B,G,R values such as "
                                   "104,117,123, or a store (default: --data's mean)")
    im.add_argument("--classes", help="Caffe's synset_words.txt: its line order is fc8's")
    im.add_argument("--data", help="a store: its classes (sorted WNIDs, Caffe's order assumed) and mean")
    im.add_argument("--crop", type=int, default=227, choices=[227, 224],
                    help="227: Caffe's; 224: the ONNX zoo graph's geometry")
    im.add_argument("--format", default="auto", choices=["auto", "caffe", "onnx"], help="auto: by the file's suffix")
    im.add_argument("--force", action="store_true", help="replace a run already in --out")
    im.set_defaults(func=_cmd_import)

    ex = sub.add_parser("export", help="a run's net as one ONNX file, checked by onnxruntime")
    ex.add_argument("run", help="a run folder (last.pt) or a checkpoint")
    ex.add_argument("--onnx", required=True, help="the .onnx file to write")
    ex.add_argument("--checkpoint", default="last", choices=["last", "best"], help="of a run folder: last.pt (default) or best.pt")
    ex.add_argument("--raw-net", action="store_true", help="input mean-subtracted crops (default: 0-255 RGB crops, "
                                                           "the mean subtracted inside)")
    ex.add_argument("--opset", type=int, default=18, help="the ONNX opset to write: 18 (default) or newer")
    ex.add_argument("--no-check", action="store_true", help="skip the check against onnxruntime")
    ex.set_defaults(func=_cmd_export)

    st = sub.add_parser("stats", help="print a store's counts, mean image and RGB eigen-system")
    st.add_argument("store", help="a store folder written by replica prepare")
    st.set_defaults(func=_cmd_stats)
    for sp in sub.choices.values():  # -v after the command too: replica train … -v
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more detail")
    return p


def entry(argv=None) -> None:
    """The ``replica`` command (and ``python -m replica``): :func:`main`, then exit.

    Before exiting, ``gc.freeze()``: with torch imported, the interpreter's shutdown spent about
    0.8 s of every command collecting the objects of its modules (``python -c "import torch"``
    2.49 s, with ``gc.freeze()`` last 1.74 s, on 2 cores). Everything is still finalized as
    before (files closed, atexit handlers run); the cycle collector skips what is alive now.
    """
    import gc

    try:
        code = main(argv)
    except BrokenPipeError:  # `replica model | head`: the reader has gone; as a shell tool exits (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's own flush must not fail
        code = 141
    gc.freeze()
    raise SystemExit(code)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose = getattr(args, "verbose", False)
    # replica's own lines at INFO (-v: DEBUG); the libraries' at WARNING (-v: INFO): the ONNX
    # exporter's optimizer alone logs some fifty INFO lines per export
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("replica").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from .runtime import tune_cpu_allocator

    tune_cpu_allocator()  # every command: eval, filters and neighbors run the net on big batches too
    try:
        return args.func(args)
    except ReplicaError as e:
        if e.quiet:  # a stop taken by every process of a torchrun job: rank 0 says it and exits non-zero;
            return 0  # the others exit 0, since torchrun would kill rank 0 at another's failure, mid-sentence
        print(f"replica: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("replica: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout has gone: entry() exits 141 as a shell tool does
        raise
    except OSError as e:  # a path mistake or the disk (read-only, a file where a folder goes, full): one line
        if args.verbose:
            logging.getLogger("replica").exception("replica: %s", e)
        where = e.filename if e.filename is not None else ""
        other = f" → {e.filename2}" if getattr(e, "filename2", None) else ""
        why = e.strerror or str(e) or type(e).__name__
        print(f"replica: error: {where}{other}{': ' if where else ''}{why}", file=sys.stderr)
        return 2
