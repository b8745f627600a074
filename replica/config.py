"""The training configuration: typed, frozen, and its defaults ARE the as-run preset (run 145).

Load a YAML preset (it holds only its differences from these defaults), apply ``key=value``
overrides, validate, freeze. Each key is declared once below, with its source or its reason.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import ReplicaError

PRESETS = ("as-run", "paper-text", "caffe")  # caffe: evaluating Caffe's bvlc_alexnet (replica import)
VARIANTS = ("two-tower", "one-gpu-half", "six-conv")
INITS = ("as-run", "paper-text", "caffe", "he")  # he: not the paper's; for narrow trial nets (replica.model.INIT_TABLE)


@dataclass(frozen=True)
class NetOptions:
    """The one record of the net: every option that changes what it computes, none of how it runs.

    Built from a :class:`Config` in one place (:attr:`Config.net`), stored whole in each checkpoint,
    compared whole on resume (:func:`replica.runs.check_compatible`), and what rebuilds the net for
    eval, predict, filters and neighbours. Its defaults are run 145 (the as-run preset); a
    :class:`Config` key of the same name and default exists for each field (tested), so a YAML
    file or ``key=value`` sets it. A new ablation switch is a field here, its key in
    :class:`Config`, its use in :mod:`replica.model`, a YAML file and a test.
    """

    preset: str = "as-run"  # or "paper-text" (docs/spec.md §1-3), or "caffe" (bvlc_alexnet's forward)
    variant: str = "two-tower"  # "one-gpu-half" = run 145-half; "six-conv" = run 146 (Table 2's "1 CNN*")
    width: float = 1.0  # every layer's filters and units × width (at least 1 each); 1: the paper's net
    norm: bool = True  # False = run 148: no LRN and no spatial norm
    overlap: bool = True  # False = run 147: pool 2/2 ceil, conv2 pad 1, conv5 pad 0
    dropout: bool = True
    init: str | None = None  # None = the preset's own

    def __post_init__(self):
        for name, allowed in (("preset", PRESETS), ("variant", VARIANTS), ("init", INITS + (None,))):
            value = getattr(self, name)
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed if a is not None)
                raise ReplicaError(f"{name}: expected one of {choices}, got {value!r}")
        if isinstance(self.width, bool) or not isinstance(self.width, (int, float)) or not self.width > 0:
            raise ReplicaError(f"width: expected a positive number, got {self.width!r}")
        for name in ("norm", "overlap", "dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ReplicaError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.preset == "caffe" and (self.variant != "two-tower" or not self.overlap):
            raise ReplicaError("preset caffe is bvlc_alexnet's two-tower net with overlapping pools: it takes no "
                               "variant=one-gpu-half or overlap=false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetOptions":
        """From a checkpoint's record; a key an older checkpoint lacks takes its default (each
        option was added with the default that older nets computed), other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: "NetOptions") -> list[str]:
        """The names of the options that differ, in declaration order."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @property
    def towers(self) -> int:
        return 1 if self.variant == "one-gpu-half" else 2

    @property
    def lrn_alpha(self) -> float:
        # torch convention (α/n per square). as-run: scale=1e-4, divided by size=5 in the parser
        # (layer.py:1183). paper-text: the printed α=1e-4 applies to the sum itself, i.e. 5e-4.
        # caffe: alpha 0.0001, divided by local_size as torch does (lrn_layer.cpp:120).
        return 5e-4 if self.preset == "paper-text" else 1e-4

    @property
    def lrn_k(self) -> float:
        # 2 (minDiv, layer-params-145.cfg:140); Caffe's prototxt sets none: its default k = 1
        return 1.0 if self.preset == "caffe" else 2.0

    @property
    def lrn_across_towers(self) -> bool:
        # Caffe groups conv2/4/5 only: its LRN window reads all 96 / 256 maps, across the towers
        return self.preset == "caffe"

    @property
    def input_pad(self) -> int:
        # cuda-convnet zero-extends 224 to 227 (layer.py:1004); Caffe crops 227 and pads nothing
        return 0 if self.preset == "caffe" else 3

    # -- each switch's geometry, declared here once and read by the model, its sizes and the export

    @property
    def pool(self) -> tuple[int, int, bool]:
        """(window, stride, round up) of the three max-pools. Overlapping 3/2 (§3.4); run 147
        (``overlap=false``): 2/2, rounding up as cuda-convnet does; Caffe's pools round up
        (pooling_layer.cpp:92-103), at 55, 27, 13 the same as rounding down."""
        return (3 if self.overlap else 2), 2, self.preset == "caffe" or not self.overlap

    @property
    def conv_pads(self) -> tuple[int, int]:
        """(conv2's, conv5's) zero padding: 2 and 1; run 147's 1 and 0 (docs/spec.md §5), which
        bring its 2/2 pools' maps to 6 × 6 into fc6 as well (55→28→26→13→13→11→6:
        replica.model.output_sizes)."""
        return (2, 1) if self.overlap else (1, 0)

    @property
    def lrn_layers(self) -> int:
        """How many LRNs the net computes: after conv1 and conv2, in each tower; none with
        ``norm=false`` (run 148)."""
        return 2 * self.towers if self.norm else 0

    @property
    def lrn_before_relu(self) -> bool:
        # as-run: rnorm1 reads the pre-ReLU conv1 output (layers-145.cfg:35-63).
        return self.preset == "as-run"

    @property
    def spatial_norm(self) -> bool:
        # as-run: cnorm2a/b after rnorm2 (layers-145.cfg:107-117); absent from the paper.
        return self.preset == "as-run" and self.norm

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The layers with weights, in order: what a parameter's name ends in before
        ``.weight``/``.bias`` (``tower_a.conv3.weight``: conv3)."""
        return (*(f"conv{i}" for i in range(1, 7 if self.variant == "six-conv" else 6)), "fc6", "fc7", "fc8")

    @property
    def init_scheme(self) -> str:
        return self.init or self.preset


