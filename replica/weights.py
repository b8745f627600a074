"""Trained weights from elsewhere in the two towers: Caffe's ``bvlc_alexnet`` (``replica import``).

Caffe's BVLC reference AlexNet (``bvlc_alexnet.caffemodel``; the same tensors in the ONNX model
zoo's ``bvlcalexnet-*.onnx``) groups conv2, conv4 and conv5 in two: the paper's two towers. It is
read here without Caffe or a protobuf schema compiler, and mapped exactly onto replica's
two-tower ``state_dict`` (``docs/analysis.md``, "Caffe's trained AlexNet"):

- every layer's outputs split in half, tower a the first half; conv3 and fc6 already read
  "a then b", as replica concatenates them;
- conv1's input channels reversed (Caffe's images are BGR);
- fc7's and fc8's weights ×2: replica's dropout scales by 0.5 at test (the 2012 code's), Caffe's
  is inverted (×1 at test), so (2W)·(0.5h) = W·h, in training as at test.

The net is run with the ``caffe`` preset (k = 1, ReLU before LRN, no spatial norm, a 227 crop
without zero-extension, pools in ceil mode, and the LRN window crossing the tower boundary as
Caffe computes it). Protobuf's wire format: a message is (key = field << 3 | wire type, value)
pairs; wire type 0 a varint, 1 eight bytes, 2 a length-delimited span, 5 four bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import Config, NetOptions, dump_config
from .errors import ReplicaError, install_hint
from .fileio import atomic_write, locked
from .runs import TRAIN_LOCK, Checkpoint, Progress, code_version, save_checkpoint

log = logging.getLogger("replica")

BVLC_SHA1 = "9116a64c0fbe4459d18f4bb6b56d647b63920377"  # models/bvlc_alexnet/readme.md:6
# ILSVRC-2012 val, one centre crop: 57.1 % top-1 and 80.2 % top-5 accuracy (its readme:16-18)
BVLC_PUBLISHED = dict(top1_err=0.429, top5_err=0.198)
# what replica's one-view eval of it should give, in %: not exactly the published figures, since
# replica resizes by the shorter side (Caffe warped to 256²) and decodes with PIL (Caffe: OpenCV)
BVLC_BAND = dict(top1_err=(42.5, 44.5), top5_err=(19.5, 21.0))
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
FULL = dict(conv1=96, conv2=256, conv3=384, conv4=384, conv5=256, fc6=4096, fc7=4096)  # outputs, both towers
DROPOUT_SCALED = ("fc7", "fc8")  # the layers that read a dropped-out input: weights ×2
LRN = dict(local_size=5, alpha=1e-4, beta=0.75, k=1.0)  # what the caffe preset computes


# ----------------------------------------------------------------------------------------------
# The protobuf wire format, read directly


MAX_FILE = 1 << 30  # bytes: bvlc_alexnet.caffemodel is 233 MB (its doubles would be twice that); no AlexNet reaches this
MAX_MEAN_FILE = 64 << 20  # a mean image's file: 3×256×256 floats are 0.8 MB
NET_FIELDS = frozenset({1, 2, 3, 4, 5, 6, 7, 8, 100})  # NetParameter's fields (caffe.proto): anything else is junk


def _mapped(path: Path, limit: int, what: str):
    """The file's bytes as a read-only mmap, refused in one line if it is not a regular file or
    larger than ``limit``."""
    if path.is_dir():
        raise ReplicaError(f"{path}: a folder, not a {what} file")
    if path.exists() and not path.is_file():  # a FIFO would block open() for ever, a device read for ever
        raise ReplicaError(f"{path}: not a regular file (a {what} file is one)")
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ReplicaError(f"{path}: no such file") from None
    except OSError as e:
        raise ReplicaError(f"{path}: cannot read ({os.strerror(e.errno) if e.errno else e})") from None
    with f:
        st = os.fstat(f.fileno())
        if st.st_size > limit:
            raise ReplicaError(f"{path}: {st.st_size / 1e6:,.0f} MB, larger than any {what} of AlexNet "
                               f"(at most {limit / 1e6:,.0f} MB): not one")
        if st.st_size == 0:
            raise ReplicaError(f"{path}: empty file, not a {what}")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


class _Wire:
    """A read-only view of protobuf bytes (a file's mmap or a span of it). Every read is checked
    against its span and its field's wire type: a malformed file is a one-line :class:`ReplicaError`."""

    def __init__(self, buf, what: str):
        self.buf, self.what = buf, what

    def bad(self, why: str) -> ReplicaError:
        return ReplicaError(f"{self.what}: not a valid caffemodel ({why})")

    def varint(self, i: int, end: int | None = None) -> tuple[int, int]:
        end = len(self.buf) if end is None else end
        value, shift = 0, 0
        while True:
            if i >= end:
                raise ReplicaError(f"{self.what}: truncated or not a protobuf file (a varint runs past the end)")
            if shift > 63:
                raise self.bad("a varint longer than 10 bytes")
            b = self.buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                if value >> 64:
                    raise self.bad("a varint past 64 bits")
                return value, i

    def fields(self, start: int, end: int):
        """(field, wire type, value): an int for types 0/1/5 (raw bytes' offset for 1/5), a (start,
        end) span for type 2."""
        i = start
        while i < end:
            at = i
            key, i = self.varint(i, end)
            field, wt = key >> 3, key & 7
            if field == 0:
                raise self.bad(f"field number 0 at byte {at}")
            if wt == 0:
                v, i = self.varint(i, end)
            elif wt == 1:
                v, i = i, i + 8
            elif wt == 5:
                v, i = i, i + 4
            elif wt == 2:
                n, i = self.varint(i, end)
                v, i = (i, i + n), i + n
            else:
                raise ReplicaError(f"{self.what}: not a protobuf file (wire type {wt} at byte {at})")
            if i > end:
                raise ReplicaError(f"{self.what}: truncated (a field runs past the end of its message)")
            yield field, wt, v

    def string(self, span) -> str:
        return bytes(self.buf[span[0]:span[1]]).decode("utf-8", errors="replace")

    def packed(self, span, dtype: str, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        n, rest = divmod(span[1] - span[0], size)
        if rest:
            raise self.bad(f"{what}: {span[1] - span[0]} bytes of packed {dtype}, not a whole number of values")
        return np.frombuffer(self.buf, dtype, n, span[0])

    def ints(self, wt: int, v, what: str) -> list[int]:
        if wt == 0:
            return [v]
        if wt != 2:
            raise self.bad(f"{what} of wire type {wt}")
        out, i = [], v[0]
        while i < v[1]:
            x, i = self.varint(i, v[1])
            out.append(x)
        return out


# A BlobProto's fields and the wire types each may have (packed repeated fields are type 2)
_BLOB_TYPES = {1: (0,), 2: (0,), 3: (0,), 4: (0,), 5: (5, 2), 6: (5, 2), 7: (2,), 8: (1, 2), 9: (1, 2)}
MAX_DIMS = 8


def _blob(w: _Wire, span) -> np.ndarray:
    """A BlobProto: shape (field 7, BlobShape dim = 1) or the legacy num/channels/height/width
    (1-4); data (5, float, packed or not) or double_data (8). Unpacked values are gathered as
    bytes, 4 or 8 a value (never a Python object a value)."""
    dims, legacy, values = None, {}, {"<f4": [], "<f8": []}  # data (5) and double_data (8), in file order
    for f, wt, v in w.fields(*span):
        if f in _BLOB_TYPES and wt not in _BLOB_TYPES[f]:
            raise w.bad(f"blob field {f} of wire type {wt}")
        if f == 7:
            dims = []
            for g, gwt, gv in w.fields(*v):
                if g == 1:
                    dims += w.ints(gwt, gv, "a blob's dims")
        elif f in (1, 2, 3, 4):
            legacy[f] = v
        elif f in (5, 8):
            dt = "<f4" if f == 5 else "<f8"
            out = values[dt]
            if wt == 2:
                out.append(w.packed(v, dt, "blob data"))
            else:  # unpacked: one field a value, gathered as the file's bytes
                if not out or not isinstance(out[-1], bytearray):
                    out.append(bytearray())
                out[-1] += w.buf[v:v + np.dtype(dt).itemsize]
    floats, doubles = ([np.frombuffer(c, dt) if isinstance(c, bytearray) else c for c in values[dt]]
                       for dt in ("<f4", "<f8"))
    data = np.concatenate(floats) if floats else np.concatenate(doubles).astype(np.float32) if doubles else \
        np.zeros(0, np.float32)
    if dims is None:
        dims = [legacy.get(k, 1) for k in (1, 2, 3, 4)] if legacy else [len(data)]
    if len(dims) > MAX_DIMS or any(d >= 1 << 62 for d in dims):
        raise w.bad(f"a blob of shape {tuple(dims)}")
    if math.prod(dims) != len(data):  # in Python's integers: no wrap-around
        raise ReplicaError(f"{w.what}: a blob of shape {tuple(dims)} holds {len(data)} values (truncated?)")
    return data.reshape(dims)


def _lrn_param(w: _Wire, span) -> dict:
    """LRNParameter: local_size 1, alpha 2, beta 3, norm_region 4 (0 = across channels), k 5."""
    p = dict(local_size=5, alpha=1.0, beta=0.75, norm_region=0, k=1.0)  # caffe.proto's defaults
    names = {1: "local_size", 2: "alpha", 3: "beta", 4: "norm_region", 5: "k"}
    for f, wt, v in w.fields(*span):
        if f not in names:
            continue
        if wt != (0 if f in (1, 4) else 5):
            raise w.bad(f"LRN parameter {names[f]} of wire type {wt}")
        p[names[f]] = v if wt == 0 else float(np.frombuffer(w.buf, "<f4", 1, v)[0])
    return p


def read_caffemodel(path) -> dict:
    """{"blobs": {layer: [W, b]}, "lrn": {layer: params}, "schema": "V2" or "V1"} of a
    ``.caffemodel``: a NetParameter whose layers are ``layer = 100`` (LayerParameter: name 1,
    type 2, blobs 7, lrn_param 118) or the 2014 ``layers = 2`` (V1LayerParameter: name 4, type 5,
    blobs 6, lrn_param 18). A file larger than :data:`MAX_FILE`, or with a top-level field that no
    NetParameter has, is refused before it is read through."""
    path = Path(path)
    buf = _mapped(path, MAX_FILE, "caffemodel")
    w = _Wire(buf, str(path))
    blobs, lrn, schemas = {}, {}, set()
    for field, wt, v in w.fields(0, len(buf)):
        if field not in NET_FIELDS:
            raise ReplicaError(f"{path}: not a caffemodel (field {field} at the top level; a NetParameter has "
                               f"fields 1-8 and 100)")
        if wt != 2 or field not in (100, 2):
            continue
        v2 = field == 100
        schemas.add("V2" if v2 else "V1")
        name, layer_blobs, lrn_span = None, [], None
        for f, fwt, fv in w.fields(*v):
            if f == (1 if v2 else 4) and fwt == 2:
                name = w.string(fv)
            elif f == (7 if v2 else 6) and fwt == 2:
                layer_blobs.append(_blob(w, fv))
            elif f == (118 if v2 else 18) and fwt == 2:
                lrn_span = fv
        if name is None:
            continue
        if layer_blobs:
            blobs[name] = layer_blobs
        if lrn_span is not None:
            lrn[name] = _lrn_param(w, lrn_span)
    if not blobs:
        raise ReplicaError(f"{path}: no layer with weights: not a caffemodel (a NetParameter of 'layer' or 'layers')")
    return dict(blobs=blobs, lrn=lrn, schema="+".join(sorted(schemas)))


def read_binaryproto(path) -> np.ndarray:
    """A Caffe mean file (one BlobProto), as its array."""
    buf = _mapped(Path(path), MAX_MEAN_FILE, "mean (.binaryproto)")
    return _blob(_Wire(buf, str(path)), (0, len(buf)))


def read_onnx_zoo(path) -> dict:
    """The same record as :func:`read_caffemodel`, from the ONNX zoo's ``bvlcalexnet-*.onnx``:
    initializers ``conv1_w_0`` … ``fc8_b_0`` (else the weights of its 5 Conv and 3 Gemm nodes in
    graph order), Gemm ``transB`` honoured, the nodes' attributes checked (group 2 in conv2/4/5,
    LRN size 5, α 1e-4, β 0.75, bias 1).

    The file must hold its weights itself (the zoo's do): external data is never loaded, so no
    link or path in the file reaches another file, whatever the installed onnx's own checks."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ReplicaError(f"reading an ONNX file needs the onnx package: {install_hint('onnx')}") from None
    path = Path(path)
    _mapped(path, MAX_FILE, "ONNX").close()  # a regular file of a size some AlexNet has
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise ReplicaError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:120]})") from None
    init = {t.name: t for t in model.graph.initializer}
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ReplicaError(f"{path}: initializer {external[0]} is stored outside the file (external data); replica "
                           f"reads only self-contained ONNX files, as the model zoo's are")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    if len(convs) != 5 or len(gemms) != 3:
        raise ReplicaError(f"{path}: expected AlexNet's 5 Conv and 3 Gemm nodes, found {len(convs)} and {len(gemms)}")
    blobs, lrn = {}, {}
    try:
        for name, node in zip(LAYERS, convs + gemms):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            ins = [i for i in node.input[1:] if i in init]
            if len(ins) != 2:
                raise ReplicaError(f"{path}: node {node.name or node.op_type} ({name}) has no weight and bias "
                                   f"initializers")
            for i in ins:
                if math.prod(init[i].dims) > MAX_FILE // 4:
                    raise ReplicaError(f"{path}: initializer {i} declares {math.prod(init[i].dims):,} values, more "
                                       f"than the file holds")
            wt, b = (numpy_helper.to_array(init[i]).astype(np.float32) for i in ins)
            if name.startswith("conv"):
                group = int(attrs.get("group", 1))
                if group != (2 if name in ("conv2", "conv4", "conv5") else 1):
                    raise ReplicaError(f"{path}: {name} has group={group}; bvlc_alexnet groups conv2, conv4 and "
                                       f"conv5 in two")
            elif not attrs.get("transB", 0):
                if wt.ndim != 2:
                    raise ReplicaError(f"{path}: {name}'s weights are {wt.ndim}-D; a Gemm's are 2-D")
                wt = wt.T  # (in, out) → (out, in)
            blobs[name] = [np.ascontiguousarray(wt), b]
        for i, node in enumerate(n for n in model.graph.node if n.op_type == "LRN"):
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            lrn[f"norm{i + 1}"] = dict(local_size=int(a.get("size", 0)), alpha=float(a.get("alpha", 1e-4)),
                                       beta=float(a.get("beta", 0.75)), k=float(a.get("bias", 1.0)), norm_region=0)
    except ReplicaError:
        raise
    except Exception as e:  # a wrong attribute type, an initializer whose bytes disagree with its dims, …
        raise ReplicaError(f"{path}: a malformed AlexNet graph ({type(e).__name__}: {str(e)[:120]})") from None
    return dict(blobs=blobs, lrn=lrn, schema=f"onnx opset {max((o.version for o in model.opset_import), default=0)}")


# ----------------------------------------------------------------------------------------------
# The mapping, both ways


def _check_lrn(lrn: dict, what: str) -> None:
    for name, p in lrn.items():
        got = dict(local_size=int(p["local_size"]), alpha=p["alpha"], beta=p["beta"], k=p["k"])
        if p.get("norm_region", 0) != 0 or got["local_size"] != LRN["local_size"] or \
                any(not np.isclose(got[k], LRN[k], rtol=1e-5) for k in ("alpha", "beta", "k")):
            raise ReplicaError(f"{what}: layer {name} is an LRN with {got} (region {p.get('norm_region', 0)}); "
                               f"the caffe preset computes {LRN} across channels, as bvlc_alexnet")


def caffe_to_state(blobs: dict, what: str = "weights") -> tuple[dict, float, int]:
    """(replica state_dict, width, classes) of Caffe's conv1 … fc8 blobs (Caffe's shapes: grouped
    convs (out, in/2, k, k), fc (out, in); legacy 4-D fc blobs (1, 1, out, in) are accepted).

    Every blob's shape is checked against the net it implies (conv1's filters give the width, at
    most Caffe's own 1; fc8's rows the classes) on torch's ``meta`` device before any tensor of the
    net is made, and every value must be finite."""
    missing = [n for n in LAYERS if n not in blobs]
    if missing:
        raise ReplicaError(f"{what}: no layer {', '.join(missing)}: not AlexNet (layers: {', '.join(blobs)})")
    wb = {}
    for n in LAYERS:
        if len(blobs[n]) != 2:
            raise ReplicaError(f"{what}: layer {n} holds {len(blobs[n])} blobs, expected weights and biases")
        w, b = (np.asarray(x, np.float32) for x in blobs[n])
        if n.startswith("fc") and w.ndim == 4 and w.shape[:2] == (1, 1):
            w = w[0, 0]  # legacy (1, 1, out, in)
        if b.ndim == 4 and b.shape[:3] == (1, 1, 1):
            b = b[0, 0, 0]  # legacy (1, 1, 1, out)
        want_ndim = 4 if n.startswith("conv") else 2
        if w.ndim != want_ndim or b.ndim != 1:
            raise ReplicaError(f"{what}: layer {n}'s weights are {w.ndim}-D and its biases {b.ndim}-D; AlexNet's "
                               f"{n} has {want_ndim}-D weights and 1-D biases")
        wb[n] = (w, b)
    filters, classes = wb["conv1"][0].shape[0], wb["fc8"][0].shape[0]
    if classes < 1:
        raise ReplicaError(f"{what}: fc8 has no outputs (shape {wb['fc8'][0].shape})")
    width = filters / FULL["conv1"]
    if not 0 < width <= 1:
        raise ReplicaError(f"{what}: conv1 has {filters} filters: not AlexNet's 96 (nor a narrower test net)")
    from .model import AlexNet  # the shapes replica expects at this width, allocating nothing

    try:
        want = AlexNet.state_shapes(NetOptions(preset="caffe", width=width), classes)
    except ReplicaError as e:
        raise ReplicaError(f"{what}: conv1 has {filters} filters: not AlexNet's 96 ({e})") from None
    state = {}
    for n, (w, b) in wb.items():
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ReplicaError(f"{what}: layer {n} holds a value that is not finite (NaN or infinite): damaged")
        h = w.shape[0] // 2
        split = {"fc8": (w, b)} if n == "fc8" else {f"tower_a.{n}": (w[:h], b[:h]), f"tower_b.{n}": (w[h:], b[h:])}
        for key, (pw, pb) in split.items():
            for suffix, t in (("weight", pw), ("bias", pb)):
                k = f"{key}.{suffix}"
                if k not in want or tuple(want[k]) != t.shape:
                    expect = tuple(want[k]) if k in want else "none"
                    raise ReplicaError(f"{what}: layer {n} gives {k} of shape {t.shape}; AlexNet at width "
                                       f"{width:g} has {expect} (Caffe's {n}: {w.shape})")
            if n == "conv1":
                pw = pw[:, ::-1]  # BGR → RGB
            if n in DROPOUT_SCALED:
                pw = pw * 2
            state[f"{key}.weight"] = torch.from_numpy(np.ascontiguousarray(pw, np.float32))
            state[f"{key}.bias"] = torch.from_numpy(np.ascontiguousarray(pb, np.float32))
    return {k: state[k] for k in want}, width, classes  # in the net's own order


def state_to_caffe(state: dict) -> dict:
    """The inverse of :func:`caffe_to_state`: Caffe's blobs {layer: [W, b]} of a two-tower state."""
    out = {}
    for n in LAYERS:
        if n == "fc8":
            w, b = state["fc8.weight"].numpy(), state["fc8.bias"].numpy()
        else:
            w = np.concatenate([state[f"tower_{t}.{n}.weight"].numpy() for t in "ab"])
            b = np.concatenate([state[f"tower_{t}.{n}.bias"].numpy() for t in "ab"])
        if n in DROPOUT_SCALED:
            w = w / 2
        if n == "conv1":
            w = w[:, ::-1]
        out[n] = [np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32)]
    return out


