"""Caffe's bvlc_alexnet into the two towers (replica import), and replica's nets out to ONNX (replica export).

No real file can be downloaded here: the tests write caffemodels in protobuf's wire format with a
small writer of their own (both layer schemas, packed and unpacked floats, legacy and BlobShape
dims), and check replica after import against an engine no one here wrote: the same weights as a
Caffe-form ONNX graph (grouped convs, LRN over all maps, BGR, no dropout) run by onnxruntime.
"""
import json
import struct

import numpy as np
import pytest
import torch

from replica.cli import main
from replica.config import NetOptions
from replica.errors import ReplicaError
from replica.inference import model_from_checkpoint
from replica.model import AlexNet, count_parameters
from replica.runs import Checkpoint, load_checkpoint, save_checkpoint
from replica.weights import caffe_to_state, import_weights, read_binaryproto, read_caffemodel, state_to_caffe
from runs_helpers import NARROW

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import helper, numpy_helper  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A caffemodel writer: protobuf's wire format, written out


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def vint(field: int, n: int) -> bytes:  # varint (wire type 0)
    return varint(field << 3) + varint(n)


def f32(field: int, x: float) -> bytes:  # fixed 32 (wire type 5)
    return varint(field << 3 | 5) + struct.pack("<f", x)


def blob(a: np.ndarray, dims="shape", data="packed") -> bytes:
    """A BlobProto: dims as a BlobShape (7) or the legacy num/channels/height/width (1-4); data as
    packed floats (5), unpacked floats (5, one field each) or doubles (8)."""
    if dims == "shape":
        out = ld(7, ld(1, b"".join(varint(d) for d in a.shape)))
    else:
        four = (1,) * (4 - a.ndim) + a.shape
        out = b"".join(vint(f, d) for f, d in zip((1, 2, 3, 4), four))
    flat = np.ascontiguousarray(a).reshape(-1)
    if data == "packed":
        out += ld(5, flat.astype("<f4").tobytes())
    elif data == "unpacked":
        out += b"".join(f32(5, float(v)) for v in flat)
    else:
        out += ld(8, flat.astype("<f8").tobytes())
    return out


def lrn_param(size=5, alpha=1e-4, beta=0.75, k=None) -> bytes:
    return vint(1, size) + f32(2, alpha) + f32(3, beta) + (f32(5, k) if k is not None else b"")


# the net's layers in order, as bvlc_alexnet's deploy.prototxt has them (V1 type enums: caffe.proto)
SEQUENCE = [("data", "Input", 0), ("conv1", "Convolution", 4), ("relu1", "ReLU", 18), ("norm1", "LRN", 15),
            ("pool1", "Pooling", 17), ("conv2", "Convolution", 4), ("relu2", "ReLU", 18), ("norm2", "LRN", 15),
            ("pool2", "Pooling", 17), ("conv3", "Convolution", 4), ("conv4", "Convolution", 4),
            ("conv5", "Convolution", 4), ("pool5", "Pooling", 17), ("fc6", "InnerProduct", 14),
            ("drop6", "Dropout", 6), ("fc7", "InnerProduct", 14), ("fc8", "InnerProduct", 14),
            ("prob", "Softmax", 20)]


def caffemodel(blobs: dict, schema="V2", legacy_fc=False, lrn_k=None) -> bytes:
    """A NetParameter: V2 ``layer`` (100; name 1, type 2, blobs 7, lrn_param 118) or the 2014 V1
    ``layers`` (2; name 4, type enum 5, blobs 6, lrn_param 18). Biases go unpacked, one in every
    other layer as doubles; V1 with legacy 4-D dims (fc as (1, 1, out, in))."""
    out = ld(1, b"AlexNet")
    for i, (name, kind, enum) in enumerate(SEQUENCE):
        parts = []
        if name in blobs:
            w, b = blobs[name]
            dims = "legacy" if schema == "V1" else "shape"
            parts.append(blob(w, dims if (legacy_fc or not name.startswith("fc")) else "shape"))
            parts.append(blob(b, dims, "unpacked" if i % 2 else "double"))
        lrn = lrn_param(k=lrn_k) if kind == "LRN" else None
        if schema == "V2":
            body = ld(1, name.encode()) + ld(2, kind.encode()) + b"".join(ld(7, p) for p in parts)
            out += ld(100, body + (ld(118, lrn) if lrn else b""))
        else:
            body = ld(4, name.encode()) + vint(5, enum) + b"".join(ld(6, p) for p in parts)
            out += ld(2, body + (ld(18, lrn) if lrn else b""))
    return out


