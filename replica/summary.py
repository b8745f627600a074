"""A per-layer table of a model: what each layer reads, its parameters and its output shape."""
from __future__ import annotations

import time

import torch

from .model import AlexNet, count_parameters


def layer_rows(model: AlexNet, batch: int = 2, image: int | None = None) -> list[dict]:
    """Run one forward pass with hooks and return one row per conv/fc layer."""
    image = image or model.input_size
    rows, hooks = [], []
    for tower_name, tower in (("a", model.tower_a), ("b", model.tower_b)):
        if tower is None:
            continue
        for name, layer in tower.named_children():
            hooks.append(layer.register_forward_hook(_recorder(rows, f"{name}{tower_name}", layer, tower.conv1.weight.device)))
    hooks.append(model.fc8.register_forward_hook(_recorder(rows, "fc8", model.fc8, model.fc8.weight.device)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, image, image))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return rows


def _recorder(rows, name, layer, device):
    def hook(module, inputs, output):
        rows.append(dict(
            layer=name,
            reads=tuple(inputs[0].shape[1:]),
            weight=tuple(module.weight.shape),
            params=sum(p.numel() for p in module.parameters()),
            output=tuple(output.shape[1:]),
            device=str(device),
        ))
    return hook


def format_table(rows: list[dict]) -> str:
    def shape(s):
        return "×".join(str(v) for v in s)

    header = f"{'layer':<7} {'device':<7} {'reads':<11} {'weight':<15} {'params':>11} {'output':<10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['layer']:<7} {r['device']:<7} {shape(r['reads']):<11} {shape(r['weight']):<15} "
                     f"{r['params']:>11,} {shape(r['output']):<10}")
    return "\n".join(lines)


def time_train_step(model: AlexNet, batch: int, image: int | None = None) -> float:
    """Seconds for one forward + backward on random input (after one warm-up step)."""
    image = image or model.input_size
    x = torch.randn(batch, 3, image, image) * 50
    y = torch.randint(0, model.num_classes, (batch,))
    model.train()
    cuda = [d for d in model.devices if d.type == "cuda"]

    def sync():  # a GPU returns from its launches at once: wait for the work itself
        for d in cuda:
            torch.cuda.synchronize(d)

    times = []
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        out = model(x)
        torch.nn.functional.cross_entropy(out, y.to(out.device)).backward()
        sync()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times[-1]


# Ops that make no kernel: views and metadata (what is left of a step is about one launch each on a GPU)
VIEW_OPS = frozenset({"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "select",
                      "alias", "detach", "unsqueeze", "squeeze", "reshape", "split", "unbind", "flatten",
                      "_reshape_alias", "view_as", "expand_as", "narrow", "chunk", "lift_fresh", "_local_scalar_dense"})


def ops_per_step(model, optimizer, batch: int = 2, bf16: bool = False, devices=None, image: int | None = None) -> int:
    """The ops one training step dispatches (forward under autocast if ``bf16``, the loss, the
    backward, ``optimizer``'s update), after two warm-up steps; views and metadata left out. On a
    GPU each is about one kernel launch, so the count follows the host's cost of a step on any
    machine (tools/bench.py times it where a GPU is)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .runtime import autocast

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in VIEW_OPS:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    devices = devices or (next(model.parameters()).device,)
    image = image or getattr(model, "input_size", 224)
    x = torch.randn(batch, 3, image, image, device=devices[0]) * 50
    y = torch.arange(batch, device=devices[0]) % 10
    model.train()

    def step():
        with autocast(devices, bf16):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    with Count():
        step()
    return Count.n


def step_ops_line(model: AlexNet, bf16: bool = False) -> str:
    """``kernels per training step: N (torchvision's AlexNet: M)`` for this net, form and
    precision, torchvision's with its usual optimizer (SGD, momentum 0.9) in the same precision."""
    import torchvision

    from .optim import PaperSGD, param_groups

    ours = ops_per_step(model, PaperSGD(param_groups(model, 0.01, 5e-4, 0.02)), bf16=bf16, devices=model.devices)
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(num_classes=10).to(model.devices[0])
    theirs = ops_per_step(tv, torch.optim.SGD(tv.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4), bf16=bf16,
                          devices=model.devices[:1])
    form = "one tower" if model.tower_b is None else "grouped form" if model.grouped else "towers"
    return (f"kernels per training step: {ours} (torchvision's AlexNet: {theirs}); ops dispatched in one step, views "
            f"left out: {form}, {'bf16 autocast' if bf16 else 'float32'}, "
            f"{'fused' if model.fused_norms else 'eager'} norms")


def summary(model: AlexNet, batch: int = 2, bf16: bool = False) -> str:
    rows = layer_rows(model)
    o = model.opts
    lines = [
        f"AlexNet preset={o.preset} variant={o.variant} norm={o.norm} overlap={o.overlap} "
        f"dropout={o.dropout} init={o.init_scheme} classes={model.num_classes}"
        + ("" if model.width == 1 else f" width={model.width:g} (not the paper's net)"),
        f"devices: {' + '.join(str(d) for d in model.devices)}",
        "",
        format_table(rows),
        "",
        f"parameters: {count_parameters(model):,}",
    ]
    if batch:
        lines.append(f"train step (forward + backward, batch {batch}): {time_train_step(model, batch):.3f} s")
        lines.append(step_ops_line(model, bf16))
    return "\n".join(lines)
