"""JPEG through ``torchvision.io``: libjpeg-turbo on the CPU, nvJPEG on CUDA (a batch at once).

torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are still the
ones that decode a batch on the GPU, so this project keeps them and silences that one notice.
"""
import warnings

import torchvision.io as _io

_NOTICE = "The image decoding and encoding capabilities of TorchVision are deprecated"


def decode_jpeg(*args, **kwargs):
    """``torchvision.io.decode_jpeg``: a tensor of bytes, or a list of them (batched on CUDA)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOTICE, category=DeprecationWarning)
        return _io.decode_jpeg(*args, **kwargs)


def encode_jpeg(*args, **kwargs):
    """``torchvision.io.encode_jpeg``: a (3, H, W) uint8 tensor → its JPEG bytes as a uint8 tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOTICE, category=DeprecationWarning)
        return _io.encode_jpeg(*args, **kwargs)