def caffe_blobs(width=NARROW, classes=10, seed=0) -> dict:
    """Random weights in Caffe's shapes (grouped convs: in/2), He's scale so that activations keep
    their size and the LRN's α/n·Σa² is far from 0 next to k = 1."""
    rng = np.random.default_rng(seed)
    w = lambda n: max(1, round(n * width))  # noqa: E731  (per tower)
    c1, c2, c3, c4, c5, fc = w(48), w(128), w(192), w(192), w(128), w(2048)
    shapes = dict(conv1=(2 * c1, 3, 11, 11), conv2=(2 * c2, c1, 5, 5), conv3=(2 * c3, 2 * c2, 3, 3),
                  conv4=(2 * c4, c3, 3, 3), conv5=(2 * c5, c4, 3, 3), fc6=(2 * fc, 2 * c5 * 36),
                  fc7=(2 * fc, 2 * fc), fc8=(classes, 2 * fc))
    return {n: [(rng.standard_normal(s) * np.sqrt(2 / np.prod(s[1:]))).astype(np.float32),
                (rng.standard_normal(s[0]) * 0.1).astype(np.float32)] for n, s in shapes.items()}


# ---------------------------------------------------------------------------------------------
# The independent forward: the same weights as a Caffe-form ONNX graph, run by onnxruntime


