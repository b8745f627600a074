"""The batch ring (replica.data.ring): loader workers write into shared slots made once, the
main process reads them where they are, a slot is never written while its batch is in use, and
on a GPU the copies go on a stream of their own (recorded here with stand-ins)."""
import logging
import re
import time

import pytest
import torch

from replica.data.loaders import PREFETCH, Feed, TrainBatches, slot_bytes
from replica.data.ring import BatchRing, CopyStream, ring_size, room_for
from replica.data.store import PreparedStore
from replica.data.writer import prepare


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The synthetic set as a raw and as a JPEG store: 24 training images, 6 batches of 4."""
    from replica.data.synth import synth

    root = tmp_path_factory.mktemp("ring")
    synth(root / "s", classes=4, train_per_class=6, val_per_class=2, seed=3, workers=1, progress=False)
    for fmt in ("raw", "jpeg"):
        prepare(root / "s", root / fmt, workers=1, progress=False, fmt=fmt)
    return root


def batches(st, ring, workers, crop_on="workers", hold=0.0, n=None):
    """Every batch of an epoch as the Feed gives it, each compared after ``hold`` seconds (the
    time a step would read it) and kept as a copy."""
    ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3, crop_on=crop_on)
    feed = Feed(ds, workers, "cpu", ring=ring)
    out = []
    try:
        for crops, shift, labels, b, bad in feed:
            first = crops.images.clone() if crop_on == "device" else crops.clone()
            time.sleep(hold)
            now = crops.images if crop_on == "device" else crops
            assert torch.equal(now, first), f"batch {b} changed while in use"
            out.append((first, shift, labels, b))
            if n and len(out) == n:
                break
    finally:
        feed.close()
    return out


@pytest.mark.parametrize("fmt,crop_on", [("raw", "workers"), ("jpeg", "workers"), ("raw", "device"),
                                         ("jpeg", "device")])
def test_batches_through_the_ring_are_the_batches_and_live_in_its_slots(stores, fmt, crop_on):
    st = PreparedStore(stores / fmt)
    ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3, crop_on=crop_on)
    ring = BatchRing(ring_size(2, PREFETCH), slot_bytes(ds))
    plain = batches(st, None, 2, crop_on)
    ringed = batches(st, ring, 2, crop_on)
    assert len(plain) == len(ringed) == len(ds)
    for a, b in zip(plain, ringed):
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
    # the main process reads the worker's slot itself: no copy, no file of its own
    ds.ring = ring
    feed = Feed(ds, 2, "cpu", ring=ring)
    crops = next(feed)[0]
    t = crops.images if crop_on == "device" else crops
    lo, hi = ring.data.data_ptr(), ring.data.data_ptr() + ring.data.numel()
    assert lo <= t.data_ptr() < hi and t.untyped_storage().data_ptr() == lo
    feed.close()
    assert not ring.pending


def test_a_ring_smaller_than_the_loaders_lead_makes_workers_wait_never_overwrite(stores):
    """3 slots for 2 workers × 2 batches ahead: a worker would write batch m + 3 into batch m's
    slot while the step reads it, and batch m + 4 could take batch m + 1's slot first (then the
    main process would wait for m + 1 for ever); turns make each wait. Each batch is checked after
    a pause long enough for a worker to write, and all of them equal the batches without a ring."""
    st = PreparedStore(stores / "raw")
    ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3)
    plain = batches(st, None, 2)
    small = batches(st, BatchRing(3, slot_bytes(ds)), 2, hold=0.15)
    assert len(small) == len(plain) and all(torch.equal(a[0], b[0]) for a, b in zip(plain, small))


def test_a_slot_is_taken_in_batch_order_and_passed_on_after_its_copy():
    ring = BatchRing(3, 64)
    ring.reset(4)  # an epoch resumed at batch 4: slot 1 waits for batch 4, slot 2 for 5, slot 0 for 6
    assert ring.turn.tolist() == [6, 4, 5]
    t = ring.take(4, (2, 4))
    assert t.data_ptr() == ring.data[1].data_ptr()

    class Event:
        def __init__(self, done):
            self.done, self.waited = done, False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = True

    old, new = Event(False), Event(False)
    ring.give_back(4, old)
    ring.give_back(5, new)
    ring.settle()  # the older copy is waited for; the newest, still running, keeps its slot
    assert old.waited and not new.waited and ring.turn.tolist() == [6, 7, 5]
    new.done = True
    ring.settle()
    assert ring.turn.tolist() == [6, 7, 8] and not ring.pending
    ring.give_back(6)  # the CPU: at once
    assert ring.turn.tolist() == [9, 7, 8]
    with pytest.raises(ValueError, match="does not fit"):
        ring.take(7, (65,))


def test_registration_page_locks_the_ring_once_and_a_refusal_is_no_error():
    class Cudart:
        def __init__(self, err):
            self.err, self.calls = err, []

        def cudaHostRegister(self, ptr, size, flags):
            self.calls.append(("register", ptr, size, flags))
            return self.err

        def cudaHostUnregister(self, ptr):
            self.calls.append(("unregister", ptr))

    ring = BatchRing(4, 100)
    ok = Cudart(0)
    assert ring.register(ok) and ring.register(ok)
    assert ok.calls == [("register", ring.data.data_ptr(), 400, 0)]
    ring.unregister(ok)
    assert ok.calls[-1] == ("unregister", ring.data.data_ptr())
    refused = BatchRing(3, 10)
    assert not refused.register(Cudart(1)) and refused.why == "the runtime refused it (error 1)"


class HidingCudart:
    """A runtime whose page-locking hides the pages from forked children, as a driver may
    (``madvise(MADV_DONTFORK)``, for real): a loader worker writing its batch there would die."""

    MADV_DONTFORK, MADV_DOFORK = 10, 11  # Linux

    def __init__(self):
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.sizes, self.calls = {}, []

    def cudaHostRegister(self, ptr, size, flags):
        self.calls.append("register")
        self.sizes[ptr] = size
        return self.libc.madvise(ptr, size, self.MADV_DONTFORK)  # 0: done

    def cudaHostUnregister(self, ptr):
        self.calls.append("unregister")
        assert self.libc.madvise(ptr, self.sizes.pop(ptr), self.MADV_DOFORK) == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork")
def test_a_ring_hidden_from_forked_workers_stays_pageable_and_the_workers_write_it(stores):
    """Page-locking that forked children cannot see is undone at once (real madvise, a real
    child killed by SIGSEGV), and the ring then carries an epoch through a worker as before."""
    from replica.data.ring import forked_child_writes

    ring = BatchRing(4, 1 << 16)
    assert forked_child_writes(ring.data.data_ptr(), ring.nbytes, ring.slots)
    hide = HidingCudart()
    assert hide.cudaHostRegister(ring.data.data_ptr(), ring.data.numel(), 0) == 0
    assert not forked_child_writes(ring.data.data_ptr(), ring.nbytes, ring.slots)  # the child died
    hide.cudaHostUnregister(ring.data.data_ptr())
    assert forked_child_writes(ring.data.data_ptr(), ring.nbytes, ring.slots)

    st = PreparedStore(stores / "raw")
    ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3)
    ring = BatchRing(ring_size(1, PREFETCH), slot_bytes(ds))
    hide = HidingCudart()
    assert not ring.register(hide) and hide.calls == ["register", "unregister"]
    assert "could not write there" in ring.why
    want = batches(st, None, 0)
    got = batches(st, ring, 1)
    assert len(got) == len(want) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want))


def test_a_copy_stream_copies_beside_the_step_and_the_step_waits_on_the_device():
    calls = []

    class Stream:
        def __init__(self, device=None, name="copy"):
            self.name = name

        def wait_stream(self, other):
            calls.append(f"{self.name} waits for {other.name}")

    class Event:
        def record(self, stream):
            calls.append(f"event on {stream.name}")

    class Api:
        class stream:
            def __init__(self, s):
                self.s = s

            def __enter__(self):
                calls.append(f"enter {self.s.name}")

            def __exit__(self, *a):
                calls.append(f"leave {self.s.name}")

        @staticmethod
        def current_stream(device):
            return Stream(name="compute")

    class T:
        def record_stream(self, s):
            calls.append(f"in use on {s.name}")

    Api.Stream, Api.Event = Stream, Event
    copy = CopyStream("cuda:0", api=Api)
    out, event = copy(lambda: (calls.append("copies") or [T(), None, T()]))
    assert isinstance(event, Event)
    assert calls == ["enter copy", "copies", "event on copy", "leave copy", "compute waits for copy",
                     "in use on compute", "in use on compute"]


def test_a_run_without_room_for_the_ring_says_so_and_trains(store, tmp_path, monkeypatch, caplog, capsys):
    from replica import train as T
    from runs_helpers import tiny

    assert room_for(10**18) and room_for(1) is None
    caplog.set_level(logging.INFO, logger="replica")
    monkeypatch.setattr(T, "room_for", lambda n: "/dev/shm has 1 MB free, a ring of batch slots needs 9 MB")
    T.train(tiny(store, workers=1, epochs=1, steps_per_epoch=2), tmp_path / "r", progress=False)
    assert "batches travel one shared-memory file each: /dev/shm has 1 MB free" in capsys.readouterr().out
    assert (tmp_path / "r" / "last.pt").exists()
    monkeypatch.undo()
    caplog.clear()
    T.train(tiny(store, workers=1, epochs=1, steps_per_epoch=2), tmp_path / "s", progress=False)
    assert re.search(r"batch ring: 4 slots of [\d.]+ MB in shared memory", caplog.text)


def test_slot_bytes_fit_the_largest_batch(stores):
    st = PreparedStore(stores / "jpeg")
    assert slot_bytes(TrainBatches(st, 4, st.mean(), None, crop=224)) == 4 * 3 * 224 * 224
    assert slot_bytes(TrainBatches(st, 4, st.mean(), None, crop=224, crop_on="device")) == 4 * 3 * 256 * 256


@pytest.mark.parametrize("crop_on", ["workers", "device"])
def test_what_a_worker_sends_back_holds_no_tensor(stores, crop_on):
    """Through the ring, a worker's result is the slot's place and small arrays: no tensor, so
    nothing of a batch goes through a shared-memory file of its own (torch shares each tensor a
    worker returns that way)."""
    from replica.data.loaders import Uncropped, loader

    st = PreparedStore(stores / "jpeg")
    ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3, crop_on=crop_on)
    ds.ring = BatchRing(ring_size(2, PREFETCH), slot_bytes(ds))
    for crops, shift, labels, b, bad in loader(ds, 2):
        parts = [shift, labels, *(vars(crops).values() if isinstance(crops, Uncropped) else vars(crops).values())]
        assert not any(isinstance(x, torch.Tensor) for x in parts), (b, [type(x) for x in parts])
        ds.ring.give_back(b)  # (read nothing here: pass each slot on)


def test_to_a_gpu_each_slot_waits_for_its_copys_event(stores, monkeypatch):
    """Feed's GPU branch with the device stood in for: every batch is moved by the copy stream,
    its slot handed on only through the copy's event, and the older copies waited for before
    the next batch is asked for (the calls a GPU run makes, recorded on the CPU)."""
    import replica.data.loaders as L

    moved, events = [], []

    class Event:
        def __init__(self):
            self.waited = False
            events.append(self)

        def query(self):
            return False

        def synchronize(self):
            self.waited = True

    def copy(fn):
        out = fn()
        moved.append(len(out))
        return out, Event()

    sent = []  # what went through to_device, by identity
    monkeypatch.setattr(L, "to_device", lambda t, device: sent.append(id(t)) or t)
    st = PreparedStore(stores / "raw")
    for crop_on, each in (("workers", 3), ("device", 6)):  # crop_on=device: the crop draws travel too
        moved.clear(), events.clear()
        ds = TrainBatches(st, 4, st.mean(), st.pca(), seed=3, crop_on=crop_on)
        ring = BatchRing(ring_size(2, PREFETCH), slot_bytes(ds))
        feed = Feed(ds, 2, "cuda:0", ring=ring, copy=copy)
        seen = []
        for crops, shift, labels, b, _ in feed:
            seen.append(b)
            parts = [crops.images, crops.oy, crops.ox, crops.flips] if crop_on == "device" else [crops]
            assert all(id(t) in sent for t in parts + [labels]), f"batch {b}: a tensor left the copy stream"
        feed.close()
        assert seen == list(range(len(ds))) and moved == [each] * len(ds) and feed.held is None
        assert all(e.waited for e in events)  # each copy waited for: before the next batch, or at the end
