"""The run folder contract, and checkpoints that are data, not code.

A run folder holds::

    config.yaml      the resolved configuration
    version.json     code version (git SHA when known), replica, torch, python, machine
    metrics.jsonl    one line per epoch
    last.pt          the newest checkpoint (atomically replaced)
    best.pt          the checkpoint with the lowest one-view validation top-1 error (on request)
    eval.json        what `replica eval` measured the paper's way (last.pt, val, one and ten views)
    eval-*.json      each other way (e.g. eval-best-val-1view.json), one file per way
    .train.lock      held (flock) by the process writing the folder: one trainer per run

A checkpoint is a :class:`Checkpoint`: what it holds is declared there, once, and every reader
(train's resume, eval, predict, filters, neighbours, the demo) goes through it, never through raw
keys. On disk it holds tensors, numbers, strings, lists and dicts only, and is read with
``torch.load(weights_only=True)``: a crafted file cannot run code, it gets a clear error.
Version 1 (before the net's options were one record) still loads.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import pickle
import platform
import random
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import NetOptions
from .errors import ReplicaError
from .fileio import atomic_write

TRAIN_LOCK = ".train.lock"  # held by the one process that writes a run folder (train's rank 0, import)
CKPT_FORMAT = "replica-checkpoint"
CKPT_VERSION = 2  # 2: the net's options as one record ("net"), the data's in "data"; 1: both in "meta"


@dataclass
class Progress:
    """Where a run stands: epochs done, steps into the next, steps in all, the best one-view
    validation error so far, whether it finished; the metrics lines so far (metrics.jsonl is
    rewritten from them on resume) and the running sums of an epoch stopped part-way."""

    epoch: int = 0
    in_epoch: int = 0
    step: int = 0
    best: float = math.inf
    done: bool = False
    records: list = field(default_factory=list)
    partial: dict | None = None  # Tally.partial()


@dataclass
class Checkpoint:
    """What a checkpoint holds.

    The net: ``net`` (its options) and ``model`` (its ``state_dict``, on the CPU), with ``classes``
    (fc8's outputs, in order), their ``names`` and the ``dataset`` when known. The input: ``mean``
    (the mean image, 3×256×256), ``crop`` (the input size), ``pca`` (the colour noise's
    eigenvectors). The run: ``config`` (the resolved config, as a dict), ``progress``, the
    optimizer's ``momentum``, the ``schedule``'s state, and ``rng``: one RNG state per process
    (:func:`rng_state`). ``source``: where the weights came from when not trained here.
    """

    net: NetOptions
    classes: list
    model: dict
    mean: torch.Tensor
    crop: int = 224
    names: list | None = None
    dataset: str | None = None
    pca: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    momentum: dict | None = None
    velocity: dict | None = None  # before the fused optimizer (version 1): velocities only
    schedule: dict | None = None
    rng: list = field(default_factory=list)
    source: dict | None = None
    path: Path | None = None  # where it was read from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def bf16(self) -> bool:
        """Whether it trained under bf16 autocast."""
        return bool(self.config.get("bf16"))

    def to_dict(self) -> dict:
        return dict(format=CKPT_FORMAT, version=CKPT_VERSION, net=self.net.to_dict(),
                    data=dict(classes=list(self.classes), names=list(self.names) if self.names else None,
                              dataset=self.dataset, crop=self.crop),
                    model=self.model, mean=self.mean, pca=self.pca, config=self.config,
                    progress=dataclasses.asdict(self.progress), momentum=self.momentum, schedule=self.schedule,
                    rng=self.rng, source=self.source)

    @classmethod
    def from_dict(cls, d: dict, path=None) -> "Checkpoint":
        if d.get("version", 0) >= 2:
            net, data = NetOptions.from_dict(d["net"]), d["data"]
        else:  # version 1: the net's options and the data's in one "meta" record
            net, data = NetOptions.from_dict(d.get("meta", {})), d.get("meta", {})
        known = {f.name for f in dataclasses.fields(Progress)}
        return cls(net=net, classes=list(data.get("classes") or []), model=d.get("model", {}), mean=d.get("mean"),
                   crop=data.get("crop", 224), names=data.get("names"), dataset=data.get("dataset"),
                   pca=d.get("pca") or {}, config=d.get("config") or {},
                   progress=Progress(**{k: v for k, v in (d.get("progress") or {}).items() if k in known}),
                   momentum=d.get("momentum"), velocity=d.get("velocity"), schedule=d.get("schedule"),
                   rng=list(d.get("rng") or []), source=d.get("source"), path=Path(path) if path else None)


@dataclass
class Tally:
    """One epoch's running sums, what its metrics line is made of. A checkpoint taken part-way
    keeps them (:meth:`partial`), so the line of a resumed epoch counts every step once."""

    loss_sum: float = 0.0
    loss_n: int = 0
    seen: int = 0  # images, all processes
    skipped: int = 0  # bad inputs
    before: float = 0.0  # seconds spent on this epoch before a resume
    started: float = 0.0

    def __post_init__(self):
        self.started = time.time()

    @classmethod
    def from_partial(cls, p: dict) -> "Tally":
        return cls(p["loss_sum"], p["loss_n"], p["seen"], p["skipped"], p["seconds"])

    def partial(self) -> dict:
        return dict(loss_sum=self.loss_sum, loss_n=self.loss_n, seen=self.seen, skipped=self.skipped,
                    seconds=self.elapsed())

    def add_loss(self, v: float) -> None:
        self.loss_sum, self.loss_n = self.loss_sum + v, self.loss_n + 1

    def mean_loss(self) -> float | None:
        return self.loss_sum / self.loss_n if self.loss_n else None

    def elapsed(self) -> float:
        return self.before + time.time() - self.started

    def rate(self) -> float:
        return self.seen / max(self.elapsed(), 1e-9)


def describe_source(source: dict) -> str:
    """One line: what an imported run's weights are."""
    name = Path(source.get("file", "?")).name
    known = ", the BVLC release (sha1 as its readme)" if source.get("matches_bvlc") else ""
    return f"imported from {name} ({source.get('format', '?')}{known})"


def rng_state() -> dict:
    """This process's RNG states (torch, Python, numpy, CUDA), as plain data for a checkpoint."""
    st = dict(torch=torch.get_rng_state(), python=repr(random.getstate()),
              numpy=json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]))
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(ast.literal_eval(st["python"]))
    n = json.loads(st["numpy"])
    np.random.set_state((n[0], np.asarray(n[1], np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"][: torch.cuda.device_count()])


def save_checkpoint(path: Path, ckpt: Checkpoint) -> None:
    data = ckpt.to_dict()
    atomic_write(path, lambda f: torch.save(data, f))


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


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint safely; a run folder means its ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise ReplicaError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise ReplicaError(f"{path}: not a readable checkpoint (truncated or corrupt: not a torch.save archive)")
    _check_archive(path)
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
    try:
        ck = Checkpoint.from_dict(ckpt, path)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ReplicaError(f"{path}: a replica checkpoint with a damaged record ({type(e).__name__}: {e})") from None
    problem = _damaged(ck)
    if problem:
        raise ReplicaError(f"{path}: a replica checkpoint with a damaged record ({problem})")
    return ck


def _check_archive(path: Path) -> None:
    """torch.save writes its archive's members stored, not compressed: a compressed member (or
    members larger than the file) is not replica's, and may inflate to gigabytes before the
    record inside could be refused (a 1.9 MB file to 2 GB, tried)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ReplicaError(f"{path}: not a readable checkpoint (truncated or corrupt: {e})") from None
    packed = [m.filename for m in members if m.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise ReplicaError(f"{path}: not a replica checkpoint (member {packed[0]} is compressed; torch.save stores "
                           f"its members as they are)")
    if sum(m.file_size for m in members) > size:
        raise ReplicaError(f"{path}: not a readable checkpoint (its members declare more bytes than the file holds)")


MAX_CLASSES = 1_000_000  # ImageNet-21k has 21,841; a record naming more is damaged


def _damaged(ck: Checkpoint) -> str | None:
    """What is wrong with a loaded record's fields, each checked for type and range; None if nothing."""
    if not isinstance(ck.model, dict) or not all(isinstance(v, torch.Tensor) for v in ck.model.values()):
        return "model: not a dict of tensors"
    if not ck.classes or len(ck.classes) > MAX_CLASSES:
        return f"classes: {len(ck.classes)} (expected 1 to {MAX_CLASSES:,})"
    if ck.names is not None and (not isinstance(ck.names, list) or len(ck.names) != len(ck.classes)):
        return "names: not one per class"
    m = ck.mean
    if not isinstance(m, torch.Tensor) or m.ndim != 3 or m.shape[0] != 3 or m.shape[1] != m.shape[2]:
        return f"mean: {'no mean image' if m is None else 'not a 3×S×S image'}"
    if not torch.isfinite(m).all():
        return "mean: not finite"
    if isinstance(ck.crop, bool) or not isinstance(ck.crop, int) or not 0 < ck.crop <= m.shape[-1]:
        return f"crop: {ck.crop!r} (expected a positive size up to the mean image's {m.shape[-1]})"
    if ck.source is not None and not isinstance(ck.source, dict):
        return "source: not a record"
    if not isinstance(ck.config, dict) or not isinstance(ck.pca, dict):
        return "config: not a record"
    return None


def check_compatible(ckpt: Checkpoint, net: NetOptions, classes, path) -> None:
    """Refuse a checkpoint of another net (any of its options) or other classes, saying which."""
    for key in ckpt.net.differences(net):
        raise ReplicaError(f"{path}: checkpoint has {key}={getattr(ckpt.net, key)!r}, but this run has "
                           f"{key}={getattr(net, key)!r}")
    if list(ckpt.classes) != list(classes):
        what = (f"num_classes={ckpt.num_classes}, but this run has num_classes={len(classes)}"
                if ckpt.num_classes != len(classes) else "other classes (or another order) than this run's data")
        raise ReplicaError(f"{path}: checkpoint has {what}")


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
