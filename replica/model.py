"""AlexNet as run 145 computed it: two towers, one per device, with the paper's cross-connections.

Read top to bottom: placement, the one cross-device helper, a tower's layers, the model.

Topology per tower (docs/spec.md §1; layers-145.cfg):

    input 3×224×224 ──pad (0,3,0,3)──▶ 3×227×227
    conv1 48 11/4     ─▶ 48×55×55   ─ layer 1 (order per preset) ─▶ 48×27×27
    conv2 128 5/1/2   ─▶ 128×27×27  ─ layer 2 (order per preset) ─▶ 128×13×13   own tower only
    conv3 192 3/1/1   ─▶ 192×13×13  reads BOTH towers (channels a then b)
    conv4 192, conv5 128 3/1/1, ReLU, maxpool ─▶ 128×6×6              own tower only
    fc6 2048  reads both towers' pool5 (9216)  → ReLU → dropout
    fc7 2048  reads both towers' fc6 (4096)    → ReLU → dropout
    fc8 = one Linear(4096 → classes) on device 0, reading both towers' fc7

Placement: with two devices each tower is a column on its own device and every join is one of
four named functions over :func:`cross`, each with its backward stated: :func:`broadcast` (the
input to both), :func:`exchange` (a layer that reads both towers), :func:`gather` (both towers
onto device 0) and :func:`boundary` (the caffe preset's LRN). With one device the columns can
run there as they are (:func:`cross` returns its input: the same code, the same ``state_dict``
keys, the same math), or as the grouped network (``grouped``; Caffe's form: one 96-filter
conv1, conv2/4/5 ``groups=2``, conv3 and the fc layers dense) over the same parameters, packed
side by side (:meth:`AlexNet.pack_parameters`, :func:`merge`). ``tests/test_model.py`` holds an
independent grouped formulation and checks both forms against it and each other, logits and
gradients. ``grouped=None`` (auto) takes the grouped form on one CUDA device (half the kernels a
step) and the columns on the CPU, where oneDNN ran grouped and per-tower convolutions at the
same speed (``tools/bench.py model`` prints both forms).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import NetOptions
from .devices import resolve_devices
from .errors import ReplicaError
from .layers import dropout_noninverted, exporting, local_response_norm, spatial_response_norm

log = logging.getLogger("replica")

# ----------------------------------------------------------------------------------------------
# Placement


def cross(x: Tensor, device: torch.device) -> Tensor:
    """Move an activation to ``device``: the only place where one tower reads the other.

    Forward it is a copy ``y = x`` onto ``device``; backward autograd copies ``∂L/∂y`` back.
    Per image in fp32 this carries 28,288 floats each way (conv3 21,632, fc6 4,608, fc7 2,048)
    plus 2,048 into fc8 (docs/spec.md §7). On the same device it returns ``x`` itself.

    Non-blocking only onto a CUDA device: there the copy is queued on the destination's stream,
    ahead of every kernel that reads it. A non-blocking copy from a GPU onto the CPU returns
    before the bytes have arrived, and the CPU tower would read a half-written tensor (a
    ``cuda:0,cpu`` split); onto the CPU it blocks until the data is there.
    """
    return x.to(device, non_blocking=device.type == "cuda")  # (N, …) on x.device → (N, …) on device


def broadcast(x: Tensor, da: torch.device, db: torch.device) -> tuple[Tensor, Tensor]:
    """The input on each tower's device: both towers see the whole image.

    Forward: one copy onto each device (none onto the device it is on). Backward: the gradients
    of the two copies come back and add up (the input's gradient, which training does not use).
    """
    return cross(x, da), cross(x, db)


def exchange(ha: Tensor, hb: Tensor) -> tuple[Tensor, Tensor]:
    """Each tower's input to a layer that reads both towers (conv3, fc6, fc7): a's maps then b's,
    once on a's device and once on b's.

    Forward: ``(cat[ha, cross(hb → a)], cat[cross(ha → b), hb])`` along channels. Backward: each
    tower keeps the gradient of its own half, and the gradient of the other's half crosses back
    (through :func:`cross`) and is added to that tower's; two copies each way per join.
    """
    return torch.cat([ha, cross(hb, ha.device)], 1), torch.cat([cross(ha, hb.device), hb], 1)


def gather(ha: Tensor, hb: Tensor) -> Tensor:
    """Both towers side by side (a then b) on tower a's device: fc8's input, Fig. 4's features.

    Forward: ``cat[ha, cross(hb → a)]``. Backward: b's half of the gradient crosses back to b's
    device; one copy each way.
    """
    return torch.cat([ha, cross(hb, ha.device)], 1)


def boundary(ha: Tensor, hb: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """The caffe preset's LRN window across the tower boundary: a's maps then b's first ``r``, on
    a's device; a's last ``r`` then b's maps, on b's (Caffe normalizes all 96 / 256 maps together,
    replica.config.NetOptions.lrn_across_towers).

    Forward: ``r`` maps cross each way. Backward: their gradients cross back and add to the
    other tower's; ``r`` maps each way.
    """
    return torch.cat([ha, cross(hb[:, :r], ha.device)], 1), torch.cat([cross(ha[:, -r:], hb.device), hb], 1)


class _Merge(torch.autograd.Function):
    """``cat([a, b])`` along dim 0 of a parameter pair: a view of their one buffer when the two
    halves are adjacent in it (:meth:`AlexNet.pack_parameters`), else a copy. Backward: the two
    halves of the gradient, as views."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.n = a.shape[0]
        if packed_pair(a, b):
            return a.as_strided((a.shape[0] + b.shape[0], *a.shape[1:]), a.stride(), a.storage_offset())
        return torch.cat([a, b])

    @staticmethod
    def backward(ctx, g: Tensor):
        return g[:ctx.n], g[ctx.n:]


def packed_pair(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` follows ``a`` in one storage, dim 0 outermost, with the same strides: then
    ``cat([a, b])`` along dim 0 is a view."""
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.stride() == b.stride()
            and a.shape[1:] == b.shape[1:] and a.stride(0) * a.shape[0] == a.numel()
            and b.storage_offset() == a.storage_offset() + a.numel())


def merge(a: Tensor, b: Tensor) -> Tensor:
    """Towers a's and b's parameters of one layer as the grouped layer's (a's rows, then b's)."""
    return _Merge.apply(a, b)


# ----------------------------------------------------------------------------------------------
# Constants (the net's options are replica.config.NetOptions)


LRN_SIZE, LRN_BETA = 5, 0.75  # layers-145.cfg:39; layer-params-145.cfg:137-155 (k: NetOptions.lrn_k)
DROPOUT_KEEP = 0.5  # §4.2; the `hs` layer's keep=0.5


# ----------------------------------------------------------------------------------------------
# Towers


class Tower(nn.Module):
    """One column's parameters (``conv1a``…``fc2048ba`` in layers-145.cfg).

    ``conv3_in``, ``fc6_in`` and ``fc7_in`` count what the layer reads, both towers included.
    """

    def __init__(self, widths, fc: int, conv3_in: int, fc6_in: int, fc7_in: int, conv2_pad: int, conv5_pad: int,
                 conv6: tuple[int, int] | None = None):
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.conv1 = nn.Conv2d(3, c1, 11, stride=4)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=conv2_pad)
        self.conv3 = nn.Conv2d(conv3_in, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv5 = nn.Conv2d(c4, c5, 3, padding=conv5_pad)
        if conv6 is not None:  # run 146: (what it reads, both towers' pool5; its filters)
            self.conv6 = nn.Conv2d(conv6[0], conv6[1], 3, padding=1)
        self.fc6 = nn.Linear(fc6_in, fc)
        self.fc7 = nn.Linear(fc7_in, fc)


# (weight σ, bias) per layer and init scheme. as-run: layers-145.cfg initW/initB lines (§2.2 of
# the 2012 code). paper-text: §5 "zero-mean Gaussian with standard deviation
# 0.01", biases 1 in conv2/4/5 and the hidden fc layers. caffe: bvlc_alexnet's variant.
INIT_TABLE = {
    # conv6: run 146's only (layers-146-2012-2011.cfg: σ 0.03, bias 1; paper-text and caffe: as their conv4/5)
    "as-run": dict(conv1=(0.01, 0), conv2=(0.01, 1), conv3=(0.03, 0), conv4=(0.03, 1), conv5=(0.03, 1),
                   conv6=(0.03, 1), fc6=(0.01, 1), fc7=(0.01, 1), fc8=(0.01, 0)),
    "paper-text": dict(conv1=(0.01, 0), conv2=(0.01, 1), conv3=(0.01, 0), conv4=(0.01, 1), conv5=(0.01, 1),
                       conv6=(0.01, 1), fc6=(0.01, 1), fc7=(0.01, 1), fc8=(0.01, 0)),
    "caffe": dict(conv1=(0.01, 0), conv2=(0.01, 0.1), conv3=(0.01, 0), conv4=(0.01, 0.1), conv5=(0.01, 0.1),
                  conv6=(0.01, 0.1), fc6=(0.005, 0.1), fc7=(0.005, 0.1), fc8=(0.01, 0)),
    # Not the paper's: σ = √(2 / fan-in) (He et al., 2015), biases 0. For narrow trial nets: at 1/16
    # width the paper's and Caffe's σ give every image the same logits (their spread across 8
    # images 9e-5 and 1e-5 of their largest; He's 0.36: tests/test_model.py), so predictions,
    # export checks and verdicts say nothing; with this scale they differ by image
    # (tools/reproduce.py --tiny uses it).
    "he": {name: (None, 0) for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7", "fc8")},
}


class AlexNet(nn.Module):
    """The two-GPU AlexNet of Krizhevsky et al. (2012), as the 2012 code ran it.

    Args:
        num_classes: outputs of fc8 (1000 for ImageNet).
        devices: ``"auto"``, one device (``"cpu"``, ``"cuda:0"``) or two (``("cuda:0", "cuda:1")``).
            Tower a lives on the first, tower b and fc8 placement follow docs/spec.md §1.
        preset: ``"as-run"`` (what run 145 computed; default) or ``"paper-text"``.
        width, norm, overlap, variant, dropout, init: the other fields of
            :class:`replica.config.NetOptions`; or ``net=`` a whole NetOptions
            (:meth:`from_options`), as training and a checkpoint give it.
        channels_last, fused_norms, grouped: how it runs, not what it computes: activations'
            memory layout, the norms as compiled loops (settable later as ``model.fused_norms``),
            and, where both towers share one device, the grouped form (None, auto: on one CUDA
            device; :meth:`place`).

    Departures from ``torchvision.models.alexnet``: 96 conv1 filters split 48/48, per-tower
    conv2/4/5 and LRN, the spatial norm after layer 2 (as-run), non-inverted dropout, input
    zero-extended right and bottom by 3 (cuda-convnet's ceil output size) rather than padded 2.
    """

    def __init__(self, num_classes: int = 1000, devices="auto", preset: str = "as-run", *,
                 channels_last: bool = True, fused_norms: bool = False, grouped: bool | None = None,
                 conv1_channels: int = 3, net: NetOptions | None = None, **options):
        super().__init__()
        if conv1_channels not in (3, 4, 8):
            raise ReplicaError(f"conv1_channels: expected 3, 4 or 8, got {conv1_channels!r}")
        # Layout, not math: the input written with zero channels past the third and conv1's weights
        # read with zeros there, so that cuDNN need not pad a 3-channel NHWC input each step
        self.conv1_channels = conv1_channels
        if grouped not in (None, True, False):
            raise ReplicaError(f"grouped: expected true, false or null (auto), got {grouped!r}")
        self.grouped_setting, self.grouped = grouped, False  # resolved by place()
        # Layout only, not math. On CPU, torch's NCHW max-pooling is slow and its channels_last
        # kernel is not; tools/bench.py model times the train step in both layouts.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Not math either: the norms as compiled loops (replica.layers; `fused_norms` in the config).
        self.fused_norms = fused_norms
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ReplicaError(f"num_classes: expected a positive integer, got {num_classes!r}")
        allowed = [f for f in NetOptions.__dataclass_fields__ if f != "preset"]
        unknown = set(options) - set(allowed)
        if unknown:
            raise ReplicaError(f"AlexNet: unknown option(s) {sorted(unknown)}; expected {', '.join(allowed)}")
        if net is not None and (options or preset != "as-run"):
            raise ReplicaError("AlexNet: give the options either as net=NetOptions(...) or one by one, not both")
        self.opts = net if net is not None else NetOptions(preset=preset, **options)
        self.num_classes = num_classes
        self.width = float(self.opts.width)
        conv2_pad, conv5_pad = self.opts.conv_pads
        pool5 = output_sizes(self.opts)["pool5"] ** 2  # 6×6 positions

        def w(n):  # a layer's filters or units at this width (1: the paper's)
            return max(1, round(n * self.width))

        if self.opts.variant in ("two-tower", "six-conv"):
            widths, fc = tuple(w(n) for n in (48, 128, 192, 192, 128)), w(2048)  # conv1…conv5, fc6/fc7 per tower
            if self.opts.lrn_across_towers and min(widths[:2]) < LRN_SIZE // 2:
                raise ReplicaError(f"width {self.width:g}: the caffe preset's LRN reads {LRN_SIZE // 2} maps of the "
                                   f"other tower; conv1 has {widths[0]} per tower")
            # run 146: conv6, 128 per tower over both towers' pool5 (256), 3×3 pad 1: fc6 reads its 6×6 maps
            conv6 = (2 * widths[4], w(128)) if self.opts.variant == "six-conv" else None
            last = conv6[1] if conv6 else widths[4]
            ins = (2 * widths[1], 2 * last * pool5, 2 * fc)  # conv3, fc6, fc7 read both towers: 256, 9216, 4096
            self.tower_a = Tower(widths, fc, *ins, conv2_pad, conv5_pad, conv6)
            self.tower_b = Tower(widths, fc, *ins, conv2_pad, conv5_pad, conv6)
            fc8_in = 2 * fc
        else:  # layers-145-half.cfg: one column, conv5 256 wide, fc 4096
            widths, fc = tuple(w(n) for n in (48, 128, 192, 192, 256)), w(4096)
            self.tower_a = Tower(widths, fc, widths[1], widths[4] * pool5, fc, conv2_pad, conv5_pad)  # 128, 9216, 4096
            self.tower_b = None
            fc8_in = fc
        self.fc8 = nn.Linear(fc8_in, num_classes)
        if devices is not None:  # None: the shapes only, neither drawn nor placed (state_shapes)
            self.reset_parameters()
            self.place(devices)

    @classmethod
    def state_shapes(cls, net: NetOptions, num_classes: int) -> dict[str, tuple[int, ...]]:
        """Each ``state_dict`` entry's shape of the net ``net`` describes, allocating nothing: built
        on torch's ``meta`` device. What a file's declared shapes are checked against before any
        tensor of that size exists (a small file must not make replica ask for gigabytes)."""
        with torch.device("meta"):
            m = cls(num_classes, None, net=net)
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}

    @classmethod
    def check_state(cls, net: NetOptions, num_classes: int, state) -> None:
        """Refuse, in one line and before any tensor is made, a ``state`` (a checkpoint's weights)
        whose names or shapes are not those of the net ``net`` describes: a record's width or class
        list cannot make replica allocate what its weights do not hold."""
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ReplicaError(f"num_classes: expected a positive integer, got {num_classes!r}")
        want = cls.state_shapes(net, num_classes)
        got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
        if got == want:
            return
        where = f"the {net.variant} net at width {net.width:g} with {num_classes} classes"
        missing = [k for k in want if k not in got]
        if missing:
            raise ReplicaError(f"the weights do not fit {where}: no {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [k for k in got if k not in want]
        if extra:
            raise ReplicaError(f"the weights do not fit {where}: an unexpected {extra[0]}")
        k = next(k for k in want if got[k] != want[k])
        raise ReplicaError(f"the weights do not fit {where}: {k} is {got[k]} in the file, {want[k]} in the net")

    @classmethod
    def with_weights(cls, net: NetOptions, num_classes: int, state, devices="auto", **how) -> "AlexNet":
        """The net ``net`` describes with ``state`` loaded, checked first (:meth:`check_state`)."""
        cls.check_state(net, num_classes, state)
        model = cls.from_options(net, num_classes, devices, **how)
        model.load_state_dict(state)
        return model

    @classmethod
    def from_options(cls, net: NetOptions, num_classes: int, devices="auto", **how) -> "AlexNet":
        """The net a :class:`NetOptions` describes (``how``: channels_last, fused_norms)."""
        return cls(num_classes, devices, net=net, **how)

    # -- setup ---------------------------------------------------------------------------------

    @property
    def input_size(self) -> int:
        """The crop it takes: 224 (zero-extended to 227 inside), or the caffe preset's 227."""
        return 224 if self.opts.input_pad else 227

    @property
    def towers(self) -> list[Tower]:
        return [t for t in (self.tower_a, self.tower_b) if t is not None]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw weights ~ N(0, σ²) and set constant biases, per the init scheme (docs/spec.md §2)."""
        table = INIT_TABLE[self.opts.init_scheme]
        layers = [(name, getattr(t, name)) for t in self.towers for name in
                  ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7") if hasattr(t, name)]
        layers += [("fc8", self.fc8)]
        with torch.no_grad():
            for name, layer in layers:
                std, bias = table[name]
                if std is None:  # He's: from the layer's fan-in
                    std = math.sqrt(2 / layer.weight[0].numel())
                w = torch.randn(layer.weight.shape, generator=generator) * std
                layer.weight.copy_(w)
                layer.bias.fill_(bias)

    def place(self, devices="auto") -> "AlexNet":
        """Put tower a (and fc8) on the first device, tower b on the second."""
        self.devices = resolve_devices(devices, towers=len(self.towers))
        if self.tower_b is None and len(self.devices) == 2:
            raise ReplicaError("variant 'one-gpu-half' has one tower: give it one device, not two")
        d0 = self.devices[0]
        d1 = self.devices[-1]
        self.tower_a.to(d0, memory_format=self.memory_format)
        if self.tower_b is not None:
            self.tower_b.to(d1, memory_format=self.memory_format)
        self.fc8.to(d0)
        together = self.tower_b is not None and d0 == d1
        self.grouped = together and (self.grouped_setting if self.grouped_setting is not None else d0.type == "cuda")
        if self.grouped:
            self.pack_parameters()
        return self

    def pack_parameters(self) -> None:
        """Each pair of the towers' parameters into one buffer, a's half then b's, so that the
        grouped form reads them as one tensor without a copy (:func:`merge`). The Parameters stay
        the same objects, with the same names, values and ``state_dict``; ``load_state_dict`` copies
        into them in place and keeps the packing. A ``.to()`` or ``.double()`` after it undoes the
        packing: the grouped form then copies (the same result, slower)."""
        if self.tower_b is None:
            return
        with torch.no_grad():
            for name, pa in self.tower_a.named_parameters():
                pb = self.tower_b.get_parameter(name)
                fmt = torch.channels_last if pa.dim() == 4 and pa.is_contiguous(
                    memory_format=torch.channels_last) else torch.contiguous_format
                buf = torch.empty((pa.shape[0] + pb.shape[0], *pa.shape[1:]), dtype=pa.dtype, device=pa.device,
                                  memory_format=fmt)
                buf[:pa.shape[0]].copy_(pa)
                buf[pa.shape[0]:].copy_(pb)
                pa.data, pb.data = buf[:pa.shape[0]], buf[pa.shape[0]:]

    # -- the layers: each takes and returns the towers' activations (a list of one or two; with
    # groups=2 one tensor that holds both towers' maps, a's then b's: the grouped form) -----------

    def _lrn(self, h: list, groups: int = 1) -> list:
        """LRN of each tower's maps. The caffe preset's window also reads the other tower's
        LRN_SIZE // 2 maps nearest the boundary (:func:`boundary`; on one device the same code)."""
        o = self.opts

        def norm(t, g=1):
            return local_response_norm(t, LRN_SIZE, o.lrn_alpha, LRN_BETA, o.lrn_k, groups=g, fused=self.fused_norms)

        if groups == 2:  # both towers' maps in one tensor (the grouped form): per tower, or across (caffe)
            return [norm(h[0], 1 if o.lrn_across_towers else 2)]
        if not (o.lrn_across_towers and len(h) == 2):
            return [norm(t) for t in h]
        r, c = LRN_SIZE // 2, h[0].shape[1]
        a, b = boundary(*h, r)  # a's maps then b's first 2; a's last 2 then b's maps
        return [norm(a)[:, :c], norm(b)[:, r:]]

    def _layer1(self, h: list, groups: int = 1) -> list:
        o = self.opts
        if not o.norm:
            return [F.max_pool2d(F.relu_(t), *self._pool()) for t in h]
        if o.lrn_before_relu:  # as-run: conv1 → LRN (pre-ReLU) → maxpool → ReLU
            return [F.relu_(F.max_pool2d(t, *self._pool())) for t in self._lrn(h, groups)]
        return [F.max_pool2d(t, *self._pool()) for t in self._lrn([F.relu_(t) for t in h], groups)]  # paper-text, caffe

    def _layer2(self, h: list, groups: int = 1) -> list:
        o = self.opts
        h = [F.relu_(t) for t in h]
        if o.norm:
            h = self._lrn(h, groups)
        if o.spatial_norm:  # layer-params-145.cfg:157-163
            h = [spatial_response_norm(t, 5, 1e-3, 0.75, fused=self.fused_norms) for t in h]
        return [F.max_pool2d(t, *self._pool()) for t in h]

    def _pool(self):
        # F.max_pool2d's (kernel, stride, padding, dilation, ceil_mode), from NetOptions.pool
        window, stride, ceil = self.opts.pool
        return window, stride, 0, 1, ceil

    def _dropout(self, x: Tensor) -> Tensor:
        return dropout_noninverted(x, DROPOUT_KEEP, self.training) if self.opts.dropout else x

    def _pad(self, x: Tensor) -> Tensor:
        # cuda-convnet's conv output 1 + ceil((img − filter)/stride) reads 3 zero columns/rows
        # past the right and bottom edge (layer.py:1004): 224 → 227 → 55. Written straight
        # into the model's layout, once: an NCHW input to channels_last convs is converted by
        # each conv1, forward and backward (4 copies a step; 38 ms at batch 128 on CPU).
        # The caffe preset pads nothing (a 227 crop); an export writes the pad as one op.
        p = self.opts.input_pad
        extra = 0 if exporting() else self.conv1_channels - x.shape[1]  # zero channels (conv1_channels)
        if p == 0 and not extra:
            return x.contiguous(memory_format=self.memory_format)
        if exporting():
            return F.pad(x, (0, p, 0, p))
        n, c, h, w = x.shape
        out = torch.empty((n, c + extra, h + p, w + p), dtype=x.dtype, device=x.device,
                          memory_format=self.memory_format).zero_()
        out[:, :c, :h, :w] = x
        return out  # (N, 3, 224, 224) → (N, 3 or conv1_channels, 227, 227)

    @staticmethod
    def _conv1(x: Tensor, conv=None, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """conv1 (the module ``conv``, or ``weight`` and ``bias``) over an input of 3 channels or of
        ``conv1_channels``: its weights then read with zeros for the extra ones (the same sums)."""
        if conv is not None:
            if x.shape[1] == conv.weight.shape[1]:
                return conv(x)  # the module itself: its hooks see it (replica model's table)
            weight, bias = conv.weight, conv.bias
        if x.shape[1] != weight.shape[1]:
            weight = F.pad(weight, (0, 0, 0, 0, 0, x.shape[1] - weight.shape[1]))
        return F.conv2d(x, weight, bias, stride=4)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, 224, 224) mean-subtracted 0–255 RGB → (N, classes) logits on device 0 (the caffe
        preset: 227 × 227 crops, or 224 as the ONNX zoo's graph)."""
        return self._run(x, "fc8")

    def features(self, x: Tensor) -> Tensor:
        """fc7 activations after ReLU, both towers (N, 4096) on device 0: Fig. 4's features."""
        return self._run(x, upto="fc7")

    def _run(self, x, upto):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ReplicaError(f"AlexNet expects (N, 3, H, W) images, got shape {tuple(x.shape)}")
        if self.tower_b is None:
            return self._forward_half(x, upto)
        if self.grouped and not exporting():
            return self._forward_grouped(x, upto)
        return self._forward_towers(x, upto)

    def _forward_towers(self, x: Tensor, upto: str = "fc8") -> Tensor:
        a, b = self.tower_a, self.tower_b
        d0, d1 = self.devices[0], self.devices[-1]
        x = self._pad(x)
        xa, xb = broadcast(x, d0, d1)  # each tower sees the whole image
        ha, hb = self._layer1([self._conv1(xa, a.conv1), self._conv1(xb, b.conv1)])  # (N, 48, 27, 27) on d0 and d1
        ha, hb = self._layer2([a.conv2(ha), b.conv2(hb)])  # (N, 128, 13, 13)
        ha, hb = exchange(ha, hb)  # (N, 256, 13, 13): a then b, on each device
        ha = F.relu_(a.conv3(ha))  # (N, 192, 13, 13)
        hb = F.relu_(b.conv3(hb))
        ha = F.relu_(a.conv4(ha))
        hb = F.relu_(b.conv4(hb))
        ha = F.max_pool2d(F.relu_(a.conv5(ha)), *self._pool())  # (N, 128, 6, 6)
        hb = F.max_pool2d(F.relu_(b.conv5(hb)), *self._pool())
        if self.opts.variant == "six-conv":  # run 146: conv6 reads both towers' pool5
            ha, hb = exchange(ha, hb)  # (N, 256, 6, 6)
            ha, hb = F.relu_(a.conv6(ha)), F.relu_(b.conv6(hb))  # (N, 128, 6, 6)
        ha, hb = exchange(ha.flatten(1), hb.flatten(1))  # (N, 9216)
        ha = self._dropout(F.relu_(a.fc6(ha)))  # (N, 2048)
        hb = self._dropout(F.relu_(b.fc6(hb)))
        ha, hb = exchange(ha, hb)  # (N, 4096)
        ha = F.relu_(a.fc7(ha))  # (N, 2048)
        hb = F.relu_(b.fc7(hb))
        if upto == "fc7":
            return gather(ha, hb)  # (N, 4096) on d0
        ha, hb = self._dropout(ha), self._dropout(hb)
        return self.fc8(gather(ha, hb))  # (N, 4096) → (N, classes) on d0

    def _forward_grouped(self, x: Tensor, upto: str = "fc8") -> Tensor:
        """Both towers on one device as the paper's grouped network (Caffe writes it so): one
        96-filter conv1, conv2/4/5 with ``groups=2``, conv3, fc6 and fc7 dense over both towers'
        maps, each LRN within its tower (the caffe preset: across). The same parameters, the same
        math and the same dropout draws as :meth:`_forward_towers` (tests/test_model.py), in
        half the kernels: no joins to make."""
        o = self.opts
        pair = self._merged
        (p2, p5), pool = o.conv_pads, self._pool()
        h = self._conv1(self._pad(x.to(self.devices[0])), None, *pair("conv1"))  # (N, 96, 55, 55): a then b
        h, = self._layer1([h], groups=2)  # (N, 96, 27, 27)
        h, = self._layer2([F.conv2d(h, *pair("conv2"), padding=p2, groups=2)], groups=2)  # (N, 256, 13, 13)
        h = F.relu_(F.conv2d(h, *pair("conv3"), padding=1))  # (N, 384, 13, 13): each reads both towers
        h = F.relu_(F.conv2d(h, *pair("conv4"), padding=1, groups=2))
        h = F.max_pool2d(F.relu_(F.conv2d(h, *pair("conv5"), padding=p5, groups=2)), *pool)  # (N, 256, 6, 6)
        if o.variant == "six-conv":  # run 146: conv6 dense over both towers' pool5
            h = F.relu_(F.conv2d(h, *pair("conv6"), padding=1))
        h = h.flatten(1)  # (N, 9216)
        h = self._dropout_pair(F.relu_(F.linear(h, *pair("fc6"))))  # (N, 4096): a's 2048 then b's
        h = F.relu_(F.linear(h, *pair("fc7")))
        if upto == "fc7":
            return h
        return self.fc8(self._dropout_pair(h))

    def _merged(self, layer: str) -> tuple[Tensor, Tensor]:
        a, b = getattr(self.tower_a, layer), getattr(self.tower_b, layer)
        return merge(a.weight, b.weight), merge(a.bias, b.bias)

    def _dropout_pair(self, x: Tensor) -> Tensor:
        """Dropout of both towers' units, drawn a's half then b's as two draws: the masks of
        :meth:`_forward_towers`, from the same random numbers."""
        if not (self.opts.dropout and self.training):
            return self._dropout(x)
        n, c = x.shape
        mask = torch.cat([torch.empty((n, c // 2), dtype=x.dtype, device=x.device).bernoulli_(DROPOUT_KEEP)
                          for _ in range(2)], 1)
        return x * mask

    def _forward_half(self, x: Tensor, upto: str = "fc8") -> Tensor:
        a = self.tower_a
        h, = self._layer1([self._conv1(self._pad(x.to(self.devices[0])), a.conv1)])  # (N, 48, 27, 27)
        h, = self._layer2([a.conv2(h)])  # (N, 128, 13, 13)
        h = F.relu_(a.conv4(F.relu_(a.conv3(h))))  # (N, 192, 13, 13)
        h = F.max_pool2d(F.relu_(a.conv5(h)), *self._pool()).flatten(1)  # (N, 9216)
        h = self._dropout(F.relu_(a.fc6(h)))  # (N, 4096)
        h = F.relu_(a.fc7(h))
        if upto == "fc7":
            return h
        return self.fc8(self._dropout(h))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_sizes(net: NetOptions | bool = True, image: int = 224) -> dict[str, int]:
    """Spatial size after each stage of the net ``net`` describes (or ``overlap`` as a bool), by
    cuda-convnet's formulas (layer.py:1004, 1139), from the geometry NetOptions declares."""
    net = net if isinstance(net, NetOptions) else NetOptions(overlap=net)

    def conv(n, k, s, p):
        return 1 + math.ceil((2 * p + n - k) / s)

    def pool(n):
        return (math.ceil if up else math.floor)((n - k) / stride) + 1

    (k, stride, up), (p2, p5) = net.pool, net.conv_pads
    s = {"conv1": conv(image, 11, 4, 0)}
    s["pool1"] = pool(s["conv1"])
    s["conv2"] = conv(s["pool1"], 5, 1, p2)
    s["pool2"] = pool(s["conv2"])
    s["conv3"] = conv(s["pool2"], 3, 1, 1)
    s["conv4"] = conv(s["conv3"], 3, 1, 1)
    s["conv5"] = conv(s["conv4"], 3, 1, p5)
    s["pool5"] = pool(s["conv5"])
    return s
