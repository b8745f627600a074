"""A ring of batch slots in shared memory, made once a run: loader workers write each batch into
slot ``batch index mod K`` and send back only its place (:class:`Slot`), so no batch makes a
shared-memory file of its own, and none is copied again by a pin thread. On a GPU the ring is
page-locked once (``cudaHostRegister``), so each batch goes to the device by DMA from where the
worker wrote it, on a copy stream of its own (:class:`CopyStream`).

Slots are taken in batch order: slot ``s`` holds batch ``b`` only when it is ``b``'s turn there,
which the main process gives once batch ``b − K`` has left the slot (on the CPU: once the float
batch is made; on a GPU: once the copy's event has completed). The DataLoader never has more
than ``prefetch × workers`` batches outstanding, so with ``K = prefetch × workers + 2`` a worker
finds its turn at once; a wrong count makes a worker wait for its turn, never overwrite a batch
in use, and never lets a later batch take a slot ahead of an earlier one the main process waits
for (tests/test_ring.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

WAIT_LIMIT_S = 300.0  # a worker waiting this long for a slot: the main process stopped taking batches


@dataclass(frozen=True)
class Slot:
    """Where a worker left a batch: slot ``index``, the batch's ``shape`` from the slot's start,
    and the rows to keep (None: all; rows of unreadable images were left unwritten)."""

    index: int
    shape: tuple
    keep: torch.Tensor | None = None


class BatchRing:
    """``slots`` uint8 buffers of ``nbytes`` each, shared with the loader workers."""

    def __init__(self, slots: int, nbytes: int):
        if slots < 3:
            raise ValueError(f"a ring needs at least 3 slots, got {slots}")
        self.slots, self.nbytes = slots, nbytes
        self.data = torch.empty((slots, nbytes), dtype=torch.uint8).share_memory_()
        self.turn = torch.arange(slots, dtype=torch.int64).share_memory_()  # the batch each slot waits for
        self.pending: list = []  # main process: (slot, batch, event) whose copy may still read the slot
        self.registered = False
        self.why = ""  # why register() left the ring pageable

    def __getstate__(self):  # to a worker: the shared buffers, not the main process's bookkeeping
        return dict(slots=self.slots, nbytes=self.nbytes, data=self.data, turn=self.turn, pending=[],
                    registered=False, why="")

    def slot_of(self, batch: int) -> int:
        return batch % self.slots

    # -- in a worker ------------------------------------------------------------------------
    def take(self, batch: int, shape) -> torch.Tensor:
        """Batch ``batch``'s slot as a tensor of ``shape`` to write into, once it is its turn."""
        n = math.prod(shape)
        if n > self.nbytes:
            raise ValueError(f"a batch of {n:,} bytes does not fit a slot of {self.nbytes:,}")
        index = self.slot_of(batch)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while int(self.turn[index]) != batch:
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch ring: slot {index} never came to batch {batch} in {WAIT_LIMIT_S:.0f} s "
                                   f"(it waits for batch {int(self.turn[index])})")
            time.sleep(0.0005)
        return self.data[index, :n].view(shape)

    # -- in the main process ----------------------------------------------------------------
    def view(self, slot: Slot) -> torch.Tensor:
        """The batch a worker left in ``slot`` (rows of ``slot.keep`` only: then a copy)."""
        t = self.data[slot.index, :math.prod(slot.shape)].view(slot.shape)
        return t if slot.keep is None else t[slot.keep]

    def give_back(self, batch: int, event=None) -> None:
        """Batch ``batch`` has left its slot: at once, or once ``event`` (its copy to a GPU)
        completes. The slot then waits for batch ``batch + K``."""
        if event is None:
            self.turn[self.slot_of(batch)] = batch + self.slots
        else:
            self.pending.append((batch, event))

    def settle(self) -> None:
        """Before the next batch is asked for: every copy but the newest is waited for (long done
        in practice) and its slot passed on; the newest's too if its copy has completed."""
        keep = []
        for k, (batch, event) in enumerate(self.pending):
            if k < len(self.pending) - 1:
                event.synchronize()
            elif not event.query():
                keep.append((batch, event))
                continue
            self.turn[self.slot_of(batch)] = batch + self.slots
        self.pending = keep

    def reset(self, start: int = 0) -> None:
        """Every slot waiting for the first batch from ``start`` that falls to it, before a loader's
        workers start (and after the last one's have stopped: batches prepared ahead but never
        asked for leave their slots taken)."""
        for _, event in self.pending:
            event.synchronize()
        self.pending = []
        first = torch.arange(start, start + self.slots, dtype=torch.int64)
        self.turn[first % self.slots] = first

    def register(self, cudart=None) -> bool:
        """Page-lock the ring for DMA to a GPU (once); False where the runtime refuses, or where a
        process forked afterwards (a loader worker) could not write into it (``why`` says which).
        The copies then stage through pageable memory: slower, the same bytes."""
        if self.registered:
            return True
        cudart = cudart or torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.data.data_ptr(), self.data.numel(), 0)
        self.registered = int(getattr(err, "value", err)) == 0
        if not self.registered:
            self.why = f"the runtime refused it (error {int(getattr(err, 'value', err))})"
        elif not forked_child_writes(self.data.data_ptr(), self.nbytes, self.slots):
            self.unregister(cudart)
            self.why = "a process forked after it could not write there (page-locked memory hidden from children)"
        return self.registered

    def unregister(self, cudart=None) -> None:
        if self.registered:
            (cudart or torch.cuda.cudart()).cudaHostUnregister(self.data.data_ptr())
            self.registered = False