def caffe_graph(blobs: dict, path, crop=227, zoo=False, lrn_bias=1.0):
    """Caffe's bvlc_alexnet forward at test time: BGR in, grouped conv2/4/5, ReLU → LRN over all
    maps (k = 1) → max-pool 3/2 rounding up, no dropout; outputs fc8 and relu7. ``zoo``: the ONNX
    zoo's names (conv1_w_0 …), explicit end pads instead of ceil_mode, a Reshape before fc6, fc7
    stored transposed (Gemm transB = 0), softmax out."""
    inits, nodes = [], []

    def tensor(name, a):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        return out

    def wb(n):
        w, b = blobs[n]
        return [tensor(f"{n}_w_0" if zoo else f"{n}_w", w), tensor(f"{n}_b_0" if zoo else f"{n}_b", b)]

    def pool(h, i, size):  # Caffe rounds up; the zoo writes it as end pads where that matters
        if zoo:
            end = 1 if (size - 3) % 2 else 0
            return node("MaxPool", [h], f"pool{i}", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, end, end])
        return node("MaxPool", [h], f"pool{i}", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)

    x = "data_0" if zoo else "data"
    s1 = (crop - 11) // 4 + 1
    h = node("Relu", [node("Conv", [x, *wb("conv1")], "conv1", kernel_shape=[11, 11], strides=[4, 4])], "relu1")
    h = pool(node("LRN", [h], "norm1", size=5, alpha=1e-4, beta=0.75, bias=lrn_bias), 1, s1)
    s2 = -(-(s1 - 3) // 2) + 1
    h = node("Relu", [node("Conv", [h, *wb("conv2")], "conv2", kernel_shape=[5, 5], pads=[2, 2, 2, 2], group=2)],
             "relu2")
    h = pool(node("LRN", [h], "norm2", size=5, alpha=1e-4, beta=0.75, bias=lrn_bias), 2, s2)
    for n, g in (("conv3", 1), ("conv4", 2), ("conv5", 2)):
        h = node("Relu", [node("Conv", [h, *wb(n)], n, kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=g)],
                 f"relu{n[-1]}")
    h = pool(h, 5, 13)
    if zoo:
        h = node("Reshape", [h, tensor("OC2_DUMMY_1", np.array([0, -1], np.int64))], "flat")
    else:
        h = node("Flatten", [h], "flat")
    h = node("Relu", [node("Gemm", [h, *wb("fc6")], "fc6", transB=1)], "relu6")
    if zoo:  # fc7 stored (in, out), as a Gemm without transB
        w7, b7 = blobs["fc7"]
        ins = [tensor("fc7_w_0", np.ascontiguousarray(w7.T)), tensor("fc7_b_0", b7)]
        h = node("Relu", [node("Gemm", [h, *ins], "fc7", transB=0)], "relu7")
    else:
        h = node("Relu", [node("Gemm", [h, *wb("fc7")], "fc7", transB=1)], "relu7")
    logits = node("Gemm", [h, *wb("fc8")], "fc8", transB=1)
    outs = [node("Softmax", [logits], "prob_1", axis=1)] if zoo else [logits, "relu7"]
    graph = helper.make_graph(
        nodes, "bvlc_alexnet", [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", 3, crop, crop])],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["N", "C"]) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_graph(path, x_bgr: np.ndarray):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_bgr})


def bgr_images(n=2, crop=227, seed=0):
    """Mean-subtracted crops, Caffe's channel order."""
    return (np.random.default_rng(seed).standard_normal((n, 3, crop, crop)) * 50).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The wire format


@pytest.mark.parametrize("schema,legacy_fc", [("V2", False), ("V1", False), ("V1", True)])
def test_a_caffemodel_reads_back_bit_equal_in_either_schema(tmp_path, schema, legacy_fc):
    blobs = caffe_blobs()
    (tmp_path / "w.caffemodel").write_bytes(caffemodel(blobs, schema, legacy_fc))
    r = read_caffemodel(tmp_path / "w.caffemodel")
    assert r["schema"] == schema and sorted(r["blobs"]) == sorted(blobs)
    for n, (w, b) in blobs.items():
        got_w, got_b = r["blobs"][n]
        if legacy_fc and n.startswith("fc"):
            assert got_w.shape == (1, 1) + w.shape
            got_w = got_w[0, 0]
        if schema == "V1" and not n.startswith("fc"):
            assert got_b.shape == (1, 1, 1, len(b))
        assert np.array_equal(got_w.reshape(w.shape), w) and np.array_equal(got_b.reshape(-1), b), n
    assert r["lrn"]["norm1"] == dict(local_size=5, alpha=pytest.approx(1e-4), beta=0.75, norm_region=0, k=1.0)
    state, width, classes = caffe_to_state(r["blobs"])
    assert width == NARROW and classes == 10


def test_damaged_or_foreign_files_and_other_lrn_settings_are_refused_in_one_line(tmp_path, capsys):
    data = caffemodel(caffe_blobs())
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReplicaError, match="truncated"):
        read_caffemodel(tmp_path / "cut.caffemodel")
    (tmp_path / "k2.caffemodel").write_bytes(caffemodel(caffe_blobs(), lrn_k=2.0))
    assert main(["import", str(tmp_path / "k2.caffemodel"), "--out", str(tmp_path / "r"), "--mean", "104,117,123"]) == 2
    err = capsys.readouterr().err
    assert "layer norm1 is an LRN with" in err and "'k': 2.0" in err and err.count("\n") == 1
    other = caffe_blobs()
    other["conv3"][0] = other["conv3"][0][:, :10]  # conv3 reading 10 maps, not both towers' 16
    (tmp_path / "odd.caffemodel").write_bytes(caffemodel(other))
    with pytest.raises(ReplicaError, match=r"layer conv3 gives tower_a.conv3.weight of shape \(12, 10, 3, 3\)"):
        import_weights(tmp_path / "odd.caffemodel", tmp_path / "r2", mean="104,117,123")
    (tmp_path / "text.caffemodel").write_text("not a model at all\n")
    with pytest.raises(ReplicaError):
        read_caffemodel(tmp_path / "text.caffemodel")
    mean = np.random.default_rng(0).random((1, 3, 256, 256)).astype(np.float32) * 255
    (tmp_path / "mean.binaryproto").write_bytes(blob(mean, "legacy"))
    assert np.array_equal(read_binaryproto(tmp_path / "mean.binaryproto").reshape(mean.shape), mean)


# ---------------------------------------------------------------------------------------------
# The mapping


def test_the_mapping_at_full_size_splits_reverses_and_scales_exactly():
    full = caffe_blobs(width=1.0, classes=1000)
    state, width, classes = caffe_to_state(full)
    assert (width, classes) == (1.0, 1000)
    assert sum(v.numel() for v in state.values()) == 60_965_224 == count_parameters(AlexNet(1000, "cpu"))
    w1 = full["conv1"][0]
    assert torch.equal(state["tower_a.conv1.weight"], torch.from_numpy(w1[:48, ::-1].copy()))  # BGR → RGB
    assert torch.equal(state["tower_b.conv1.weight"][:, 0], torch.from_numpy(w1[48:, 2]))
    assert torch.equal(state["tower_b.conv3.weight"], torch.from_numpy(full["conv3"][0][192:]))  # reads a then b
    assert torch.equal(state["tower_a.fc6.weight"], torch.from_numpy(full["fc6"][0][:2048]))
    assert torch.equal(state["tower_b.fc7.weight"], torch.from_numpy(2 * full["fc7"][0][2048:]))  # dropout ×2
    assert torch.equal(state["fc8.weight"], torch.from_numpy(2 * full["fc8"][0]))
    assert torch.equal(state["fc8.bias"], torch.from_numpy(full["fc8"][1]))  # biases never scaled
    back = state_to_caffe(state)
    assert all(np.array_equal(back[n][0], full[n][0]) and np.array_equal(back[n][1], full[n][1]) for n in full)


@pytest.mark.parametrize("devices", ["cpu", ("cpu", "cpu")])
def test_imported_weights_compute_what_caffe_computes(tmp_path, devices, monkeypatch):
    """Logits and fc7 features against onnxruntime running the Caffe-form graph, on one device and
    two; with the LRN kept inside each tower the same comparison fails (the boundary is seen)."""
    blobs = caffe_blobs()
    graph = caffe_graph(blobs, tmp_path / "caffe.onnx")
    (tmp_path / "w.caffemodel").write_bytes(caffemodel(blobs))
    import_weights(tmp_path / "w.caffemodel", tmp_path / "run", mean="104,117,123")
    ck = load_checkpoint(tmp_path / "run")
    assert ck.net == NetOptions(preset="caffe", width=NARROW) and ck.crop == 227
    model = model_from_checkpoint(ck, devices)
    x = bgr_images()
    want_logits, want_fc7 = run_graph(graph, x)
    rgb = torch.from_numpy(x[:, ::-1].copy())
    with torch.no_grad():
        logits, fc7 = model(rgb), model.features(rgb)
    scale = float(np.abs(want_logits).max())
    assert scale > 1  # a comparison of logits that are not all near 0
    torch.testing.assert_close(logits, torch.from_numpy(want_logits), rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(fc7, torch.from_numpy(want_fc7), rtol=0, atol=1e-4 * float(np.abs(want_fc7).max()))
    monkeypatch.setattr(NetOptions, "lrn_across_towers", property(lambda self: False))
    with torch.no_grad():
        inside = model(rgb)
    assert float((inside - torch.from_numpy(want_logits)).abs().max()) > 1e-3 * scale


def test_an_onnx_zoo_file_imports_at_224_and_gives_its_probabilities(tmp_path, capsys):
    blobs = caffe_blobs(seed=3)
    zoo = caffe_graph(blobs, tmp_path / "bvlcalexnet-12.onnx", crop=224, zoo=True)
    classes = tmp_path / "synset_words.txt"
    classes.write_text("".join(f"n{i:08d} class {i}, the {i}th\n" for i in range(10)))
    assert main(["import", str(zoo), "--out", str(tmp_path / "run"), "--mean", "104,117,123", "--crop", "224",
                 "--classes", str(classes)]) == 0
    out = capsys.readouterr().out
    assert "(onnx, onnx opset 13)" in out and "not the BVLC release's" in out
    ck = load_checkpoint(tmp_path / "run")
    assert ck.crop == 224 and ck.classes[3] == "n00000003" and ck.names[3] == "class 3, the 3th"
    x = bgr_images(3, 224, seed=1)
    (want,) = run_graph(zoo, x)
    with torch.no_grad():
        got = model_from_checkpoint(ck, "cpu")(torch.from_numpy(x[:, ::-1].copy())).softmax(1)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-5)
    bad = caffe_blobs()
    bad_graph = caffe_graph(bad, tmp_path / "bias2.onnx", zoo=True, lrn_bias=2.0)
    with pytest.raises(ReplicaError, match="is an LRN with"):
        import_weights(bad_graph, tmp_path / "r2", mean="104,117,123")


def test_the_round_trip_through_caffes_form_is_the_identity(tmp_path):
    """A caffe-preset state → Caffe's grouped form (a caffemodel, and a zoo-form ONNX file) → import."""
    torch.manual_seed(0)
    state = AlexNet(10, "cpu", preset="caffe", width=NARROW).state_dict()
    grouped = state_to_caffe(state)
    (tmp_path / "w.caffemodel").write_bytes(caffemodel(grouped))
    caffe_graph(grouped, tmp_path / "w.onnx", zoo=True)
    for f in ("w.caffemodel", "w.onnx"):
        import_weights(tmp_path / f, tmp_path / f"run-{f}", mean="104,117,123")
        back = load_checkpoint(tmp_path / f"run-{f}").model
        assert list(back) == list(state) and all(torch.equal(back[k], v) for k, v in state.items()), f


# ---------------------------------------------------------------------------------------------
# The commands, end to end


def test_import_then_eval_filters_predict_neighbors_report_export(store, tmp_path, capsys):
    from PIL import Image

    blobs = caffe_blobs(classes=4, seed=5)
    (tmp_path / "w.caffemodel").write_bytes(caffemodel(blobs))
    run = tmp_path / "bvlc"
    assert main(["import", str(tmp_path / "w.caffemodel"), "--out", str(run), "--data", str(store)]) == 0
    out = capsys.readouterr()
    assert "sha1" in out.out and "Caffe's order assumed" in out.out + out.err
    assert main(["train", "--resume", str(run)]) == 2
    assert "preset caffe evaluates Caffe's bvlc_alexnet" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(store), "--devices", "cpu"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["1-view"]["images"] == 8 and "10-view" in ev and ev["imported"].startswith("imported from w.caffemodel")
    assert "imported from w.caffemodel" in capsys.readouterr().out
    assert main(["filters", str(run)]) == 0
    assert "note: a short run" not in capsys.readouterr().out
    img = tmp_path / "one.png"
    Image.fromarray(np.full((300, 280, 3), 120, np.uint8)).save(img)
    assert main(["predict", str(run), str(img), "--devices", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"{img}: ")
    assert main(["neighbors", str(run), "--data", str(store), "--queries", "2", "--k", "2", "--devices", "cpu"]) == 0
    assert (run / "neighbors.png").exists()
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Imported weights beside their published figures" in md and "42.90 / 19.80" not in md
    assert "| — | — |" in md and "only for the BVLC release itself" in md  # not BVLC's file, nor its data
    from replica.report import _imported_table

    bvlc = dict(name="bvlc", imported=dict(file="bvlc_alexnet.caffemodel", matches_bvlc=True),
                eval={"split": "val", "classes": 1000, "1-view": dict(images=50_000, skipped=0, top1_err=0.43,
                                                                      top5_err=0.2)})
    assert "| 42.90 / 19.80 |" in "\n".join(_imported_table([bvlc]))
    bvlc["eval"]["1-view"]["images"] = 8
    assert "| 42.90 / 19.80 |" not in "\n".join(_imported_table([bvlc]))
    capsys.readouterr()
    assert main(["export", str(run), "--onnx", str(tmp_path / "bvlc.onnx")]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "bvlc.onnx")).metadata_props}
    assert meta["preset"] == "caffe" and meta["crop"] == "227" and meta["imported_from"] == "w.caffemodel"


def lrn_attributes(path) -> list[tuple]:
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "LRN"]
    return [tuple(round(float(helper.get_attribute_value(a)), 8) for a in sorted(n.attribute, key=lambda a: a.name))
            for n in nodes]


