"""Process-level settings that make CPU training faster without changing any result."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("replica")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc malloc.h
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process instead of returning it to the OS.

    glibc serves every allocation over 32 MB with a fresh ``mmap``, so each large activation
    (a 128×48×55×55 fp32 tensor is 74 MB) is page-faulted in anew on every step. That doubled
    the cost of the memory-bound normalization layers. Turning ``mmap`` off for malloc and
    raising the trim threshold lets glibc reuse the same pages, as a caching allocator would.
    Set ``REPLICA_NO_MALLOC_TUNING=1`` to leave the allocator alone. Returns True if applied.
    """
    global _tuned
    if _tuned or os.environ.get("REPLICA_NO_MALLOC_TUNING"):
        return _tuned
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    _tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("malloc tuning %s", "applied" if _tuned else "refused")
    return _tuned


def _cpuinfo(key: str) -> str:
    """The first ``key`` line's value in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.split(":")[0].strip() == key), "")
    except OSError:
        return ""
    return line.split(":", 1)[1].strip() if ":" in line else ""


def cpu_description() -> str:
    """The CPU a time was measured on, for every printed timing: model, cores this process may
    use, native bf16 or not, and any kernel cap set in the environment."""
    import os
    import platform

    name = _cpuinfo("model name") or platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    has = cpu_has_bf16()
    text = f"{name}, {cores} cores, native bf16 {'yes' if has else 'no'}"
    if has and bf16_held_off():
        text += " (not used: oneDNN held below it)"
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return text + (f" (kernels capped: {' '.join(caps)})" if caps else "")


def cpu_has_bf16() -> bool:
    """The CPU's own bf16 instructions (AVX512_BF16 or AMX), whatever torch is held to."""
    flags = _cpuinfo("flags").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16(device) -> bool:
    """Whether bfloat16 autocast is a speed-up on ``device``: a CUDA GPU that supports it, or a
    CPU with native bf16 instructions (AVX512_BF16 or AMX) that oneDNN is not held below.
    Elsewhere oneDNN emulates bf16, slower than float32, so the demo leaves it off."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if dev.type != "cpu":
        return False
    return cpu_has_bf16() and not bf16_held_off()


def bf16_held_off() -> bool:
    """oneDNN (the convolutions and matmuls) held below the CPU's bf16 instructions, e.g.
    ``ONEDNN_MAX_CPU_ISA=AVX2`` as on an AVX2-only machine: its bf16 is emulated then. On the
    development VM a tiny-demo test took 61 s in bf16 under that hold, 10 s in float32."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return bool(isa) and isa != "ALL" and not any(t in isa for t in ("BF16", "AMX", "AVX10", "FP16"))


@contextlib.contextmanager
def autocast(devices, bf16: bool, cache: bool = True):
    """bfloat16 autocast on every device type the model spans (nothing when ``bf16`` is off).

    ``torch.autocast`` covers one device type: entered for ``cuda`` alone, a ``cuda:0,cpu``
    split would run tower b in float32 and tower a in bf16. One context per device type keeps
    both towers at the precision the run asked for. ``cache=False``: no cast kept across calls
    (inside a captured CUDA graph, as torch requires).
    """
    import torch

    with contextlib.ExitStack() as stack:
        if bf16:
            for kind in dict.fromkeys(torch.device(d).type for d in devices):
                stack.enter_context(torch.autocast(kind, dtype=torch.bfloat16, cache_enabled=cache))
        yield


