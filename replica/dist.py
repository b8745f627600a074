"""The processes of a run: which launcher started them, which devices each owns, and the
decisions they take together.

A run is one process, or one of a job's processes started by torchrun (one node or several) or
by ``srun`` alone (SLURM's task numbers, :func:`from_slurm`). :func:`setup_ranks` joins the job
and resolves the process's devices once; :class:`Ranks` carries every collective the loop
makes, each a named method that says what it agrees or gathers (DDP's gradient all-reduce is
DDP's own). Decisions go over a gloo group of CPU tensors, so deciding never waits on a GPU.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import torch

from .errors import ReplicaError
from .devices import parse_devices, resolve_devices

log = logging.getLogger("replica")


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list, e.g. ``"4(x2),3"`` → [4, 4, 3]."""
    out = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        out += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return out


def from_slurm(env=None) -> dict:
    """The launcher variables torch.distributed reads, from SLURM's, for a process that ``srun``
    started as one of N tasks without torchrun; {} where that is not the case.

    torchrun's own variables win: under ``srun torchrun …`` (one agent per node, the multi-node
    recipe in docs/training.md) RANK is set and SLURM's task numbers are the agents', not the
    workers'. A step of one task, or a batch script outside ``srun`` (SLURM_NTASKS set but no
    step of its own), is one process. Otherwise each task is one process of the job: RANK =
    SLURM_PROCID, WORLD_SIZE = the step's task count, LOCAL_RANK = SLURM_LOCALID and
    LOCAL_WORLD_SIZE = the tasks on this node; the rendezvous needs MASTER_ADDR and MASTER_PORT,
    which SLURM does not set: without them, one line that says what to export.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_NUM_TASKS" not in env:
        return {}
    world = int(env["SLURM_STEP_NUM_TASKS"])
    if world < 2:
        return {}
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ReplicaError(
            f"srun started {world} tasks of this command, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set, so they cannot meet: export MASTER_ADDR=$(scontrol show "
            f"hostnames \"$SLURM_JOB_NODELIST\" | head -n1) MASTER_PORT=29500 before srun, or run one torchrun per "
            f"node (docs/training.md, 'On a SLURM cluster')")
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = int(env.get("SLURM_NODEID", 0))
    counts = tasks_per_node(per_node) if per_node else []
    local_world = counts[node] if node < len(counts) else None
    out = dict(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(world), LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
    if local_world:
        out["LOCAL_WORLD_SIZE"] = str(local_world)
    return out


def adopt_slurm() -> None:
    """Under ``srun -n N`` without torchrun: take SLURM's task numbers as this process's rank
    (:func:`from_slurm`), so that N tasks are one job of N processes, never N jobs of one
    writing into the same run folder."""
    os.environ.update(from_slurm())


def under_launcher() -> bool:
    """Whether a launcher started this process as part of a job: torchrun (even with one
    process, so that ``torchrun --nproc-per-node 1`` runs the DDP path it will run with more) or
    any launcher that sets a world size above one."""
    return "TORCHELASTIC_RUN_ID" in os.environ or dist_info()[1] > 1


def process_devices(devices: str, per_process: int, local_rank: int, world: int, visible: int | None = None,
                    local_world: int | None = None):
    """The device(s) of this process: ``devices`` as given, or its share of the node's GPUs in a job.

    Each process owns ``per_process`` GPUs (``k``: ``devices_per_process``; 1 for the one-tower
    variant). Where every process sees all the node's GPUs (torchrun's way), process ``i``
    takes ``cuda:i·k … cuda:i·k+k−1``. Where the launcher already gave each process its own
    GPUs (SLURM ``--gpus-per-task``, a per-rank ``CUDA_VISIBLE_DEVICES``), the process sees
    exactly ``k`` and takes ``cuda:0 … cuda:k−1``; :func:`check_distinct_gpus` then makes sure
    no two processes landed on the same GPU.
    """
    if world == 1:  # one process (under torchrun too): the devices given, "auto" as anywhere
        return parse_devices(devices)
    if devices == "cpu" or not torch.cuda.is_available():
        return "cpu"
    k = per_process
    n = torch.cuda.device_count() if visible is None else visible
    if local_world is None:  # torchrun and adopt_slurm set it; another launcher may not: then at least
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))  # this process's place
    if n >= local_world * k and n >= (local_rank + 1) * k:  # every process sees the whole node
        first = local_rank * k
    elif n == k:  # the launcher gave this process exactly its share
        first = 0
        log.info("process %d sees %d GPU(s), its own share: using cuda:0…cuda:%d", local_rank, n, k - 1)
    else:
        raise ReplicaError(f"process {local_rank} of {local_world} on this node needs {k} GPU(s) "
                           f"(devices_per_process={k}), but {n} are visible: torchrun needs {local_world * k} "
                           f"visible to every process, or give each process exactly {k} of its own")
    return tuple(f"cuda:{first + i}" for i in range(k)) if k == 2 else f"cuda:{first}"


def process_group_args(devices) -> tuple[str, dict]:
    """(backend, keyword arguments) of ``init_process_group`` for a process on ``devices``.

    NCCL binds its communicator to ``device_id`` at once (eager init). That is right only for a
    process that owns one GPU: with two (towers a and b on GPUs 2i and 2i+1), DDP's first
    broadcast touches tower b's parameters, and ProcessGroupNCCL refuses a collective on a
    tensor not on the device passed to ``init_process_group``. So two GPUs per process: no
    ``device_id``, and NCCL makes a communicator per device as it first needs one.
    """
    devices = tuple(torch.device(d) for d in devices)
    kinds = {d.type for d in devices}
    if len(kinds) > 1:  # DDP takes a module on one device type only; NCCL carries no CPU tensor
        raise ReplicaError(f"devices={','.join(map(str, devices))}: a split over a GPU and the CPU runs in one process "
                           f"only (replica train without a launcher); under torchrun give each process GPUs only "
                           f"(devices=auto, devices_per_process=1 or 2)")
    if devices[0].type != "cuda":
        return "gloo", {}
    return "nccl", (dict(device_id=devices[0]) if len(devices) == 1 else {})


def bind_current_device(devices, cuda=None) -> None:
    """Make the process's first device, if a GPU, the current one: else the loader's pin-memory
    thread, a CUDA context and every unplaced allocation land on GPU 0, also for a process that
    trains on ``devices=cuda:1`` outside a launcher. ``cuda``: torch.cuda (a recording stand-in
    in the CPU tests)."""
    first = torch.device(devices[0])
    if first.type == "cuda":
        (cuda or torch.cuda).set_device(first)


def gpu_uuid(device) -> str:
    """The GPU's UUID, the same in every process whatever its ``CUDA_VISIBLE_DEVICES``."""
    return str(torch.cuda.get_device_properties(torch.device(device)).uuid)


