"""The paper's update rule, its parameter groups, and the learning-rate schedule (docs/spec.md §3).

    v ← μ·v − ε·λ·w − ε·ḡ        w ← w + v                       (§5; src/weights.cu:151-195)

The learning rate sits inside the velocity, so a change of ε leaves v untouched, as when the
2012 run was resumed with edited layer-params files. torch's SGD keeps v without ε and would
rescale it implicitly; this optimizer writes the rule down instead.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
from torch import nn


class PaperSGD:
    """SGD with the learning rate inside the velocity; ``lr = 0`` freezes a group entirely.

    A frozen group (conv1 from epoch 72 of 91) gets no update at all, no decay, and keeps its
    velocity, as ``getBaseRate() > 0`` guards the 2012 update (src/weights.cu:148).

    How it runs: torch's fused SGD kernel (one pass over each tensor instead of four) keeps
    ``b = −v/ε`` and steps ``b ← μb + ḡ + λw; w ← w − εb``, which is the rule above as long as
    ε holds. When ε changes from ε₀ to ε₁, ``b`` is first multiplied by ε₀/ε₁, so
    ``v = −ε₁·b`` carries over unchanged, as the rule requires (``tests/test_optim.py`` checks
    the trace against the rule written out). :meth:`velocity` gives ``v`` itself.

    Not a ``torch.optim.Optimizer``: that base class imports TorchDynamo on construction (1.3 to
    1.7 s of every ``replica train`` start on 2 cores, measured with a stack trace on the import)
    for hooks and state-dict machinery this rule does not use. The surface that training uses is
    the same: ``param_groups``, ``state``, ``zero_grad``, ``step``.
    """

    def __init__(self, groups, momentum: float = 0.9, lr_tensors: bool = False):
        """``lr_tensors``: the fused kernel reads each group's ε from a tensor on the parameters'
        device, which :meth:`set_lrs` fills (and where ε changed, rescales ``b`` at once): then
        :meth:`step` takes no decision from a Python number but whether a group is frozen, so it
        can be captured once in a CUDA graph and replayed at any ε (one graph per frozen set)."""
        self.lr_tensors = lr_tensors
        self._lr_t: dict = {}  # (group index, device) → (its ε as a 0-dim tensor on that device, the ε written)
        self.param_groups = []
        seen = set()
        for g in groups:
            g = dict(lr=0.01, weight_decay=0.0, momentum=momentum) | dict(g)
            g["params"] = list(g["params"])
            if any(id(p) in seen for p in g["params"]):
                raise ValueError("a parameter appears in more than one group")
            seen.update(id(p) for p in g["params"])
            self.param_groups.append(g)
        self.state: defaultdict = defaultdict(dict)
        self._fused = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def velocity(self, p: torch.Tensor) -> torch.Tensor | None:
        """``v`` of parameter ``p`` (None before its first update)."""
        st = self.state.get(p)
        if not st or "momentum_buffer" not in st:
            return None
        return st["momentum_buffer"] * -st["buffer_lr"]

    def set_velocity(self, p: torch.Tensor, v: torch.Tensor) -> None:
        """Start ``p`` from velocity ``v`` (a checkpoint without the buffer, or a hand-set state)."""
        self.state[p].update(momentum_buffer=v.detach().clone(), buffer_lr=-1.0)  # −(−1)·b = v

    def set_lrs(self, lrs: dict[str, float]) -> None:
        """Each named group's ε for the next steps. With ``lr_tensors``: outside any graph, the
        buffers of a group whose ε changed are rescaled here (as :meth:`step` would before its
        update: the same multiplication, so the same bits), and ε is written into its tensor."""
        for i, g in enumerate(self.param_groups):
            g["lr"] = lr = lrs[g["name"]]
            if not self.lr_tensors or lr == 0:  # a frozen group keeps its buffers as they are
                continue
            with torch.no_grad():
                for p in g["params"]:
                    st = self.state.get(p)
                    if st and "momentum_buffer" in st and st["buffer_lr"] != lr:
                        st["momentum_buffer"].mul_(st["buffer_lr"] / lr)
                        st["buffer_lr"] = lr
                for dev in {p.device for p in g["params"]}:  # one fill per device, and only when ε changed
                    t, was = self._lr_t.get((i, dev), (None, None))
                    if t is None:  # the CPU kernel reads ε as a double (bitwise the float path's, tested); the
                        # CUDA kernel as a float (its lr pointer's type; torch's own SGD hands it float32)
                        dtype = torch.float32 if dev.type == "cuda" else torch.float64
                        t = torch.zeros((), dtype=dtype, device=dev)
                    if was != lr:
                        t.fill_(lr)
                    self._lr_t[(i, dev)] = (t, lr)

    @torch.no_grad()
    def step(self, closure=None):
        for i, g in enumerate(self.param_groups):
            lr, wd, mu = g["lr"], g["weight_decay"], g["momentum"]
            if lr == 0:
                continue
            by_device: dict = {}
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                b = st.get("momentum_buffer")
                if b is None:
                    b = st["momentum_buffer"] = torch.zeros_like(p)
                elif st["buffer_lr"] != lr:
                    b.mul_(st["buffer_lr"] / lr)  # keep v = −ε·b across the change of ε
                st["buffer_lr"] = lr
                ps, gs, bs = by_device.setdefault((p.device, p.dtype), ([], [], []))
                ps.append(p)
                gs.append(p.grad)
                bs.append(b)
            for (dev, _), (ps, gs, bs) in by_device.items():
                t = self._lr_t.get((i, dev), (None,))[0] if self.lr_tensors else None
                self._update(ps, gs, bs, lr if t is None else t, wd, mu)

    def _update(self, ps, gs, bs, lr, wd, mu):
        if self._fused:
            try:
                torch._fused_sgd_(ps, gs, bs, weight_decay=wd, momentum=mu, lr=lr, dampening=0.0, nesterov=False,
                                  maximize=False, is_first_step=False)
                return
            except (AttributeError, TypeError, RuntimeError, NotImplementedError) as e:  # a torch or device without it
                self._fused = False
                why = (str(e).strip().splitlines() or [""])[0][:200]
                logging.getLogger("replica").warning(
                    "the optimizer's fused update failed (%s: %s); every update from now on runs as 4 plain passes "
                    "(the same result, slower)", type(e).__name__, why)
        lr = float(lr)  # (a tensor ε: the plain passes read it once; they are no graph's)
        for p, gr, b in zip(ps, gs, bs):
            b.mul_(mu).add_(gr)
            if wd:
                b.add_(p, alpha=wd)
            p.add_(b, alpha=-lr)

    def state_for_checkpoint(self, named) -> dict:
        """name → (buffer on the CPU, ε it is expressed in): restores the optimizer bit for bit."""
        return {n: (self.state[p]["momentum_buffer"].cpu(), float(self.state[p]["buffer_lr"])) for n, p in named
                if "momentum_buffer" in self.state.get(p, {})}

    def load_checkpoint_state(self, named: dict, saved: dict) -> None:
        for n, (b, blr) in saved.items():
            p = named[n]
            self.state[p].update(momentum_buffer=b.to(p.device).clone(), buffer_lr=float(blr))


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr: float | None,
                 layers: tuple[str, ...] = ("conv1",)):
    """Named groups: each layer of ``layers`` apart (weights, biases: their own schedule), then all
    other weights, all other biases. conv1 is apart in every schedule (as-run drops and freezes it);
    ``schedule=table`` adds the layers its table names (:meth:`Schedule.layers`).

    ``bias_lr=None`` treats biases like weights (paper-text); otherwise biases get ``bias_lr`` and
    no weight decay (src/layer.cu:565 hard-wires wc = 0 for biases).
    """
    groups = {f"{layer}.{kind}": [] for layer in layers for kind in ("weight", "bias")} | {"weight": [], "bias": []}
    for name, p in model.named_parameters():
        kind = "bias" if name.endswith("bias") else "weight"
        layer = name.split(".")[-2] if "." in name else ""
        key = f"{layer}.{kind}" if layer in layers else kind
        groups[key].append(p)
    out = []
    for key, params in groups.items():
        is_bias = key.endswith("bias")
        out.append(dict(name=key, params=params, lr=bias_lr if (is_bias and bias_lr is not None) else lr,
                        weight_decay=0.0 if (is_bias and bias_lr is not None) else weight_decay))
    return out


class Schedule:
    """Learning rates per group, and whether colour noise is on, as functions of the step.

    ``as-run``: ε ÷10 at epochs 25, 51, 79 of 91; conv1 another ÷10 at 67 and frozen from 72;
    biases held (one optional cut); colour noise off from 67. ``plateau``: ÷10 when validation
    error stops improving, at most ``max_drops`` times. ``table``: ``lr_table``'s rows, each
    setting ε from its epoch on (``lr``: the weights of every layer the table does not name;
    ``bias_lr``: the biases; a layer's name: that layer's weights), as the 2012 fine-tuning runs
    edited their layer-params files (run 146: configs/finetune-146.yaml). A bias takes
    ``bias_lr``, or its weights' ε where ``bias_lr`` is null, and freezes with its weights at ε 0
    (as conv1's does in every schedule). Epoch numbers are written for a ``schedule_epochs`` run and scale with
    the configured length, in steps, so a 3-epoch run keeps the shape.
    """

    def __init__(self, cfg, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = max(1, round(cfg.epochs * steps_per_epoch))
        self.plateau_drops = 0
        self.best = math.inf
        self.bad_epochs = 0

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers with groups of their own (:func:`param_groups`' ``layers``)."""
        named = {k for _, values in (self.cfg.lr_table or ()) for k, _ in values} - {"lr", "bias_lr"}
        return ("conv1", *sorted(named - {"conv1"}, key=self.cfg.net.layer_names.index))

    def at(self, epoch: float | None) -> int | None:
        """The step at which an epoch number of the 91-epoch schedule falls in this run."""
        if epoch is None:
            return None
        return round(epoch / self.cfg.schedule_epochs * self.total_steps)

    def lrs(self, step: int) -> dict[str, float]:
        c = self.cfg
        if c.schedule == "table":
            lrs = self._table(step)
        else:
            lrs = self._drops(step)
        warm = round(c.warmup_epochs * self.steps_per_epoch)
        if step < warm:  # not in the paper: step s of a warm-up of W steps runs at (s+1)/W of every ε
            lrs = {k: v * (step + 1) / warm for k, v in lrs.items()}
        return lrs

    def _table(self, step: int) -> dict[str, float]:
        c = self.cfg
        held = {"lr": c.lr, "bias_lr": c.bias_lr}
        for epoch, values in c.lr_table:
            if step >= self.at(epoch):
                held.update(values)
        b = held["bias_lr"]
        lrs = {}
        for layer in ("", *self.layers):  # "": every layer the table does not name
            lw = held.get(layer, held["lr"])
            lrs[f"{layer}.weight".lstrip(".")] = lw
            lrs[f"{layer}.bias".lstrip(".")] = 0.0 if lw == 0 else (lw if c.bias_lr is None else b)  # frozen with its weights
        return lrs

    def _drops(self, step: int) -> dict[str, float]:
        c = self.cfg
        if c.schedule == "as-run":
            drops = sum(step >= self.at(e) for e in c.lr_drops)
        else:
            drops = self.plateau_drops
        w = c.lr * 0.1 ** drops
        if c.bias_lr is None:
            b = w
        else:
            b = c.bias_lr * (0.1 if c.bias_lr_cut_epoch is not None and step >= self.at(c.bias_lr_cut_epoch) else 1.0)
        c1w, c1b = w, b
        if c.conv1_drop_epoch is not None and step >= self.at(c.conv1_drop_epoch):
            c1w = w * 0.1  # conv1's own extra ÷10 (layer-params-145.cfg: 1e-5 while the rest had 1e-4)
        if c.conv1_freeze_epoch is not None and step >= self.at(c.conv1_freeze_epoch):
            c1w = c1b = 0.0  # conv1's bias freezes with conv1
        return {"weight": w, "bias": b, "conv1.weight": c1w, "conv1.bias": c1b}

    def noise_on(self, step: int) -> bool:
        c = self.cfg
        if not c.pca_noise:
            return False
        return c.pca_off_epoch is None or step < self.at(c.pca_off_epoch)

    def on_validation(self, error: float) -> bool:
        """Plateau bookkeeping after an epoch; True when ε was just divided by 10."""
        if self.cfg.schedule != "plateau":
            return False
        if error < self.best - 1e-12:
            self.best, self.bad_epochs = error, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.cfg.plateau_patience and self.plateau_drops < self.cfg.plateau_max_drops:
            self.plateau_drops += 1
            self.bad_epochs = 0
            return True
        return False

    def finished(self, step: int) -> bool:
        return step >= self.total_steps

    def state_dict(self) -> dict:
        return dict(plateau_drops=self.plateau_drops, best=self.best, bad_epochs=self.bad_epochs)

    def load_state_dict(self, d: dict) -> None:
        self.plateau_drops, self.best, self.bad_epochs = int(d["plateau_drops"]), float(d["best"]), int(d["bad_epochs"])


def apply_lrs(opt: PaperSGD, lrs: dict[str, float]) -> None:
    opt.set_lrs(lrs)
