"""replica: a faithful, fast, tested PyTorch replication of the two-GPU AlexNet (NIPS 2012)."""
from .errors import ReplicaError
from .layers import LocalResponseNorm, NonInvertedDropout, SpatialResponseNorm
from .model import AlexNet, NetOptions, count_parameters, cross, resolve_devices

__version__ = "0.1.0"
__all__ = [
    "AlexNet",
    "NetOptions",
    "LocalResponseNorm",
    "SpatialResponseNorm",
    "NonInvertedDropout",
    "ReplicaError",
    "count_parameters",
    "cross",
    "resolve_devices",
]
