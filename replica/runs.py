"""The run folder contract, and checkpoints that are data, not code.

A run folder holds::

    config.yaml      the resolved configuration
    version.json     code version (git SHA when known), replica, torch, python, machine
    metrics.jsonl    one line per epoch
    last.pt          the newest checkpoint (atomically replaced)
    best.pt          the checkpoint with the lowest one-view validation top-1 error
    eval.json        what `replica eval` measured

Checkpoints hold tensors, numbers, strings, lists and dicts only, and are read with
``torch.load(weights_only=True)``: a crafted file cannot run code, it gets a clear error.
"""
from __future__ import annotations

import json
import os
import pickle
import platform
import subprocess
import zipfile
from pathlib import Path

import torch

from .errors import ReplicaError
from .fileio import atomic_write

CKPT_FORMAT = "replica-checkpoint"
CKPT_VERSION = 1


def save_checkpoint(path: Path, ckpt: dict) -> None:
    atomic_write(path, lambda f: torch.save(ckpt, f))


def best_or_last(path) -> Path:
    """A run folder means its best.pt (else last.pt); a file means itself."""
    path = Path(path)
    if path.is_dir():
        return path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint safely; a run folder means its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise ReplicaError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise ReplicaError(f"{path}: not a readable checkpoint (truncated or corrupt: not a torch.save archive)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling refused"
        raise ReplicaError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                           f"({first[:120]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReplicaError(f"{path}: not a readable checkpoint (truncated or corrupt: {first[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ReplicaError(f"{path}: not a replica checkpoint")
    if ckpt.get("version", 0) > CKPT_VERSION:
        raise ReplicaError(f"{path}: written by a newer replica (checkpoint version {ckpt['version']})")
    return ckpt


def check_compatible(meta: dict, expected: dict, path) -> None:
    """Refuse a checkpoint of another class count, variant or preset, saying which."""
    for key in ("num_classes", "variant", "preset", "norm", "overlap"):
        if key in expected and meta.get(key) != expected[key]:
            raise ReplicaError(f"{path}: checkpoint has {key}={meta.get(key)!r}, but this run has "
                               f"{key}={expected[key]!r}")


def code_version() -> dict:
    root = Path(__file__).resolve().parents[1]
    sha = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha and dirty:
            sha += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    from . import __version__

    return dict(git=sha, replica=__version__, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), node=platform.node())


def append_metrics(run: Path, record: dict) -> None:
    line = json.dumps(record) + "\n"
    try:
        with open(run / "metrics.jsonl", "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ReplicaError(f"cannot write {run / 'metrics.jsonl'}: {os.strerror(e.errno) if e.errno else e}") from None


def read_metrics(run) -> list[dict]:
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