# ----------------------------------------------------------------------------------------------
# Mean and classes


def _npy(p: Path, option: str, spec) -> np.ndarray:
    """A .npy array read through a memory map: a header declaring more than the file holds is an
    error, not an allocation."""
    if p.exists() and not p.is_file():
        raise ReplicaError(f"{option} {spec}: not a regular file")
    if p.is_file() and p.stat().st_size > MAX_MEAN_FILE:
        raise ReplicaError(f"{option} {spec}: {p.stat().st_size / 1e6:,.0f} MB, not a mean image")
    try:
        return np.array(np.load(p, mmap_mode="r", allow_pickle=False), np.float32)
    except (OSError, ValueError, TypeError) as e:
        raise ReplicaError(f"{option} {spec}: not a readable .npy array ({e})") from None


def read_mean(spec: str, size: int = 256, option: str = "--mean") -> tuple[np.ndarray, str]:
    """(3×size×size RGB float32 mean image, what it came from) of ``--mean``: a Caffe
    ``.binaryproto`` or ``.npy`` (BGR), three numbers B,G,R, or a replica store (its mean.npy, RGB).
    ``option``: the option it came from, for the messages (``--data`` gives its store's mean)."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "mean.npy").exists():
            raise ReplicaError(f"{option} {spec}: a folder without mean.npy (a store from 'replica prepare' has one)")
        m, rgb, what = _npy(p / "mean.npy", option, spec), True, f"store {p}"
    elif option != "--mean":
        raise ReplicaError(f"{option} {spec}: no such store (a folder from 'replica prepare')")
    elif p.suffix == ".binaryproto":
        m, rgb, what = read_binaryproto(p), False, f"{p.name} (BGR)"
    elif p.suffix == ".npy":
        m, rgb, what = _npy(p, option, spec), False, f"{p.name} (BGR)"
    else:
        try:
            bgr = [float(v) for v in spec.split(",")]
        except ValueError:
            bgr = []
        if len(bgr) != 3:
            raise ReplicaError(f"--mean {spec!r}: expected a .binaryproto or .npy file, a store, or three numbers B,G,R "
                               f"(e.g. 104,117,123)")
        m, rgb, what = np.asarray(bgr, np.float32)[:, None, None] * np.ones((3, size, size), np.float32), False, \
            f"B,G,R = {spec}"
    m = np.asarray(m, np.float32)
    if m.ndim == 4 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (3, size, size):
        raise ReplicaError(f"{option} {spec}: a mean image of shape {m.shape}; expected (3, {size}, {size})")
    if not np.isfinite(m).all():
        raise ReplicaError(f"{option} {spec}: the mean holds a value that is not finite (NaN or infinite)")
    return np.ascontiguousarray(m if rgb else m[::-1]), what


def read_classes(classes=None, data=None, n: int = 1000) -> tuple[list, list | None, str]:
    """(class ids, names or None, where they came from), ``n`` of them, in fc8's order."""
    if classes:
        ids, names = [], []
        try:
            text = Path(classes).read_text(encoding="utf-8")
        except OSError as e:
            raise ReplicaError(f"--classes {classes}: {os.strerror(e.errno) if e.errno else e}") from None
        except UnicodeDecodeError:
            raise ReplicaError(f"--classes {classes}: not a UTF-8 text file (one 'WNID name' line per class)") from None
        for line in text.splitlines():
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                ids.append(wnid)
                names.append(name.strip() or wnid)
        if len(ids) != n:
            raise ReplicaError(f"--classes {classes}: {len(ids)} classes, but the net's fc8 has {n} outputs")
        return ids, names, f"{Path(classes).name} (its order is fc8's)"
    if data:
        from .data.loaders import open_images

        images = open_images(data, "train")
        if len(images.classes) != n:
            raise ReplicaError(f"--data {data}: {len(images.classes)} classes, but the net's fc8 has {n} outputs")
        log.warning("warning: classes in the order of %s (sorted WNIDs): Caffe's order is assumed to be the same; "
                    "give --classes synset_words.txt to be sure", data)
        return list(images.classes), images.names, f"{data} (sorted; Caffe's order assumed)"
    log.warning("warning: no --classes or --data: the classes are numbered 0-%d", n - 1)
    return [str(i) for i in range(n)], None, "numbered"


