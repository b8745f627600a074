"""The ``replica`` command line: argv → one call per subcommand, no logic of its own."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import ReplicaError


def _devices(text: str):
    """``auto``, ``cpu``, ``cuda:0`` or a pair ``cuda:0,cuda:1``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _cmd_model(args) -> int:
    from .model import AlexNet
    from .runtime import tune_cpu_allocator
    from .summary import summary

    tune_cpu_allocator()
    model = AlexNet(args.classes, devices=_devices(args.devices), preset=args.preset, variant=args.variant,
                    norm=not args.no_norm, overlap=not args.no_overlap, dropout=not args.no_dropout,
                    init=args.init)
    print(summary(model, batch=args.batch))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replica",
        description="A faithful PyTorch replication of the two-GPU AlexNet (Krizhevsky et al., 2012).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("model", help="build the net, print its layers, parameters and devices, time one step")
    m.add_argument("--preset", default="as-run", choices=["as-run", "paper-text"])
    m.add_argument("--variant", default="two-tower", choices=["two-tower", "one-gpu-half"])
    m.add_argument("--init", default=None, choices=["as-run", "paper-text", "caffe"],
                   help="weight init scheme (default: the preset's)")
    m.add_argument("--no-norm", action="store_true", help="ablation 148: no LRN, no spatial norm")
    m.add_argument("--no-overlap", action="store_true", help="ablation 147: non-overlapping pooling")
    m.add_argument("--no-dropout", action="store_true", help="ablation: dropout off")
    m.add_argument("--classes", type=int, default=1000)
    m.add_argument("--devices", default="auto", help="auto, cpu, cuda:0, or a pair such as cuda:0,cuda:1")
    m.add_argument("--batch", type=int, default=8, help="batch for the timed train step (0 to skip)")
    m.set_defaults(func=_cmd_model)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ReplicaError as e:
        print(f"replica: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("replica: interrupted", file=sys.stderr)
        return 130