def _new_tf32_api(torch) -> bool:
    """torch ≥ 2.9 sets TF32 per backend with ``fp32_precision``; mixing that with the legacy
    ``allow_tf32`` flags makes reading either raise, so one API is used throughout."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    return conv is not None and hasattr(conv, "fp32_precision") and hasattr(torch.backends.cuda.matmul,
                                                                              "fp32_precision")


def set_tf32(on: bool) -> None:
    """float32 convolutions (cuDNN) and matmuls (cuBLAS) in TF32 (on) or in true float32 (off).

    On Ampere and later, cuDNN runs float32 convolutions in TF32 unless told otherwise (10-bit
    mantissa inputs), so "float32" on a GPU is TF32 by default. No effect on the CPU."""
    import torch

    if _new_tf32_api(torch):
        v = "tf32" if on else "ieee"
        torch.backends.cuda.matmul.fp32_precision = v
        torch.backends.cudnn.conv.fp32_precision = v
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


@contextlib.contextmanager
def legacy_tf32_readable():
    """Within: cuDNN's legacy ``allow_tf32`` flag readable, as torch.export reads it. Once the new
    API (:func:`set_tf32`) has set cuDNN's convolutions, reading the legacy flag raises ("a mix of
    the legacy and new APIs"): an export after an eval in the same process failed. The legacy
    setter makes it readable, with the same value; the setting is put back after."""
    import warnings

    import torch

    on = tf32_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        if _new_tf32_api(torch):
            set_tf32(on)


def tf32_enabled() -> bool:
    """Whether float32 convolutions run in TF32 now (read through the API :func:`set_tf32` uses)."""
    import torch

    if _new_tf32_api(torch):
        return torch.backends.cudnn.conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def set_cuda_numerics(tf32: bool, deterministic: bool = False, benchmark: bool = False) -> dict:
    """The process's CUDA numerics, set explicitly, and what was set (for logs and eval.json).

    ``benchmark``: cuDNN times its algorithms for each new shape once and keeps the fastest
    (training: fixed shapes; off under ``deterministic``, whose algorithms are chosen by rule).
    ``deterministic``: cuDNN's deterministic algorithms and ``torch.use_deterministic_algorithms``
    (an op without a deterministic form then raises instead of running); cuBLAS needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first handle, so it is set here if unset.
    """
    import torch

    set_tf32(tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = benchmark and not deterministic
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # the call imports inductor: 2 s
        torch.use_deterministic_algorithms(deterministic)
    return dict(tf32=tf32, cudnn_benchmark=torch.backends.cudnn.benchmark, deterministic=deterministic)


def describe_numerics(n: dict) -> str:
    """'TF32 off, cudnn.benchmark on, nondeterministic' (what a CUDA float32 figure means)."""
    return (f"TF32 {'on' if n.get('tf32') else 'off'}, cudnn.benchmark {'on' if n.get('cudnn_benchmark') else 'off'}, "
            f"{'deterministic' if n.get('deterministic') else 'nondeterministic'} algorithms")


def to_device(t, device):
    """``t`` on ``device`` with no host wait: onto a GPU from pinned memory, non-blocking. A copy
    from pageable memory, or a blocking one, makes the CPU wait until the GPU has drained its
    queue, once per step. Batches arrive pinned from the loader; a tensor that lost its pinning
    (a batch shortened by a bad input) is pinned again here."""
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def usable_cores() -> int:
    """The cores this process may run on (its affinity: what a SLURM or container limit leaves)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_workers(device, cores: int | None = None) -> int:
    """``workers=auto``: loader processes from the cores this process may use. On a GPU the
    cores less 2 (the training process and the pinning thread), at most 8: 8 workers on 16 cores
    fed the H200 at 9,284 img/s from the JPEG store (docs/performance.md; tools/gpu_perf.py
    times 8, 12 and 14). On the CPU 2, niced (the step itself needs the cores: 0.98 of the model's
    rate from the JPEG store on 2 cores), none on one core."""
    cores = usable_cores() if cores is None else cores
    if getattr(device, "type", device) == "cuda":
        return max(1, min(8, cores - 2))
    return 2 if cores >= 2 else 0


def fused_norms_for(cfg, device) -> bool:
    """``fused_norms``: true / false as set; null (the default) turns them on where they were
    measured faster: on a GPU (Triton; an H200, batch 256: 1.41× the eager step in bf16, 1.26×
    in float32; docs/performance.md) and for float32 on the CPU; not under bf16 on the CPU (no
    faster than the eager path there, so not worth a compile). With ``compile=true`` the
    default is off: the whole-model compile fuses the eager norms itself (bench.py defaults:
    1.22× the fused-norm step on the H200). ``REPLICA_FUSED_NORMS=0`` turns the default off."""
    if cfg.fused_norms is not None:
        return cfg.fused_norms
    if os.environ.get("REPLICA_FUSED_NORMS", "1") == "0" or cfg.compile:
        return False
    return device.type == "cuda" or not cfg.bf16
