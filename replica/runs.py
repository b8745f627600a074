"""The run folder contract, and checkpoints that are data, not code.

A run folder holds::

    config.yaml      the resolved configuration
    version.json     code version (git SHA when known), replica, torch, python, machine
    metrics.jsonl    one line per epoch
    last.pt          the newest checkpoint (atomically replaced)
    best.pt          the checkpoint with the lowest one-view validation top-1 error (on request)
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


def run_checkpoint(path, which: str = "last") -> Path:
    """A run folder means its final network, last.pt (``which="best"``: best.pt, the lowest
    one-view validation error, chosen on the images it would then be measured on); a file
    means itself. The 2012 figures are the final network's (run 145 was stopped after epoch 91
    and tested), so that is what every command reads unless asked otherwise."""
    if which not in ("last", "best"):
        raise ReplicaError(f"checkpoint: expected 'last' or 'best', got {which!r}")
    path = Path(path)
    if path.is_dir():
        chosen = path / f"{which}.pt"
        if which == "best" and not chosen.exists():
            raise ReplicaError(f"{path}: no best.pt (it is written when a validation error improves, "
                               f"unless the run was trained with save_best=false)")
        return chosen
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


def write_metrics(run: Path, records: list[dict]) -> None:
    """Replace metrics.jsonl with ``records`` (on resume: the checkpoint's own account)."""
    atomic_write(run / "metrics.jsonl", lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def read_metrics(run) -> list[dict]:
    """metrics.jsonl's records; a line torn by a kill mid-write is left out."""
    p = Path(run) / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in out if isinstance(r, dict)]


def log_bad_inputs(run: Path, epoch: int, batch: int, bad, warn: int = 10) -> None:
    """Append each bad input of a training batch to RUN/bad_inputs.tsv; name up to ``warn`` on the console."""
    from tqdm import tqdm

    path = run / "bad_inputs.tsv"
    new = not path.exists()
    try:
        with open(path, "a") as f:
            if new:
                f.write("epoch\tbatch\tinput\treason\n")
            for what, why, _ in bad:
                f.write(f"{epoch + 1}\t{batch}\t{what}\t{why}\n")
    except OSError as e:
        raise ReplicaError(f"cannot write {path}: {os.strerror(e.errno) if e.errno else e}") from None
    for what, why, _ in bad[:max(warn, 0)]:
        tqdm.write(f"warning: skipped {what}: {why} (listed in {path})")
    if 0 < warn <= len(bad):
        tqdm.write(f"warning: further bad inputs are listed in {path} only")