@dataclass(frozen=True)
class Config:
    # -- data ----------------------------------------------------------------------------------
    data: str | None = None  # a prepared store (replica prepare), or image folders / txt index / CIFAR-10
    val_data: str | None = None  # validation source when ``data`` holds none (default: data's val split)
    num_classes: int | None = None  # None: as many as the data has
    crop: int = 224  # §4.1: 224×224 patches of 256×256 images
    flip_chunk: int | None = None  # 32: one offset and flip per 32 images, as convdata_jpeg.py:238-246
    pca_noise: bool = True  # §4.1 colour noise ("no-pca" ablation: False)
    pca_mode: str | None = None  # None: the preset's ("as-run": 0.1·z·√λ then ÷1.1; "paper-text": α·λ)
    pca_off_epoch: float | None = 67  # as-run: "set color noise to 0 from 0.1" at 67 of 91 (layer-params-145.cfg:178)
    workers: int | None = None  # loader processes; null/auto: from the cores this process may use (replica.runtime.default_workers)
    decode: str = "auto"  # JPEG store: "workers" (CPU, libjpeg-turbo), "device" (the batch, nvJPEG on CUDA); auto: workers (faster on an H200 with 16 cores, docs/performance.md)
    crop_on: str = "auto"  # "workers": crops and flips cut in the loader workers; "device": workers only read and decode, the crops are one gather on the device (same pixels); auto: workers until a GPU run compares them (tools/gpu_perf.py (e))
    strict_data: bool = False  # a bad or missing input stops the run (default: skip it, log it, count it)
    # -- model: the fields of NetOptions, each with its default there ------------------------------
    preset: str = "as-run"  # or "paper-text" (docs/spec.md §1-3)
    variant: str = "two-tower"  # or "one-gpu-half" (run 145-half), "six-conv" (run 146: a cross-tower conv6 over pool5)
    width: float = 1.0  # every layer's filters and units × width (at least 1 each); 1: the paper's net; less: quick trials (the test suite's mechanics tests run 1/16)
    norm: bool = True  # False: run 148, no LRN and no spatial norm
    overlap: bool = True  # False: run 147, pool 2/2
    dropout: bool = True
    init: str | None = None  # None: the preset's; "caffe": biases 0.1, fc6/fc7 σ 0.005; "he": σ = √(2/fan-in), biases 0 (narrow trial nets)
    init_from: str | None = None  # a run folder or checkpoint (replica import's too) whose weights start this run (fine-tuning)
    init_layers: str = "all-but-classifier"  # with init_from: "conv" (conv1-5), "all-but-classifier" (all but fc8), "all"
    devices: str = "auto"  # "auto", "cpu", "cuda:0", or "cuda:0,cuda:1" (towers a, b)
    devices_per_process: int = 2  # under torchrun: each process owns this many GPUs (1 or 2)
    # -- optimization (docs/spec.md §3) ---------------------------------------------------------------
    batch_size: int = 128  # §5
    epochs: float = 91  # run 145 was killed after epoch 91 (layer-params-145.cfg:182)
    lr: float = 0.01  # ε, §5
    momentum: float = 0.9  # §5
    weight_decay: float = 5e-4  # λ, §5; coupled, scaled by ε (src/weights.cu:192-195)
    bias_lr: float | None = 0.02  # as-run: 2× the initial ε, no decay, not divided with the weights; None: as weights
    bias_lr_cut_epoch: float | None = None  # the one optional ÷10 of the bias rate (run 145-2010 ended at 0.002)
    schedule: str = "as-run"  # "as-run": fixed drops; "plateau": ÷10 when val error stops improving; "table": lr_table
    lr_drops: tuple = (25, 51, 79)  # epochs of 91 (layer-params-145.cfg:168-182); scaled to ``epochs``
    conv1_drop_epoch: float | None = 67  # conv1's extra ÷10 at 67 of 91
    conv1_freeze_epoch: float | None = 72  # conv1 frozen (ε = 0, no decay) from 72 of 91
    schedule_epochs: float = 91  # the run length the epoch numbers above are written for
    lr_table: tuple | None = None  # schedule=table: rows {epoch: E, lr: ε, bias_lr: ε, LAYER: ε, …}, each ε held from E on (replica.optim.Schedule; configs/finetune-146.yaml)
    warmup_epochs: float = 0.0  # not in the paper: every ε ramps up linearly over this many (real) epochs
    plateau_patience: int = 1  # plateau: epochs without a new best val error before ÷10
    plateau_max_drops: int = 3  # §5: "reduced three times prior to termination"
    # -- run -------------------------------------------------------------------------------------
    seed: int = 0
    steps_per_epoch: int | None = None  # cap the batches of an epoch (quick runs); None: the whole set
    val_batches: int | None = None  # cap the validation batches per epoch; None: all
    checkpoint_minutes: float = 10.0  # also save `last` this often within an epoch
    save_best: bool = True  # write best.pt when the validation error improves (false: last.pt only)
    stall_steps: int = 300  # warn if the loss is still ≈ ln(classes) after this many steps (0: never)
    bf16: bool = False  # autocast to bfloat16 (CUDA, or a CPU with native bf16: AVX512_BF16/AMX)
    channels_last: bool = True  # layout only; faster max-pooling on CPU
    compile: bool = False  # torch.compile the model
    graph: bool | None = None  # CUDA: each step replayed from a captured CUDA graph (one GPU, no torchrun, no compile); null/auto: off until a GPU run has compared it with the eager step
    fused_norms: bool | None = None  # the norms as compiled fused loops, same math; null: on for CUDA and for float32 on the CPU (measured faster there)
    conv1_channels: int = 3  # the input written with zero channels past the third (4 or 8), so that cuDNN pads no 3-channel NHWC input: the same sums; 3 until a GPU run measures it (tools/gpu_perf.py (c))
    grouped: bool | None = None  # both towers on one device as the grouped network (same parameters and math, half the kernels); null/auto: on one CUDA device only
    tf32: bool = False  # CUDA: float32 convs/matmuls in TF32 (Ampere+; cuDNN's own default is on); false: true fp32, as in 2012
    tensorboard: bool = True  # RUN/tb/ for TensorBoard, when it is installed (replica.live lists the tags)
    live: bool = True  # RUN/curves.png and RUN/filters.png redrawn at each epoch's end
    deterministic: bool = False  # CUDA: deterministic cuDNN/cuBLAS algorithms (bit-equal resume on a GPU; slower, cost unmeasured)

    def __post_init__(self):
        _check(self)

    @property
    def net(self) -> NetOptions:
        """The net these settings describe: the one place a NetOptions is built from a config."""
        return NetOptions(**{f.name: getattr(self, f.name) for f in fields(NetOptions)})

    @property
    def pca_kind(self) -> str:
        return self.pca_mode or self.preset

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lr_drops"] = list(self.lr_drops)
        if self.lr_table is not None:
            d["lr_table"] = table_rows(self.lr_table)
        return d