def forked_child_writes(ptr: int, stride: int, count: int) -> bool:
    """Whether a process forked now can write a byte at ``ptr + k·stride`` for each k < ``count``,
    as a loader worker writes its batch into its slot. A driver may mark page-locked memory
    ``MADV_DONTFORK``: a child then has no such pages, and a worker writing there dies of a
    segmentation fault. One fork, a byte a slot (written back with its own value), once a ring."""
    import ctypes
    import os
    import warnings

    if not hasattr(os, "fork"):
        return True
    with warnings.catch_warnings():  # Python 3.12's note on forking a threaded process: the child runs no Python
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            pid = os.fork()
        except OSError:  # no process to spare now: nothing learnt, the workers will say more
            return True
    if pid == 0:  # the child: each byte read and written back, then gone without Python's exit handlers
        try:
            import faulthandler

            faulthandler.disable()  # a fault here is the answer, not a crash to report
            for k in range(count):
                byte = ctypes.c_ubyte.from_address(ptr + k * stride)
                byte.value = byte.value
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def room_for(nbytes: int, where: str = "/dev/shm") -> str | None:
    """None if ``where`` has room for a ring of ``nbytes`` (with a quarter to spare for the
    rest), else why not: a ring larger than what is free there would end the run with a bus
    error at its first write."""
    import os

    try:
        st = os.statvfs(where)
    except OSError:
        return None  # no such mount to ask (not Linux): as before the ring
    free = st.f_bavail * st.f_frsize
    if nbytes * 1.25 > free:
        return f"{where} has {free / 1e6:,.0f} MB free, a ring of batch slots needs {nbytes / 1e6:,.0f} MB"
    return None


def ring_size(workers: int, prefetch: int) -> int:
    """Slots for a loader of ``workers`` processes with ``prefetch`` batches each."""
    return workers * prefetch + 2


class CopyStream:
    """Batches to a GPU on a stream of their own: the copy overlaps the step still running on the
    compute stream, which waits for it on the device (never the host). ``api``: torch.cuda, or a
    CPU test's recorder."""

    def __init__(self, device, api=None):
        self.api = api or torch.cuda
        self.device = device
        self.stream = self.api.Stream(device=device)

    def __call__(self, fn):
        """(fn()'s tensors on the device, the copy's event)."""
        with self.api.stream(self.stream):
            out = fn()
            event = self.api.Event()
            event.record(self.stream)
        current = self.api.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in out:
            if t is not None:
                t.record_stream(current)  # the caching allocator: in use on the compute stream too
        return out, event
