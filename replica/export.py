"""``replica export``: a run's net as one self-contained ONNX file, checked by onnxruntime.

The net is rebuilt from its checkpoint (on the CPU, float32, NCHW, eager norms) and exported by
torch's dynamo exporter with a dynamic batch: input ``image``, (N, 3, crop, crop) RGB in 0-255
(the checkpoint's mean crop is subtracted inside; ``raw_net``: already mean-subtracted), output
``logits``. Each LRN is ONNX's ``LRN`` operator (its α and window are torch's, so the preset's
values go in as they are; replica.layers' ``replica::lrn`` operator carries them there); the
as-run spatial norm, the 0.5 of dropout at test and the zero-extension to 227 are ordinary
operators. The file is then run by onnxruntime on random images beside replica's own logits.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, augment
from .errors import ReplicaError, install_hint
from .fileio import atomic_write, fsync_dir
from .model import AlexNet
from .runs import load_checkpoint, run_checkpoint
from .runtime import legacy_tf32_readable

log = logging.getLogger("replica")

MIN_OPSET = 18  # torch's dynamo exporter writes 18 at least (it raised 7 to 18 and said so, tried)
TOLERANCE = 1e-4  # max |Δlogit| ≤ TOLERANCE · max(1, max |logit|)
CONSTANT = 1e-3  # logits spread across the random images ≤ CONSTANT · their scale: a net that ignores its input


class _Exported(nn.Module):
    """The net with the mean crop subtracted first (unless ``mean`` is None)."""

    def __init__(self, net: AlexNet, mean: torch.Tensor | None):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean[None].float() if mean is not None else None)

    def forward(self, image):
        return self.net(image - self.mean if self.mean is not None else image)


def _needs():
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ReplicaError(f"replica export needs onnx, onnxruntime and onnxscript ({', '.join(missing)} missing): "
                           f"{install_hint('onnx')}")


def export_onnx(run, dest, checkpoint: str = "last", raw_net: bool = False, check: bool = True,
                opset: int = 18) -> dict:
    """Write ``dest`` and, with ``check``, compare onnxruntime's logits with replica's (a
    :class:`ReplicaError`, so exit 2, if they differ beyond :data:`TOLERANCE`; the file is kept)."""
    _needs()
    import onnx
    from onnxscript import opset18 as op

    if opset < MIN_OPSET:
        raise ReplicaError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer (ONNX's LRN and the "
                           f"dynamic batch); give {MIN_OPSET} or more")
    source = run_checkpoint(Path(run), checkpoint)
    dest = _destination(Path(dest), source)
    ck = load_checkpoint(source)
    try:
        net = AlexNet.with_weights(ck.net, ck.num_classes, ck.model, "cpu", channels_last=False).eval()
    except ReplicaError as e:
        raise ReplicaError(f"{ck.path}: {e}") from None
    crop = ck.crop
    model = _Exported(net, None if raw_net else augment.centre_crop_of(ck.mean, crop)).eval()

    def onnx_lrn(x, size: int, alpha: float, beta: float, k: float):
        return op.LRN(x, size=size, alpha=alpha, beta=beta, bias=k)

    dest.parent.mkdir(parents=True, exist_ok=True)
    x = _inputs(2, crop, raw_net, seed=1)
    try:
        with torch.no_grad(), legacy_tf32_readable():
            program = torch.onnx.export(
                model, (x,), dynamo=True, verbose=False, opset_version=opset, input_names=["image"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                custom_translation_table={torch.ops.replica.lrn.default: onnx_lrn})
    except Exception as e:  # the exporter's own failures are many and long: one line of it (all with -v)
        log.debug("torch.onnx.export: %s", e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReplicaError(f"torch.onnx.export failed ({type(e).__name__}: {first[:200]})") from None
    proto = program.model_proto
    meta = dict(replica=__version__, preset=ck.net.preset, net=json.dumps(ck.net.to_dict()), crop=str(crop),
                input=("mean-subtracted RGB crops" if raw_net else "RGB crops, 0-255 (the mean is subtracted inside)")
                + f", (N, 3, {crop}, {crop})", classes=json.dumps(ck.classes))
    if ck.names:
        meta["names"] = json.dumps(ck.names)
    if ck.source:
        meta["imported_from"] = Path(ck.source.get("file", "?")).name
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    data = serialize(proto)
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    # written beside the destination first: a failed write, a failed check or a stop leaves a
    # previous file at dest as it was; a file that fails the check is kept as NAME.failed.onnx
    trial = dest.with_name(f"{dest.stem}.failed{dest.suffix or '.onnx'}")
    trial.unlink(missing_ok=True)
    atomic_write(trial, lambda f: f.write(data))
    lrn_nodes = sum(n.op_type == "LRN" for n in proto.graph.node)
    out = dict(path=str(dest), bytes=len(data), opset=written, lrn_nodes=lrn_nodes, input=meta["input"])
    expected = ck.net.lrn_layers
    if lrn_nodes != expected:
        raise ReplicaError(f"{trial}: {lrn_nodes} LRN nodes, expected {expected}: the export did not keep the LRNs "
                           f"as ONNX's operator (kept for inspection; {dest} untouched)")
    if check:
        out["check"] = check_onnx(trial, model, crop, raw_net, keep=dest)
    try:
        os.replace(trial, dest)
    except OSError as e:
        trial.unlink(missing_ok=True)
        raise ReplicaError(f"cannot write {dest}: {os.strerror(e.errno) if e.errno else e}") from None
    fsync_dir(dest.parent)
    return out


def serialize(proto) -> bytes:
    """The ONNX file's bytes (one seam: a test alters the graph here behind the exporter's back)."""
    return proto.SerializeToString()


# A run folder's own files: an export never writes over one of them
RUN_OWN = {"last.pt", "best.pt", "config.yaml", "version.json", "metrics.jsonl", "eval.json", "import.json",
           "report.md", "stats.npz"}


def _destination(dest: Path, source: Path) -> Path:
    """``dest`` if an export may write it: not the checkpoint it reads, not any checkpoint or
    record of a run folder, not a folder."""
    if str(dest) in ("", "."):
        raise ReplicaError("--onnx: give the path of the .onnx file to write")
    if dest.is_dir():
        raise ReplicaError(f"--onnx {dest}: a folder; give the path of the .onnx file to write")
    d = dest.resolve()
    own = d.name in RUN_OWN or (d.name.startswith("eval-") and d.suffix == ".json")
    if d == source.resolve() or d.suffix == ".pt" or (own and (d.parent / "config.yaml").exists()):
        raise ReplicaError(f"--onnx {dest}: one of a run's own files (a checkpoint or a record); an export never "
                           f"replaces it: write the .onnx elsewhere")
    return dest


def _inputs(n: int, crop: int, raw_net: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if raw_net:
        return torch.randn(n, 3, crop, crop, generator=g) * 50
    return torch.rand(n, 3, crop, crop, generator=g) * 255


def check_onnx(path, model: nn.Module, crop: int, raw_net: bool, keep=None) -> dict:
    """onnxruntime's logits against ``model``'s on random images, batches of 4 and 1. Any logit
    that is not finite, on either side, fails it (NaN compares as nothing: it would "agree")."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ReplicaError(f"checking the export needs onnxruntime: {install_hint('onnx')} (or --no-check)") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, scale, agree, images, seen = 0.0, 1.0, True, 0, []
    for n, seed in ((4, 2), (1, 3)):
        x = _inputs(n, crop, raw_net, seed)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        if not (np.isfinite(got).all() and np.isfinite(want).all()):
            bad = "replica's" if not np.isfinite(want).all() else "onnxruntime's"
            raise ReplicaError(f"{path}: {bad} logits are not finite (NaN or infinite): the net's weights or mean "
                               f"are damaged (kept for inspection{f'; {keep} untouched' if keep else ''})")
        worst = max(worst, float(np.abs(got - want).max()))
        seen.append(want)
        scale = max(scale, float(np.abs(want).max()))
        agree &= bool((got.argmax(1) == want.argmax(1)).all())
        images += n
    tol = TOLERANCE * scale
    every = np.concatenate(seen)
    spread = float((every.max(0) - every.min(0)).max())
    if spread <= CONSTANT * scale:  # an untrained narrow net: any file that outputs a constant would "agree"
        raise ReplicaError(f"{path}: replica's logits are the same for every image (spread {spread:.2g} against "
                           f"{scale:.2g}): a degenerate net, so agreeing with it proves nothing; the check fails "
                           f"(kept for inspection{f'; {keep} untouched' if keep else ''}; --no-check writes it)")
    r = dict(onnxruntime=ort.__version__, max_abs_diff=worst, tolerance=tol, top1_agree=agree, images=images)
    if worst > tol or not agree:
        raise ReplicaError(f"{path}: onnxruntime's logits differ from replica's: max |Δ| {worst:.3g} > {tol:.3g}, "
                           f"top-1 agrees: {agree} (the file is kept for inspection"
                           f"{f'; {keep} untouched' if keep else ''})")
    return r