# ----------------------------------------------------------------------------------------------
# replica import


def sha1_of(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What a run folder may hold besides what import writes (WRITTEN): another run's, so --force removes them
RUN_FILES = ("best.pt", "metrics.jsonl", "eval.json", "report.md", "curves.png", "filters.png", "neighbors.png",
             "neighbors.txt", "bad_inputs.tsv", "tb", "stats.npz")
WRITTEN = ("config.yaml", "version.json", "import.json", "last.pt")  # in this order; last.pt makes it a run


def import_weights(path, out, mean=None, classes=None, data=None, crop: int = 227, fmt: str = "auto",
                   force: bool = False) -> dict:
    """Read Caffe's AlexNet weights and write a run folder that eval, predict, filters, neighbors,
    report and export read like any other. Returns the provenance recorded in it (``removed``:
    what ``force`` took out of a run folder that was there).

    All or nothing: the files are written into a folder beside ``out`` and moved in once all are
    written, so a full disk or a stop leaves ``out`` as it was. ``force`` replaces a run, and
    removes what the old run had beside it (best.pt, metrics, eval.json, TensorBoard, pictures)
    that would otherwise be shown as the imported weights'."""
    path, out = Path(path), Path(out)
    if path.is_dir():
        raise ReplicaError(f"{path}: a folder; give the .caffemodel or .onnx file itself")
    if not path.exists():
        raise ReplicaError(f"{path}: no such file")
    if crop not in (224, 227):
        raise ReplicaError(f"--crop: expected 227 (Caffe's) or 224 (the ONNX zoo graph's), got {crop}")
    if out.exists() and not out.is_dir():
        raise ReplicaError(f"--out {out}: a file, not a folder")
    if (out / "last.pt").exists() and not force:
        raise ReplicaError(f"{out} already holds a run; choose another --out (or --force to replace it)")
    if fmt == "auto":
        fmt = "onnx" if path.suffix == ".onnx" else "caffe"
    if fmt not in ("caffe", "onnx"):
        raise ReplicaError(f"--format: expected auto, caffe or onnx, got {fmt!r}")
    record = read_onnx_zoo(path) if fmt == "onnx" else read_caffemodel(path)
    _check_lrn(record["lrn"], str(path))
    state, width, n = caffe_to_state(record["blobs"], str(path))
    if mean is None and data is None:
        raise ReplicaError("give --mean (a .binaryproto or .npy mean image, B,G,R values such as 104,117,123, or a "
                           "store) or --data STORE (its mean): the net expects mean-subtracted input")
    mean_image, mean_from = read_mean(mean, option="--mean") if mean is not None else read_mean(data, option="--data")
    ids, names, classes_from = read_classes(classes, data, n)
    sha1 = sha1_of(path)
    source = dict(file=str(path.resolve()), sha1=sha1, matches_bvlc=sha1 == BVLC_SHA1, format=fmt,
                  schema=record["schema"], scaled={k: 2 for k in DROPOUT_SCALED}, conv1="BGR → RGB",
                  mean_from=mean_from, classes_from=classes_from, width=width)
    net = NetOptions(preset="caffe", width=width)
    cfg = Config(data=str(data) if data else None, num_classes=n, crop=crop, preset="caffe", width=width,
                 init="caffe")
    ck = Checkpoint(net=net, classes=ids, names=names, dataset="ilsvrc2012" if n == 1000 else None, crop=crop,
                    model=state, mean=torch.from_numpy(mean_image), config=cfg.to_dict(),
                    progress=Progress(done=True), source=source)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.import.tmp"
    shutil.rmtree(staging, ignore_errors=True)  # a stopped import's
    try:
        staging.mkdir()
        atomic_write(staging / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        atomic_write(staging / "version.json", lambda f: f.write(json.dumps(code_version(), indent=1).encode()))
        atomic_write(staging / "import.json", lambda f: f.write(json.dumps(source, indent=1).encode()))
        save_checkpoint(staging / "last.pt", ck)
        removed = _move_in(staging, out)
    except OSError as e:
        raise ReplicaError(f"cannot write {out}: {os.strerror(e.errno) if e.errno else e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dict(source, removed=removed)


def _move_in(staging: Path, out: Path) -> list[str]:
    """The staged run into ``out``: a rename when ``out`` is new; else the old run's files out
    (named in the result) and the new ones in, renames on one filesystem, last.pt last."""
    if not out.exists():
        os.rename(staging, out)
        return []
    with locked(out, TRAIN_LOCK, lambda holder: f"{out} is being trained by another process ({holder}): not replaced"):
        return _replace_run(staging, out)


def _replace_run(staging: Path, out: Path) -> list[str]:
    removed = []
    for name in RUN_FILES + tuple(sorted(p.name for p in out.glob("eval-*.json"))):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    for name in WRITTEN:  # over the old run's own
        os.replace(staging / name, out / name)
    return removed
