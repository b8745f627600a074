"""What the run tests share: a tiny config, a stand-in for the Ctrl-C handler, and a recorder
of host reads on the meta device."""
import torch
from torch.overrides import TorchFunctionMode

from replica.config import load_config

# The mechanics tests (stop, resume, kill, faults, bad data, eval plumbing) run the net at 1/16 of
# its width: the same code, layers and connectivity, 227 thousand parameters instead of 57 million,
# so a checkpoint is 2 MB, not 456 MB. Faithfulness tests (test_model.py), one exact-resume test,
# the DDP one-process-vs-two test and the demo run the paper's width.
NARROW = 0.0625

# tiny()'s run on the command line (``replica train CONFIG *TINY_ARGS``)
TINY_ARGS = ["batch_size=4", "epochs=2", "steps_per_epoch=3", "workers=0", "devices=cpu", "init=caffe",
             "tensorboard=false", "live=false",
             f"width={NARROW}"]


def tiny(store, **kw):
    """2 epochs × 3 steps of batch 4 on ``store``, on the CPU, no loader workers, the narrow net."""
    base = dict(data=str(store), batch_size=4, epochs=2, steps_per_epoch=3, workers=0, devices="cpu",
                init="caffe", checkpoint_minutes=60, width=NARROW, tensorboard=False, live=False)
    base.update(kw)
    return load_config(None, base)


class StopAfter:
    """Stands in for the Ctrl-C handler: 'requested' turns true at its n-th look (once before each
    step, and once more after each epoch's last step, before its validation)."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    @property
    def requested(self):
        self.seen += 1
        return "SIGINT" if self.seen >= self.n else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class HostReads(TorchFunctionMode):
    """Within it, on the meta device (a device that is not the CPU): ``seen`` names each torch
    function that made a tensor from host data or was handed a tensor not on meta. On a GPU
    each would be a copy from the host, a blocking one a wait for the device."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if name in ("tensor", "as_tensor", "asarray", "from_numpy") or any(
                isinstance(t, torch.Tensor) and t.device.type != "meta" for t in flat):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))
