"""A ring of batch slots in shared memory, made once a run: loader workers write each batch into
slot ``batch index mod K`` and send back only its place (:class:`Slot`), so no batch makes a
shared-memory file of its own, and none is copied again by a pin thread. On a GPU the ring is
page-locked once (``cudaHostRegister``), so each batch goes to the device by DMA from where the
worker wrote it, on a copy stream of its own (:class:`CopyStream`).

A slot is written only when free: a worker takes it (its flag 1 → 0, waiting while it is 0), the
main process gives it back once the batch has left it (on the CPU: once the float batch is made;
on a GPU: once the copy's event has completed). The DataLoader never has more than
``prefetch × workers`` batches outstanding, so with ``K = prefetch × workers + 2`` a worker finds
its slot free at once; the flags make a wrong count a wait, never a batch overwritten in use
(tests/test_ring.py).
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
        self.free = torch.ones(slots, dtype=torch.int32).share_memory_()
        self.pending: list = []  # main process: (slot, event) whose copy may still read the slot
        self.registered = False

    def __getstate__(self):  # to a worker: the shared buffers, not the main process's bookkeeping
        return dict(slots=self.slots, nbytes=self.nbytes, data=self.data, free=self.free, pending=[],
                    registered=False)

    # -- in a worker ------------------------------------------------------------------------
    def take(self, index: int, shape) -> torch.Tensor:
        """Slot ``index`` as a tensor of ``shape`` to write into, once it is free."""
        n = math.prod(shape)
        if n > self.nbytes:
            raise ValueError(f"a batch of {n:,} bytes does not fit a slot of {self.nbytes:,}")
        deadline = time.monotonic() + WAIT_LIMIT_S
        while int(self.free[index]) == 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch ring: slot {index} was not given back in {WAIT_LIMIT_S:.0f} s")
            time.sleep(0.0005)
        self.free[index] = 0
        return self.data[index, :n].view(shape)

    # -- in the main process ----------------------------------------------------------------
    def view(self, slot: Slot) -> torch.Tensor:
        """The batch a worker left in ``slot`` (rows of ``slot.keep`` only: then a copy)."""
        t = self.data[slot.index, :math.prod(slot.shape)].view(slot.shape)
        return t if slot.keep is None else t[slot.keep]

    def give_back(self, index: int, event=None) -> None:
        """The batch has left slot ``index``: at once, or once ``event`` (its copy to a GPU) completes."""
        if event is None:
            self.free[index] = 1
        else:
            self.pending.append((index, event))

    def settle(self) -> None:
        """Before the next batch is asked for: every copy but the newest is waited for (long done
        in practice) and its slot freed; the newest's slot too if its copy has completed."""
        keep = []
        for k, (index, event) in enumerate(self.pending):
            if k < len(self.pending) - 1:
                event.synchronize()
            elif not event.query():
                keep.append((index, event))
                continue
            self.free[index] = 1
        self.pending = keep

    def reset(self) -> None:
        """Every slot free, once no worker can write any more (their loader shut down): batches
        prepared ahead but never asked for (an epoch cut short by ``steps_per_epoch``, a stop)
        leave their slots taken."""
        for _, event in self.pending:
            event.synchronize()
        self.pending = []
        self.free.fill_(1)

    def register(self, cudart=None) -> bool:
        """Page-lock the ring for DMA to a GPU (once); False where the runtime refuses (the copies
        then stage through pageable memory: slower, the same bytes)."""
        if self.registered:
            return True
        cudart = cudart or torch.cuda.cudart()
        err = cudart.cudaHostRegister(self.data.data_ptr(), self.data.numel(), 0)
        self.registered = int(getattr(err, "value", err)) == 0
        return self.registered

    def unregister(self, cudart=None) -> None:
        if self.registered:
            (cudart or torch.cuda.cudart()).cudaHostUnregister(self.data.data_ptr())
            self.registered = False


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
