"""JPEG through ``torchvision.io``: libjpeg-turbo on the CPU, nvJPEG on CUDA (a batch at once).

torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec; they are still the
ones that decode a batch on the GPU, so this project keeps them and silences that one notice.
"""
import re
import warnings

import torchvision.io as _io

from ..errors import ReplicaError

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


class DeviceFailure(ReplicaError, RuntimeError):
    """The device failed while decoding (out of memory, a CUDA error): not the data's fault.
    One line on the command line, like every error this project explains."""


# Text of errors that come from the device or the library, not from the bytes: a CUDA error
# reaches torchvision's decoder as an exception whose message it wraps in "Error while decoding
# JPEG images: …", the same prefix a corrupt entry gets, so the message has to be read.
_DEVICE_ERRORS = ("out of memory", "cuda error", "cudaerror", "cuda driver", "device-side assert",
                  "cublas", "cudnn", "failed to synchronize cuda stream", "failed to initialize nvjpeg",
                  "failed to create", "nvjpeg_status_allocator_failure", "nvjpeg_status_execution_failed",
                  "nvjpeg_status_internal_error", "nvjpeg_status_arch_mismatch", "not compiled with nvjpeg",
                  "illegal memory access", "launch failure", "no kernel image")


# nvJPEG's own failures reach us as its numeric status, e.g. torchvision's "Failed to decode
# batch: 5". These statuses are the library or the device failing, whatever the bytes:
# 1 NOT_INITIALIZED, 5 ALLOCATOR_FAILURE, 6 EXECUTION_FAILED, 7 ARCH_MISMATCH, 8 INTERNAL_ERROR,
# 9 IMPLEMENTATION_NOT_SUPPORTED (nvjpeg.h). 2 INVALID_PARAMETER, 3 BAD_JPEG, 4 JPEG_NOT_SUPPORTED
# and 10 INCOMPLETE_BITSTREAM are the input's.
_NVJPEG_DEVICE_STATUS = {1, 5, 6, 7, 8, 9}
_NVJPEG_STATUS = re.compile(r"failed to decode batch: (\d+)")


def is_decode_failure(err: BaseException) -> bool:
    """Whether ``err`` is the decoder refusing its input (corrupt, truncated, not a JPEG): the
    entry is then a bad input. A device failure (CUDA out of memory, a CUDA or driver error)
    is not, and must not mark every image of the batch "corrupt"."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError  # torch < 2.5: the cuda name only
    if not isinstance(err, RuntimeError) or isinstance(err, (oom, DeviceFailure)):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch ≥ 2.8: CUDA errors have their own type
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return False
    text = str(err).lower()
    if any(int(m) in _NVJPEG_DEVICE_STATUS for m in _NVJPEG_STATUS.findall(text)):
        return False
    return not any(s in text for s in _DEVICE_ERRORS)


def device_failure(err: BaseException, device) -> DeviceFailure:
    """One line for a device failure during decoding, with what to try."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    hint = ("lower batch_size, or decode=workers (decode on the CPU)" if "out of memory" in first.lower()
            else "decode=workers decodes on the CPU instead")
    return DeviceFailure(f"decoding a JPEG batch on {device} failed in the device, not in the data: {first}; {hint}")


_STREAMS: dict = {}


def on_decode_stream(device, work, cuda=None):
    """``work()`` (a batch's nvJPEG decode and its crops) on a CUDA stream of its own; returns its
    result, safe to use on the current stream.

    nvJPEG's hardware decoder writes its outputs without waiting for work queued on the stream
    it is given, and torchvision allocates those outputs on the *current* stream. During
    training, that stream's caching allocator hands out exactly the blocks the previous step
    freed while its kernels are still queued: the decoder then overwrites inputs of kernels
    that have not run yet (pytorch/vision PR 9606: 134 of 200 iterations corrupted on an H100).
    Here the decode and its allocations happen on a side stream, whose pool holds only blocks
    freed on it: its own earlier work (the last batch's crops) is waited for first (a host wait
    of microseconds: that stream never waits on training), so no freed block there is still
    read by anything queued. The current stream waits for the side stream's event (on the GPU,
    not the host), and each result tensor is marked as used on it (``record_stream``), so its
    memory is not handed back to the side stream until the training kernels reading it ran.

    ``cuda``: the ``torch.cuda`` namespace (a recording stand-in in the CPU tests).
    """
    import torch

    cuda = cuda or torch.cuda
    key = (id(cuda), str(device))
    side = _STREAMS.get(key)
    if side is None:
        side = _STREAMS[key] = cuda.Stream(device)
    current = cuda.current_stream(device)
    side.synchronize()  # the side stream's own earlier work has run: its freed blocks are truly free
    with cuda.stream(side):
        result = work()
    current.wait_stream(side)  # training kernels queued from here on see the decoded batch
    for t in (result if isinstance(result, (tuple, list)) else (result,)):
        if getattr(t, "is_cuda", False):
            t.record_stream(current)
    return result