@pytest.mark.parametrize("preset,alpha,bias", [("as-run", 1e-4, 2.0), ("paper-text", 5e-4, 2.0), ("caffe", 1e-4, 1.0)])
def test_export_is_checked_by_onnxruntime_with_the_presets_lrn(tmp_path, preset, alpha, bias):
    torch.manual_seed(0)
    net = NetOptions(preset=preset, width=NARROW)
    model = AlexNet.from_options(net, 10, "cpu")
    with torch.no_grad():  # He's init: logits far from 0, so that the check's tolerance means something
        for p in model.parameters():
            p.normal_(0, (2 / p[0].numel()) ** 0.5) if p.dim() > 1 else p.zero_()
    ck = Checkpoint(net=net, classes=list("abcdefghij"), model=model.state_dict(),
                    mean=torch.rand(3, 256, 256) * 255, crop=model.input_size)
    save_checkpoint(tmp_path / "c.pt", ck)
    from replica.export import export_onnx

    r = export_onnx(tmp_path / "c.pt", tmp_path / "m.onnx")
    assert r["lrn_nodes"] == 4 and r["check"]["top1_agree"] and r["check"]["max_abs_diff"] <= r["check"]["tolerance"]
    assert set(lrn_attributes(tmp_path / "m.onnx")) == {(alpha, 0.75, bias, 5.0)}  # alpha, beta, bias, size
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] not in (1, 2)  # a dynamic batch
    x = torch.rand(3, 3, ck.crop, ck.crop) * 255
    with torch.no_grad():
        want = model.eval()(x - ck.mean[:, 14:14 + ck.crop, 14:14 + ck.crop] if ck.crop == 227 else
                            x - ck.mean[:, 16:240, 16:240])
    got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert float(want.abs().max()) > 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


