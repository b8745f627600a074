"""replica: a faithful, fast, tested PyTorch replication of the two-GPU AlexNet (NIPS 2012).

Names are imported on first use, so that worker processes which only decode images (``replica
prepare``, ``replica synth``) do not pay for importing torch.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AlexNet": "model", "NetOptions": "config", "count_parameters": "model", "cross": "model",
    "resolve_devices": "devices", "LocalResponseNorm": "layers", "SpatialResponseNorm": "layers",
    "NonInvertedDropout": "layers", "ReplicaError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'replica' has no attribute {name!r}")
