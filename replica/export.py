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
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, augment
from .errors import ReplicaError
from .model import AlexNet
from .runs import load_checkpoint, run_checkpoint
from .runtime import legacy_tf32_readable

log = logging.getLogger("replica")

TOLERANCE = 1e-4  # max |Δlogit| ≤ TOLERANCE · max(1, max |logit|)


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
                           f"pip install 'replica[onnx]'")


def export_onnx(run, dest, checkpoint: str = "last", raw_net: bool = False, check: bool = True,
                opset: int = 18) -> dict:
    """Write ``dest`` and, with ``check``, compare onnxruntime's logits with replica's (a
    :class:`ReplicaError`, so exit 2, if they differ beyond :data:`TOLERANCE`; the file is kept)."""
    _needs()
    import onnx
    from onnxscript import opset18 as op

    ck = load_checkpoint(run_checkpoint(Path(run), checkpoint))
    net = AlexNet.from_options(ck.net, ck.num_classes, "cpu", channels_last=False)
    net.load_state_dict(ck.model)
    net.eval()
    crop = ck.crop
    model = _Exported(net, None if raw_net else augment.centre_crop_of(ck.mean, crop)).eval()

    def onnx_lrn(x, size: int, alpha: float, beta: float, k: float):
        return op.LRN(x, size=size, alpha=alpha, beta=beta, bias=k)

    dest = Path(dest)
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
    onnx.save_model(proto, str(dest), save_as_external_data=False)
    lrn_nodes = sum(n.op_type == "LRN" for n in proto.graph.node)
    out = dict(path=str(dest), bytes=dest.stat().st_size, opset=opset, lrn_nodes=lrn_nodes, input=meta["input"])
    expected = (2 if ck.net.variant == "one-gpu-half" else 4) if ck.net.norm else 0
    if lrn_nodes != expected:
        raise ReplicaError(f"{dest}: {lrn_nodes} LRN nodes, expected {expected}: the export did not keep the LRNs "
                           f"as ONNX's operator (the file is kept)")
    if check:
        out["check"] = check_onnx(dest, model, crop, raw_net)
    return out


def _inputs(n: int, crop: int, raw_net: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if raw_net:
        return torch.randn(n, 3, crop, crop, generator=g) * 50
    return torch.rand(n, 3, crop, crop, generator=g) * 255


def check_onnx(path, model: nn.Module, crop: int, raw_net: bool) -> dict:
    """onnxruntime's logits against ``model``'s on random images, batches of 4 and 1."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ReplicaError("checking the export needs onnxruntime: pip install 'replica[onnx]' (or --no-check)") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, scale, agree, images = 0.0, 1.0, True, 0
    for n, seed in ((4, 2), (1, 3)):
        x = _inputs(n, crop, raw_net, seed)
        with torch.no_grad():
            want = model(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
        agree &= bool((got.argmax(1) == want.argmax(1)).all())
        images += n
    tol = TOLERANCE * scale
    r = dict(onnxruntime=ort.__version__, max_abs_diff=worst, tolerance=tol, top1_agree=agree, images=images)
    if worst > tol or not agree:
        raise ReplicaError(f"{path}: onnxruntime's logits differ from replica's: max |Δ| {worst:.3g} > {tol:.3g}, "
                           f"top-1 agrees: {agree} (the file is kept for inspection)")
    return r