def test_an_export_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    """The check can fail: the file's LRN α changed behind the exporter's back."""
    from replica import export as export_mod

    torch.manual_seed(0)
    net = NetOptions(width=NARROW)
    model = AlexNet.from_options(net, 10, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, (2 / p[0].numel()) ** 0.5) if p.dim() > 1 else p.zero_()
    save_checkpoint(tmp_path / "c.pt", Checkpoint(net=net, classes=list("abcdefghij"), model=model.state_dict(),
                                                  mean=torch.zeros(3, 256, 256)))
    real = export_mod.serialize

    def tampered(proto):
        for n in proto.graph.node:
            if n.op_type == "LRN":
                for a in n.attribute:
                    if a.name == "alpha":
                        a.f = 1e-2
        return real(proto)

    (tmp_path / "m.onnx").write_bytes(b"a previous export")
    monkeypatch.setattr(export_mod, "serialize", tampered)
    with pytest.raises(ReplicaError, match="onnxruntime's logits differ from replica's") as e:
        export_mod.export_onnx(tmp_path / "c.pt", tmp_path / "m.onnx")
    assert f"{tmp_path / 'm.onnx'} untouched" in str(e.value)
    assert (tmp_path / "m.onnx").read_bytes() == b"a previous export"  # all or nothing
    assert onnx.load(str(tmp_path / "m.failed.onnx")).graph.node  # the failing file, kept beside it


def test_a_missing_onnx_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert main(["export", str(tmp_path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[onnx]'" in err and "onnxscript missing" in err and err.count("\n") == 1