CHOICES = {  # the net's own (preset, variant, init) are checked by NetOptions
    "pca_mode": (None, "as-run", "paper-text"),
    "schedule": ("as-run", "plateau", "table"),
    "decode": ("auto", "workers", "device"),
    "crop_on": ("auto", "workers", "device"),
    "init_layers": ("conv", "all-but-classifier", "all"),
    "conv1_channels": (3, 4, 8),
}
POSITIVE = ("batch_size", "epochs", "lr", "crop", "schedule_epochs", "checkpoint_minutes")
NON_NEGATIVE = ("momentum", "weight_decay", "workers", "stall_steps", "plateau_patience", "plateau_max_drops",
                "bias_lr", "warmup_epochs")

# what a preset file changes, for the paper-text reading
PAPER_TEXT = dict(preset="paper-text", schedule="plateau", epochs=90, bias_lr=None, pca_off_epoch=None,
                  conv1_drop_epoch=None, conv1_freeze_epoch=None)


def _check(c: Config) -> None:
    c.net  # noqa: B018  (validates the net's options)
    for name, allowed in CHOICES.items():
        v = getattr(c, name)
        if v not in allowed:
            raise ReplicaError(f"{name}: expected one of {', '.join(repr(a) for a in allowed if a)}, got {v!r}")
    for name in POSITIVE:
        v = getattr(c, name)
        if not v > 0:
            raise ReplicaError(f"{name}: expected a positive number, got {v!r}")
    for name in NON_NEGATIVE:
        v = getattr(c, name)
        if v is not None and v < 0:
            raise ReplicaError(f"{name}: expected a number ≥ 0, got {v!r}")
    if c.devices_per_process not in (1, 2):
        raise ReplicaError(f"devices_per_process: expected 1 or 2, got {c.devices_per_process}")
    if c.num_classes is not None and c.num_classes < 2:
        raise ReplicaError(f"num_classes: expected at least 2, got {c.num_classes}")
    if c.flip_chunk is not None and c.flip_chunk < 1:
        raise ReplicaError(f"flip_chunk: expected a positive integer or null, got {c.flip_chunk}")
    for name in ("steps_per_epoch", "val_batches"):
        v = getattr(c, name)
        if v is not None and v < 1:
            raise ReplicaError(f"{name}: expected a positive integer or null, got {v}")
    if list(c.lr_drops) != sorted(c.lr_drops) or any(d <= 0 for d in c.lr_drops):
        raise ReplicaError(f"lr_drops: expected increasing positive epochs, got {list(c.lr_drops)}")
    if c.warmup_epochs >= c.epochs:
        raise ReplicaError(f"warmup_epochs: expected fewer than epochs={c.epochs}, got {c.warmup_epochs}")
    if not 0 <= c.momentum < 1:
        raise ReplicaError(f"momentum: expected a number in [0, 1), got {c.momentum}")
    _check_table(c)