def check_distinct_gpus(ranks: "Ranks", devices, uuid=gpu_uuid) -> None:
    """Stop with one line if two processes of the job use the same GPU (NCCL would fail later
    with "Duplicate GPU detected", or two processes would share one GPU's memory). One process
    may hold one GPU twice: both towers on one GPU (``devices=cuda:0,cuda:0``)."""
    import socket

    host = socket.gethostname()
    mine = list({uuid(d): (host, uuid(d), str(d)) for d in devices if torch.device(d).type == "cuda"}.values())
    if not mine or not ranks.distributed:
        return
    seen: dict = {}
    for r, theirs in enumerate(ranks.gather(mine)):
        for host, u, name in theirs:
            if (host, u) in seen:
                other, other_name = seen[(host, u)]
                raise ReplicaError(f"processes {other} ({other_name}) and {r} ({name}) both use GPU {u} on {host}: "
                                   f"give each process its own GPUs (torchrun: all GPUs visible to every process; "
                                   f"a per-process launcher: exactly devices_per_process of them each)",
                                   quiet=not ranks.main)
            seen[(host, u)] = (r, name)


class Ranks:
    """The processes of a run, and the decisions they take together.

    One process: every call is the identity. Under a launcher: collectives on ``group``, a gloo
    group of CPU tensors (NCCL's own group carries only DDP's gradients), so deciding costs no
    wait on the GPU and object collectives never guess a device. ``torchrun --nproc-per-node 1``
    runs them too (a job of one), so that one GPU exercises what many will.
    """

    FLAGS = ("stop", "save", "error", "nan")

    def __init__(self, rank: int = 0, world: int = 1, group=None, distributed: bool | None = None,
                 owns_group: bool = False):
        self.rank, self.world, self.group = rank, world, group
        self.distributed = world > 1 if distributed is None else distributed
        self.owns_group = owns_group
        self.main = rank == 0

    def agree(self, **flags) -> dict:
        """Each flag true if it is true in any process (an all-reduce of one int tensor)."""
        if not self.distributed:
            return {k: bool(flags.get(k)) for k in self.FLAGS}
        t = torch.tensor([int(bool(flags.get(k))) for k in self.FLAGS], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return {k: bool(v) for k, v in zip(self.FLAGS, t.tolist())}

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order (``all_gather_object`` on the gloo group)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` in every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Wait until every process is here (e.g. the run folder exists, rank 0's file is whole)."""
        if self.distributed:
            torch.distributed.barrier(group=self.group)

    def first_message(self, message: str | None) -> str:
        """The first process's message of those that have one, naming it when there are several."""
        msgs = self.gather(message)
        r, m = next((r, m) for r, m in enumerate(msgs) if m is not None)
        return m if self.world == 1 else f"process {r}: {m}"

    def close(self) -> None:
        """Leave the job: destroy the process groups this process made (left alive, NCCL warns at
        exit, and some NCCL versions hang there). Every process calls it at the same point: the
        end of the run, or a stop they all agreed on."""
        if self.owns_group and torch.distributed.is_initialized():
            if self.group is not None:
                torch.distributed.destroy_process_group(self.group)
            torch.distributed.destroy_process_group()
        self.owns_group = False


def setup_ranks(devices: str, towers: int, per_process: int, batch_size: int) -> tuple[Ranks, tuple]:
    """Join the launcher's job (if any) and resolve this process's devices, once: (ranks, devices
    as a tuple of ``torch.device``, one per tower's device). In that order's reverse: a process's
    GPU is set before its process group exists, so NCCL and its barrier use it.

    ``devices``: the config's spec ("auto", "cpu", "cuda:0", "cuda:0,cuda:1"); ``towers``: 2, or
    1 for the one-tower variant; ``per_process``: GPUs each process owns in a job (1 or 2);
    ``batch_size``: the global batch, which must split evenly across the processes."""
    adopt_slurm()
    rank, world, local_rank = dist_info()
    if batch_size % world:
        raise ReplicaError(f"batch_size {batch_size} does not split across {world} processes: give a "
                           f"multiple of {world}")
    spec = process_devices(devices, per_process if towers == 2 else 1, local_rank, world)
    resolved = resolve_devices(spec, towers=towers)
    bind_current_device(resolved)  # before NCCL exists, so its communicator and barrier use this GPU
    if not under_launcher():
        return Ranks(), resolved
    backend, kwargs = process_group_args(resolved)  # refuses a GPU + CPU split before any group exists
    dist = torch.distributed
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend, **kwargs)
        owns = True
    group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    if rank == 0:
        log.info("job of %d process(es): %s for gradients%s; process 0 on %s", world, dist.get_backend(),
                 ", gloo for decisions" if group is not None else "", " + ".join(map(str, resolved)))
    ranks = Ranks(rank, world, group, distributed=True, owns_group=owns)
    check_distinct_gpus(ranks, resolved)
    return ranks, resolved


class StopSignals:
    """Ctrl-C / SIGTERM: finish the step, save, exit cleanly.

    A second signal stops at once, unless ``escalate`` is off or it comes within a second of
    the first: a terminal's Ctrl-C reaches every process of the group, and torchrun forwards
    the signal it got to its workers again, so one Ctrl-C can arrive twice. Under torchrun a
    worker never escalates; the agent kills workers that have not exited 30 s after it.
    """

    def __init__(self):
        self.requested = None
        self.escalate = True
        self._first = 0.0
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM"):
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            if self.escalate and time.monotonic() - self._first > 1.0:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.requested = signal.Signals(signum).name
        self._first = time.monotonic()

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
