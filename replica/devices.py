"""One place that turns a device spec into devices: the command line's text, the config's
``devices``, a launcher's share of a node, all end here (below the model and the launcher, so
neither imports the other to place a net)."""
from __future__ import annotations

import logging

import torch

from .errors import ReplicaError

log = logging.getLogger("replica")


def parse_devices(text):
    """``"auto"``, ``"cpu"``, ``"cuda:0"`` or a pair ``"cuda:0,cuda:1"`` → the spec
    :func:`resolve_devices` takes (a string, or a tuple of two); anything else is passed on."""
    if not isinstance(text, str):
        return text
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def available_devices() -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def check_device(spec) -> torch.device:
    """One device, or a one-line error naming the ones there are."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ReplicaError(f"not a device: {spec!r} (available: {', '.join(available_devices())})") from e
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ReplicaError(f"device {spec!r} does not exist (available: {', '.join(available_devices())})")
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ReplicaError(f"device {spec!r} is not supported (available: {', '.join(available_devices())})")
    return dev


def resolve_devices(devices="auto", towers: int = 2) -> tuple[torch.device, ...]:
    """One or two devices from ``"auto"``, a device, a pair of devices, or their text
    (``"cuda:0,cuda:1"``).

    ``"auto"`` picks two GPUs, else one GPU, else the CPU, and logs the choice; for a net of
    one tower (``towers=1``: variant one-gpu-half) it picks one GPU, else the CPU.
    """
    devices = parse_devices(devices)
    if isinstance(devices, str) and devices == "auto":
        n = torch.cuda.device_count()
        chosen = ("cuda:0", "cuda:1") if n >= 2 and towers == 2 else ("cuda:0",) if n >= 1 else ("cpu",)
        log.info("devices=auto: %s (%d CUDA device(s) visible)", " + ".join(chosen), n)
        devices = chosen
    if isinstance(devices, (str, torch.device)):
        devices = (devices,)
    devices = tuple(devices)
    if len(devices) not in (1, 2):
        raise ReplicaError(f"devices: expected one device or two, got {len(devices)}: {devices}")
    return tuple(check_device(d) for d in devices)