_TYPES = typing.get_type_hints(Config)
NAMES = [f.name for f in fields(Config)]


def _coerce(name: str, value):
    """A YAML or command-line value → the declared type, or an error saying what was expected."""
    if name == "lr_table":
        return _lr_table(value)
    t = _TYPES[name]
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if args else t
    if optional and base in (bool, int) and isinstance(value, str) and value.lower() == "auto":
        return None  # a key whose null means "decided by the machine": auto is its name
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
        if optional:
            return None
        raise ReplicaError(f"{name}: expected {base.__name__}, got null")
    if base is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ReplicaError(f"{name}: expected a list of numbers, got {value!r}") from None
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ReplicaError(f"{name}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ReplicaError(f"{name}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ReplicaError(f"{name}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ReplicaError(f"{name}: expected an integer, got {value!r}")
        return int(f)
    if base is float:
        if isinstance(value, bool):
            raise ReplicaError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ReplicaError(f"{name}: expected a number, got {value!r}") from None
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ReplicaError(f"{name}: expected text, got {value!r}")
        return str(value)
    return value


TABLE_KEYS = ("lr", "bias_lr")  # besides ``epoch`` and the layers' names


def _lr_table(value):
    """``lr_table`` as written (a list of mappings) → rows ``(epoch, ((key, ε), …))``, frozen and
    in the written order; the layer names and the order of epochs are checked with the net."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~", "")):
        return None
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            value = None
    if not isinstance(value, (list, tuple)) or not value:
        raise ReplicaError(f"lr_table: expected a list of rows like {{epoch: 0, lr: 0.001, conv1: 0.0001}}, got {value!r}")
    rows = []
    for row in value:
        if isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], tuple):
            row = {"epoch": row[0], **dict(row[1])}  # already frozen (a Config rebuilt from its own rows)
        if not isinstance(row, dict) or "epoch" not in row or len(row) < 2:
            raise ReplicaError(f"lr_table: each row needs an epoch and at least one ε, like {{epoch: 5, conv1: 0.00001}}, "
                               f"got {row!r}")
        values = []
        for k, v in row.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ReplicaError(f"lr_table: {k} in the row at epoch {row['epoch']!r}: expected a number ≥ 0, got {v!r}")
            if k != "epoch":
                values.append((str(k), float(v)))
        rows.append((float(row["epoch"]), tuple(values)))
    return tuple(rows)


def table_rows(table) -> list[dict]:
    """The frozen rows as a user writes them."""
    return [{"epoch": e, **dict(values)} for e, values in table]


def _check_table(c: "Config") -> None:
    if c.schedule != "table":
        if c.lr_table is not None:
            raise ReplicaError(f"lr_table is read by schedule=table only (schedule is {c.schedule!r})")
        return
    if c.lr_table is None:
        raise ReplicaError("schedule=table needs lr_table: rows like {epoch: 0, lr: 0.001, conv1: 0.0001}")
    epochs = [e for e, _ in c.lr_table]
    if epochs != sorted(set(epochs)):
        raise ReplicaError(f"lr_table: expected the rows' epochs increasing, got {', '.join(map(show_number, epochs))}")
    layers = c.net.layer_names
    for e, values in c.lr_table:
        for k, _ in values:
            if k == "bias_lr" and c.bias_lr is None:
                raise ReplicaError(f"lr_table: bias_lr at epoch {show_number(e)}, but bias_lr is null (biases follow their "
                                   "weights' ε): set bias_lr or leave it out of the table")
            if k not in TABLE_KEYS and k not in layers:
                near = difflib.get_close_matches(k, list(TABLE_KEYS) + list(layers), n=1, cutoff=0.5)
                raise ReplicaError(f"lr_table: unknown key {k!r} at epoch {show_number(e)}; expected epoch, lr, bias_lr or a "
                                   f"layer of this net ({', '.join(layers)})" + (f"; did you mean {near[0]!r}?" if near else ""))


def show_number(x: float) -> str:
    return f"{x:g}"


def _unknown(name: str, where: str) -> ReplicaError:
    near = difflib.get_close_matches(name, NAMES, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(NAMES)}"
    return ReplicaError(f"unknown config key {name!r}{where}{hint}")


def parse_overrides(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ReplicaError(f"override {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in NAMES:
            raise _unknown(k, " on the command line")
        try:
            out[k] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError as e:
            raise ReplicaError(f"override {item!r}: not valid YAML ({str(e).splitlines()[0]}); quote the whole "
                               "KEY=VALUE for your shell") from None
    return out


# Keys that change how a run is carried out, not what it computes: runs differing only in these
# (and in their seed) are repeats of one config (the report groups them so).
NOT_THE_EXPERIMENT = frozenset({"seed", "workers", "devices", "devices_per_process", "checkpoint_minutes", "save_best",
                                "stall_steps", "compile", "graph", "fused_norms", "grouped", "conv1_channels", "channels_last", "decode", "crop_on", "strict_data",
                                "val_batches", "tensorboard", "live"})


def departures(cfg: "Config") -> dict:
    """What ``cfg`` computes differently from run 145 as run (the defaults, preset as-run): each
    key whose value is not the default, the preset among them, leaving out the data and the keys
    of :data:`NOT_THE_EXPERIMENT`. A run's header names them, so an ablation shows at once."""
    defaults = Config().to_dict()
    return {k: v for k, v in cfg.to_dict().items()
            if k in defaults and v != defaults[k] and k not in NOT_THE_EXPERIMENT | {"data", "val_data"}}


def show(value) -> str:
    """A config value as a user writes it on the command line (false, null, [25, 51, 79])."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20)  # one line, as written
    return text.strip().removesuffix("...").strip()


def load_config(path=None, overrides=(), base: dict | None = None) -> Config:
    """Defaults → YAML file → ``key=value`` overrides → validated, frozen :class:`Config`."""
    values = dict(base or {})
    if path is not None:
        p = Path(path)
        presets = Path(__file__).resolve().parents[1] / "configs"
        if not p.exists() and p.suffix == "" and len(p.parts) == 1 and (presets / f"{p}.yaml").exists():
            p = presets / f"{p}.yaml"  # a preset by name: `replica train demo`
        if not p.exists():
            near = sorted(q.stem for q in presets.glob("*.yaml"))
            raise ReplicaError(f"config {p}: no such file" + (f" (presets: {', '.join(near)})" if near else ""))
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ReplicaError(f"config {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ReplicaError(f"config {p}: expected a mapping of keys to values")
        for k in loaded:
            if k not in NAMES:
                raise _unknown(k, f" in {p}")
        values.update(loaded)
    values.update(parse_overrides(overrides) if not isinstance(overrides, dict) else overrides)
    if values.get("preset") == "paper-text":  # the preset brings its own schedule unless told otherwise
        values = {**{k: v for k, v in PAPER_TEXT.items() if k not in values}, **values}
    return Config(**{k: _coerce(k, v) for k, v in values.items()})


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
