"""The training loop as plain functions, read top to bottom (torchvision's
``references/classification/train.py`` is the model):

    train ─ setup ─ resume_run | start ─ train_epochs ─┬─ train_one_epoch: next_batch → agree → train_step
                                                       └─ end_of_epoch: validate, schedule, checkpoint, record

- :func:`train_step` is one update with every input an argument: what tools and tests patch (never
  a private method), and the function a CUDA graph would capture.
- :class:`Run` holds what :func:`setup` built; where the run stands is ``run.progress`` and
  ``run.tally`` (replica.runs' own records, the checkpoint's); :class:`LossWatch` the losses still
  on the device; every number leaves through one :class:`replica.live.RunLog`.

Everything random is either derived from (seed, epoch, batch) — data order, crops, flips,
colour noise — or kept in the checkpoint — the dropout RNG — so a run stopped anywhere and
resumed ends with the same parameters as one that never stopped: bit for bit on the CPU (tested);
on a GPU with ``deterministic=true`` (cuDNN may otherwise pick nondeterministic algorithms;
tested on one H200).

In a job every process takes each decision that leads into a collective (save, stop, give up
on an error) at the same step: :class:`replica.dist.Ranks` all-reduces one small flag tensor per
step on a CPU (gloo) group, so a signal, a clock or a bad batch seen by one process stops or
saves all of them together, never one in ``all_gather_object`` while another waits in DDP's
all-reduce.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import augment
from .colour import tower_medians
from .config import Config, departures, dump_config, show
from .data.loaders import (PREFETCH, Feed, TrainBatches, check_stats_feasible, data_stats, decode_if_encoded,
                           open_training, slot_bytes, worker_deaths_at_next_batch)
from .data.ring import BatchRing, CopyStream, ring_size, room_for
from .data.store import PreparedStore
from .dist import Ranks, StopSignals, setup_ranks
from .errors import ReplicaError, TrainingStopped
from .evaluate import evaluate
from .fileio import locked
from .live import RunLog, stall_warning
from .model import AlexNet
from .optim import PaperSGD, Schedule, apply_lrs, param_groups
from .runs import (TRAIN_LOCK, Checkpoint, Progress, Tally, atomic_write, check_compatible, code_version,
                   load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .runtime import (autocast, default_workers, describe_numerics, fused_norms_for, set_cuda_numerics, to_device,
                      usable_cores)
from .steps import StepRunner

# Losses stay on the device and are read (and checked for NaN) every this many steps, and
# before every save: reading one makes the CPU wait for the GPU. On the CPU there is no wait.
LOSS_READ_STEPS = {"cpu": 1, "cuda": 20}


# ----------------------------------------------------------------------------------------------
# What a run is made of


@dataclass
class Run:
    """What :func:`setup` builds, once; the loop replaces none of it. Where the run stands is
    ``progress`` (the checkpoint's own record, :class:`replica.runs.Progress`) and the epoch's
    running sums ``tally``: held here, never copied into anything else."""

    cfg: Config
    folder: Path
    ranks: Ranks
    devices: tuple  # tower a's (and fc8's) device first: where each batch goes
    images: object  # the training set
    val_images: object | None
    classes: list
    names: list | None
    mean: object  # the mean image (3×256×256)
    pca: dict | None  # the colour noise's eigenvectors
    mean_crop: torch.Tensor  # the mean's centre crop, once on device 0 (finish() would copy it each step)
    model: AlexNet
    optimizer: PaperSGD
    schedule: Schedule
    steps_per_epoch: int
    numerics: dict
    workers: int  # loader processes (workers=auto: from the cores, runtime.default_workers)
    forward: object = None  # what a step calls: the model, in DDP and compiled as configured (step_forward)
    step: object = None  # the step itself, eager or graphed (replica.steps.StepRunner)
    ring: object = None  # the loader workers' batch slots (replica.data.ring.BatchRing), made at the first epoch
    copy: object = None  # CUDA: the stream batches travel on (replica.data.ring.CopyStream)
    progress: Progress = field(default_factory=Progress)
    tally: Tally = field(default_factory=Tally)

    @property
    def main(self) -> bool:
        return self.ranks.main

    @property
    def last(self) -> Path:
        return self.folder / "last.pt"


class LossWatch:
    """The losses as they stay on the device: read every few steps (one wait for the device a
    read), added to the epoch's sums and to the log, a NaN decided by every process together, a
    stalled start warned about once."""

    def __init__(self, ranks: Ranks, every: int, stall_steps: int | None, num_classes: int):
        self.ranks, self.every, self.stall_steps, self.num_classes = ranks, every, stall_steps, num_classes
        self.pending: list[torch.Tensor] = []  # this process's losses not read yet (on the device)
        self.last: float | None = None  # the last loss read
        self.recent: list[float] = []
        self.stall_warned = False

    def add(self, loss: torch.Tensor) -> bool:
        """Keep a step's loss; True when it is time to read them."""
        self.pending.append(loss)
        return len(self.pending) >= self.every

    def read(self, run: Run, out: RunLog) -> None:
        """Bring the pending losses to the host, add them to the epoch's sums, and stop every
        process if any of them saw a NaN since the last read."""
        vals = torch.stack(self.pending).tolist() if self.pending else []
        self.pending = []
        p = run.progress
        bad = next((i for i, v in enumerate(vals) if not math.isfinite(v)), None)
        if self.ranks.agree(nan=bad is not None)["nan"]:
            msg = None
            if bad is not None:
                in_epoch = p.in_epoch - len(vals) + bad + 1  # the step of the epoch (1-based) that saw it
                msg = f"loss is {vals[bad]} at epoch {p.epoch + 1}, step {in_epoch}"
            msg = self.ranks.first_message(msg)
            raise TrainingStopped(f"{msg}: stopped. The last good checkpoint is kept in {run.last}. "
                                  f"Try a lower lr or init=caffe.", quiet=not run.main, agreed=True)
        for v in vals:
            run.tally.add_loss(v)
        if vals:
            self.last = vals[-1]
            self.recent = (self.recent + vals)[-50:]
            out.losses(p.step - len(vals) + 1, vals, run.schedule.lrs(p.step - 1), run.tally.rate(), run.devices[0])
        if self.stall_steps and p.step >= self.stall_steps and not self.stall_warned and run.main and self.recent:
            self.stall_warned = True
            out.say(stall_warning(self.recent, self.num_classes, p.step))


class Every:
    """A clock that is due once ``seconds`` have passed since it was last reset."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.reset()

    def reset(self) -> None:
        self.since = time.time()

    def due(self) -> bool:
        return time.time() - self.since > self.seconds


# ----------------------------------------------------------------------------------------------
# One step


def train_step(net, optimizer, images: torch.Tensor, labels: torch.Tensor, lrs: dict, *, devices,
               bf16: bool) -> torch.Tensor:
    """One update: the forward (under bf16 autocast on ``devices`` if asked), the loss, the
    backward and the optimizer's step at the learning rates ``lrs``. Every input is an argument;
    returns the loss, detached and still on the device (reading it would wait for the device)."""
    apply_lrs(optimizer, lrs)
    with autocast(devices, bf16):
        logits = net(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def model_input(run: Run, crops, shift, labels, noise: bool):
    """(images, labels) on device 0: the crops mean-subtracted, with the colour noise when on;
    (B, 3, 224, 224) float32 and (B,)."""
    dev = run.devices[0]
    x = augment.finish(to_device(crops, dev), run.mean_crop, to_device(shift if noise else None, dev),
                       run.cfg.pca_kind)
    return x, to_device(labels, dev)


def next_batch(it, run: Run, out: RunLog):
    """(batch or None, this process's reason to stop the run or None). Bad inputs are counted,
    logged, and with ``strict_data`` a reason to stop."""
    cfg, p = run.cfg, run.progress
    try:
        batch = next(it)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        return None, (f"a data-loader worker died at epoch {p.epoch + 1}, batch {p.in_epoch + 1} "
                      f"({str(e).strip().splitlines()[0][:160]}). Out of memory is the usual cause: lower "
                      f"workers={run.workers} or batch_size={cfg.batch_size}")
    crops, shift, labels, b, bad = batch
    crops, shift, labels, more = decode_if_encoded(crops, shift, labels, run.devices[0])
    bad = list(bad) + more  # entries the decoder refused are bad inputs like any other
    batch = (crops, shift, labels, b, bad)
    if bad:
        run.tally.skipped += len(bad)
        out.bad_inputs(p.epoch, b, bad)
        if cfg.strict_data:
            what, why, _ = bad[0]
            return batch, f"bad input {what}: {why} (strict_data=true; set strict_data=false to skip and count such inputs)"
    if len(labels) == 0 and run.ranks.world > 1:  # the others would wait in all-reduce for this one
        return batch, f"every input of batch {p.in_epoch + 1} was bad; see {run.folder / 'bad_inputs.tsv'}"
    return batch, None


# ----------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(run: Run, watch: LossWatch, out: RunLog, stop, clock: Every) -> bool:
    """The epoch's remaining steps; False if a stop was decided (saved already)."""
    cfg, ranks, p = run.cfg, run.ranks, run.progress
    decode = cfg.decode if cfg.decode != "auto" else "workers"  # auto: measured faster (docs/performance.md)
    ds = TrainBatches(run.images, cfg.batch_size // ranks.world, run.mean, run.pca, seed=cfg.seed, epoch=p.epoch,
                      start=p.in_epoch, pca_mode=cfg.pca_kind, noise=cfg.pca_noise, chunk=cfg.flip_chunk,
                      rank=ranks.rank, world=ranks.world, crop=cfg.crop, decode=decode,
                      crop_on=cfg.crop_on if cfg.crop_on != "auto" else "workers")  # auto: until a GPU compares them
    todo = min(run.steps_per_epoch - p.in_epoch, run.schedule.total_steps - p.step)
    run.model.train()
    it = open_feed(run, ds, out)
    worker_deaths_at_next_batch()  # a dead worker is seen in next_batch, where the processes can agree
    try:
        for _ in range(todo):
            batch, problem = next_batch(it, run, out)
            # The one place where the processes decide together, once a step, before anything that
            # waits on the others (DDP's all-reduce in the step, a save's gather): a process that
            # stopped, failed or saved alone would leave the others waiting for it for ever.
            d = ranks.agree(stop=stop.requested is not None, error=problem is not None,
                            save=run.main and clock.due())
            if d["error"]:
                stop_with_save(run, watch, out, ranks.first_message(problem))
            if d["stop"]:
                save_last(run, watch, out)
                return False
            if d["save"]:
                save_last(run, watch, out)
                clock.reset()
            crops, shift, labels, _, _ = batch
            lrs = run.schedule.lrs(p.step)
            loss = None
            if len(labels):  # (one process alone may have none: every input of its batch was bad)
                x, y = model_input(run, crops, shift, labels, noise=run.schedule.noise_on(p.step))
                loss = run.step(x, y, lrs)  # train_step, or its captured graph replayed
                run.tally.seen += len(y) * ranks.world
            p.step, p.in_epoch = p.step + 1, p.in_epoch + 1
            if loss is not None and watch.add(loss):
                watch.read(run, out)
            out.stepped(watch.last if loss is not None else None,
                        max(v for k, v in lrs.items() if k.endswith("weight")), run.tally.rate())
    finally:
        it.close()
    return True


def open_feed(run: Run, ds: TrainBatches, out: RunLog) -> Feed:
    """The epoch's batches (replica.data.loaders.Feed): with loader workers through the run's
    ring of shared slots (made once, page-locked on a GPU), to a GPU on the run's copy stream."""
    dev = run.devices[0]
    cpu = dev.type == "cpu"
    if run.workers and ds.decode != "device":
        need, slots = slot_bytes(ds), ring_size(run.workers, PREFETCH)
        if run.ring is None or run.ring.nbytes < need or run.ring.slots < slots:
            why = room_for(slots * need)
            if why is None:
                if run.ring is not None and not cpu:
                    run.ring.unregister()
                run.ring = BatchRing(slots, need)
                pinned = not cpu and run.ring.register()
                out.info("batch ring: %d slots of %.1f MB in shared memory%s", slots, need / 1e6,
                         ", page-locked" if pinned else "" if cpu else f", not page-locked: {run.ring.why}")
            elif run.ring is None:
                out.say(f"batches travel one shared-memory file each: {why}")
                run.ring = False  # said once
    if not cpu and run.copy is None:
        run.copy = CopyStream(dev)
    return Feed(ds, run.workers, dev, ring=run.ring or None, copy=run.copy, background=cpu)


def end_of_epoch(run: Run, watch: LossWatch, out: RunLog, clock: Every) -> None:
    """Validate (process 0), schedule, checkpoint (best, then last), the epoch's record."""
    cfg, ranks, p, t = run.cfg, run.ranks, run.progress, run.tally
    watch.read(run, out)
    step = p.step
    record = dict(epoch=p.epoch + 1, step=step, train_loss=t.mean_loss(),
                  lr={k: v for k, v in run.schedule.lrs(step - 1).items()}, noise=run.schedule.noise_on(step - 1),
                  seconds=t.elapsed(), images_per_s=t.rate(), skipped_files=t.skipped,
                  colour_specificity=tower_medians(run.model))  # Fig. 3's split, epoch by epoch
    err = None
    if run.val_images is not None and run.main:
        r = evaluate(run.model, run.val_images, run.mean, views=1, batch=min(cfg.batch_size, 128),
                     max_batches=cfg.val_batches, crop=cfg.crop, bf16=cfg.bf16, workers=min(run.workers, 2))
        record.update(val_top1_err=r["top1_err"], val_top5_err=r["top5_err"], val_images=r["images"])
        err = r["top1_err"]
    err = ranks.broadcast(err)
    if err is not None and run.schedule.on_validation(err):
        out.say(f"validation error stopped improving: learning rate ÷10 (drop {run.schedule.plateau_drops})")
    p.epoch, p.in_epoch = p.epoch + 1, 0
    improved = err is not None and err < p.best
    if improved:
        p.best = err
    p.records.append(record)
    # best, then last, then the metrics line: a kill between any two is repaired on resume
    # (the epoch is redone from the older last.pt, or metrics.jsonl is rewritten from it)
    if improved and cfg.save_best:
        checkpoint(run, run.folder / "best.pt")
    checkpoint(run, run.last)
    clock.reset()
    out.epoch(record, p.records, run.model)


# ----------------------------------------------------------------------------------------------
# Saving


def checkpoint(run: Run, path: Path) -> None:
    """Every process's RNG state, and process 0 writes (a collective: every process calls it)."""
    states = run.ranks.gather(rng_state())
    if not run.main:
        return
    cfg, model, p = run.cfg, run.model, run.progress
    ckpt = Checkpoint(net=cfg.net, classes=run.classes, names=list(run.names) if run.names else None,
                      dataset=getattr(run.images, "dataset", None), crop=cfg.crop, config=cfg.to_dict(),
                      model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                      momentum=run.optimizer.state_for_checkpoint(model.named_parameters()),  # v = −ε·b (PaperSGD)
                      schedule=run.schedule.state_dict(),
                      progress=dataclasses.replace(p, done=run.schedule.finished(p.step) and p.in_epoch == 0,
                                                   partial=run.tally.partial()),
                      rng=states, mean=torch.as_tensor(run.mean, dtype=torch.float32),
                      pca=dict(run.pca) if run.pca else {})
    try:
        save_checkpoint(path, ckpt)
    except ReplicaError as e:  # disk full, read-only, quota: the previous file is untouched
        kept = "; the previous checkpoint is intact" if path.exists() else ""
        raise ReplicaError(f"{e}{kept}. Free space or fix permissions, then resume with: "
                           f"replica train --resume {run.folder}") from None


def save_last(run: Run, watch: LossWatch, out: RunLog) -> None:
    """last.pt, after every process has checked its losses since the last read."""
    watch.read(run, out)
    checkpoint(run, run.last)


def stop_with_save(run: Run, watch: LossWatch, out: RunLog, message: str):
    """Save what the steps so far have done, then stop every process with ``message``."""
    save_last(run, watch, out)
    run.ranks.barrier()  # no process leaves before process 0's file is complete
    p = run.progress
    raise ReplicaError(f"{message}. Progress is saved in {run.last} (epoch {p.epoch + 1}, step {p.in_epoch} of "
                       f"{run.steps_per_epoch}); resume with: replica train --resume {run.folder}",
                       quiet=not run.main, agreed=True)


# ----------------------------------------------------------------------------------------------
# Setting up: the folder, the data and the net, a resume


def describe_departures(cfg: Config) -> str:
    """One line: every way this run departs from run 145's recipe (an ablation shows here)."""
    d = departures(cfg)
    if not d:
        return "run 145's recipe (preset as-run), unchanged"
    return "departs from run 145's recipe (preset as-run) in: " + ", ".join(f"{k}={show(v)}" for k, v in d.items())


def build_model(cfg: Config, num_classes: int, devices) -> AlexNet:
    return AlexNet.from_options(cfg.net, num_classes, devices, channels_last=cfg.channels_last, grouped=cfg.grouped,
                                conv1_channels=cfg.conv1_channels)


@contextmanager
def run_folder(folder: Path, main: bool):
    """One trainer per run folder: process 0 holds its lock until the run ends, and a start that
    fails leaves no empty folder behind."""
    created = not folder.exists()
    if not main:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)  # and locked before anything is written into it
    with locked(folder, TRAIN_LOCK, lambda holder: f"{folder} is being trained by another process ({holder}); wait "
                f"for it to end (or stop it), then continue with: replica train --resume {folder}"):
        try:
            yield
        except BaseException:
            if created and {q.name for q in folder.iterdir()} <= {TRAIN_LOCK}:
                (folder / TRAIN_LOCK).unlink(missing_ok=True)
                folder.rmdir()
            raise


def setup(cfg: Config, folder: Path, ranks: Ranks, devices: tuple) -> Run:
    """The data, its statistics, the net, the optimizer and the schedule of a run (not started)."""
    images, val_images = open_training(cfg.data, cfg.val_data)
    classes = images.classes
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise ReplicaError(f"num_classes={cfg.num_classes}, but {cfg.data} has {len(classes)} classes")
    check_stats_feasible(images, folder)
    ranks.barrier()  # the run folder exists for every process
    store = isinstance(images, PreparedStore)
    mean, pca = data_stats(images, folder) if ranks.main or store else (None, None)
    if not store:
        mean, pca = ranks.broadcast((mean, pca))
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    # explicit, never cuDNN's defaults: float32 there is TF32 unless told, and fixed shapes
    # make cudnn.benchmark's one-time search pay (docs/training.md)
    numerics = set_cuda_numerics(cfg.tf32, cfg.deterministic, benchmark=True)
    model = build_model(cfg, len(classes), devices)
    n = len(TrainBatches(images, cfg.batch_size // ranks.world, mean, None, world=ranks.world, rank=ranks.rank,
                         crop=cfg.crop))
    steps = min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n
    schedule = Schedule(cfg, steps)
    optimizer = PaperSGD(param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr, layers=schedule.layers),
                         momentum=cfg.momentum, lr_tensors=graph_for(cfg, devices, ranks))
    run = Run(cfg, folder, ranks, devices, images, val_images, list(classes), getattr(images, "names", None), mean,
              pca, augment.centre_crop_of(torch.as_tensor(mean), cfg.crop).to(devices[0]), model, optimizer,
              schedule, steps, numerics,
              cfg.workers if cfg.workers is not None else default_workers(devices[0]))
    torch.manual_seed(cfg.seed * 1000 + ranks.rank + 1)  # dropout masks: one stream per process
    return run


INIT_LAYERS = {  # init_layers → whether a state_dict key is taken from the source
    "conv": lambda k: ".conv" in f".{k}",
    "all-but-classifier": lambda k: not k.startswith("fc8."),
    "all": lambda k: True,
}


def init_from(run: Run, out: RunLog) -> None:
    """A new run's weights from another run's (``init_from``: a run folder, a checkpoint, or
    ``replica import``'s): the layers ``init_layers`` names, each where the name and shape match,
    a mismatch refused in one line naming the layer; the rest keep their fresh draw (a new fc8
    for another class count). The source (file, sha1, the layers taken) goes to init_from.json."""
    cfg = run.cfg
    from .inference import file_sha1
    from .runs import run_checkpoint

    path = run_checkpoint(Path(cfg.init_from))
    ck = load_checkpoint(path)
    take = INIT_LAYERS[cfg.init_layers]
    mine = run.model.state_dict()
    copied = []
    for k, v in mine.items():
        if not take(k):
            continue
        if k not in ck.model:
            raise ReplicaError(f"init_from={cfg.init_from}: it has no {k} (init_layers={cfg.init_layers})")
        if tuple(ck.model[k].shape) != tuple(v.shape):
            hint = " (another class count: init_layers=all-but-classifier draws a new fc8)" if k.startswith("fc8") else ""
            raise ReplicaError(f"init_from={cfg.init_from}: {k} is {tuple(ck.model[k].shape)} there, {tuple(v.shape)} "
                               f"in this net{hint}")
        with torch.no_grad():
            v.copy_(ck.model[k])
        copied.append(k)
    if run.main:
        sha1 = file_sha1(path)
        record = dict(init_from=str(cfg.init_from), checkpoint=str(path), sha1=sha1, init_layers=cfg.init_layers,
                      layers=sorted({k.rsplit(".", 1)[0] for k in copied}))
        atomic_write(run.folder / "init_from.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
        out.info("weights of %s from %s (sha1 %s): %d tensors", cfg.init_layers, path, sha1[:12], len(copied))


def resume_run(run: Run, out: RunLog) -> bool:
    """Load last.pt into the run; False if the run finished already."""
    ck = load_checkpoint(run.last)
    check_compatible(ck, run.cfg.net, run.classes, run.last)
    try:
        AlexNet.check_state(run.cfg.net, len(run.classes), ck.model)
    except ReplicaError as e:
        raise ReplicaError(f"{run.last}: {e}") from None
    run.model.load_state_dict(ck.model)
    names = dict(run.model.named_parameters())
    if ck.momentum is not None:  # the optimizer's own buffers: bit for bit
        run.optimizer.load_checkpoint_state(names, ck.momentum)
    else:  # a checkpoint from before the fused optimizer: velocities only
        for name, v in ck.velocity.items():
            run.optimizer.set_velocity(names[name], v.to(names[name].device))
    run.schedule.load_state_dict(ck.schedule)
    p = run.progress = dataclasses.replace(ck.progress, records=list(ck.progress.records))
    if p.in_epoch and p.partial:
        run.tally = Tally.from_partial(p.partial)
    out.restore(p.records)  # metrics.jsonl says what the checkpoint says: no epoch lost, none counted twice
    if p.done:
        out.say(f"{run.folder} finished already ({p.step} steps); nothing to resume")
        return False
    states = ck.rng  # one per process that saved it
    set_rng_state(states[run.ranks.rank] if run.ranks.rank < len(states) else states[0])
    out.info("resumed %s at epoch %d, step %d of the epoch (%d in all); %s", run.folder, p.epoch + 1, p.in_epoch,
             p.step, describe_departures(run.cfg))
    return True


def start(run: Run, out: RunLog) -> None:
    """A new run's config.yaml and version.json, and its header."""
    if not run.main:
        return
    cfg, folder = run.cfg, run.folder
    atomic_write(folder / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
    atomic_write(folder / "version.json", lambda f: f.write(json.dumps(code_version(), indent=1).encode()))
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    out.info("run %s: %s%s, %d classes, %d training images, batch %d, %d steps (%d per epoch), devices %s, %s%s",
             folder, cfg.preset, "" if cfg.width == 1 else f", width {cfg.width:g} (not the paper's net)",
             len(run.classes), len(run.images), cfg.batch_size, run.schedule.total_steps, run.steps_per_epoch,
             " + ".join(map(str, run.devices)), "bf16 autocast" if cfg.bf16 else "float32",
             f" ({describe_numerics(run.numerics)})" if any(d.type == "cuda" for d in run.devices) else "")
    out.info("%s", describe_departures(cfg))
    out.info("loader workers: %d%s", run.workers, "" if cfg.workers is not None else
             f" (workers=auto: {usable_cores()} usable cores, {run.devices[0].type})")


def graph_for(cfg: Config, devices: tuple, ranks: Ranks) -> bool:
    """Whether steps replay a captured CUDA graph: only when asked (``graph=true``), and then on
    one CUDA device, one process, no ``compile`` (or a one-line error saying which is missing)."""
    if not cfg.graph:
        return False
    why = ("it needs a CUDA device" if devices[0].type != "cuda" else
           "both towers must share one GPU" if len(set(devices)) > 1 else
           "not under torchrun (DDP's all-reduce is not captured)" if ranks.distributed else
           "not with compile=true" if cfg.compile else None)
    if why:
        raise ReplicaError(f"graph=true: {why}; graph=false runs the eager step")
    return True


def step_forward(run: Run, out: RunLog):
    """What a training step calls: the model, in DDP within a job, compiled with ``compile``."""
    model, cfg, dev0 = run.model, run.cfg, run.devices[0]
    net = model
    if run.ranks.distributed:
        one_gpu = len(run.devices) == 1 and dev0.type == "cuda"
        # a module spanning two devices takes device_ids=None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev0] if one_gpu else None)
    model.fused_norms = fused_norms_for(cfg, dev0)  # this run's model only; eval afterwards is eager
    if model.fused_norms:
        out.info("fused norms: the first step compiles them (about half a minute the first time, seconds from the "
                 "cache); fused_norms=false runs the eager ones")
    return torch.compile(net) if cfg.compile else net


# ----------------------------------------------------------------------------------------------
# The whole run


def train_epochs(run: Run, watch: LossWatch, out: RunLog) -> dict:
    """Epochs until the schedule ends or a stop (Ctrl-C, SIGTERM) is decided."""
    p, ranks = run.progress, run.ranks
    clock = Every(run.cfg.checkpoint_minutes * 60)
    with StopSignals() as stop:
        stop.escalate = not ranks.distributed  # under torchrun the agent ends workers that do not stop
        while not run.schedule.finished(p.step):
            if p.in_epoch == 0:
                run.tally = Tally()
            with out.epoch_bar(p.epoch, p.in_epoch, run.steps_per_epoch):
                finished = train_one_epoch(run, watch, out, stop, clock)
                # once more before validating: a stop asked for during the last step need not wait for it
                if finished and ranks.agree(stop=stop.requested is not None)["stop"]:
                    save_last(run, watch, out)
                    finished = False
            if not finished:
                out.say(f"stopped by {stop.requested or 'a signal to another process'} at epoch {p.epoch + 1}, "
                        f"step {p.in_epoch} of {run.steps_per_epoch}; saved {run.last}. Resume with: "
                        f"replica train --resume {run.folder}")
                return dict(stopped=stop.requested or "signal", step=p.step)
            if p.in_epoch < run.steps_per_epoch and not run.schedule.finished(p.step):
                continue
            end_of_epoch(run, watch, out, clock)
    ranks.barrier()
    return dict(stopped=None, step=p.step, epochs=p.epoch, best_val_top1_err=p.best)


def train(cfg: Config, out, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``cfg`` into the run folder ``out``; with ``resume``, continue what is there."""
    if cfg.preset == "caffe":
        raise ReplicaError("preset caffe evaluates Caffe's bvlc_alexnet (replica import); Caffe's solver is not "
                           "modelled: train with preset as-run or paper-text"
                           + (f" ({out} holds imported weights)" if resume else ""))
    folder = Path(out)
    ranks, devices = setup_ranks(cfg.devices, cfg.net.towers, cfg.devices_per_process, cfg.batch_size)
    console = RunLog(folder, ranks.rank, progress)
    run = None
    together = False  # whether every process of the job gets to the end of this call at once
    try:
        with run_folder(folder, ranks.main):
            run = setup(cfg, folder, ranks, devices)
            if resume and not run.last.exists():  # stopped before its first checkpoint: nothing to keep
                console.say(f"{folder} has no checkpoint yet: starting from the beginning")
                resume = False
            if resume and not resume_run(run, console):
                together = True
                p = run.progress
                return dict(stopped=None, step=p.step, epochs=p.epoch, best_val_top1_err=p.best)
            if not resume:
                start(run, console)
                if cfg.init_from:
                    init_from(run, console)
            run.forward = step_forward(run, console)
            run.step = StepRunner(run.forward, run.optimizer, devices=devices, bf16=cfg.bf16,
                                  graph=graph_for(cfg, devices, ranks),
                                  eager=lambda *a, **k: train_step(*a, **k))  # (a patched train_step too)
            console.open_views(cfg.tensorboard, cfg.live, run.progress.step or None, dump_config(cfg))
            watch = LossWatch(ranks, LOSS_READ_STEPS.get(devices[0].type, 20), cfg.stall_steps, len(run.classes))
            result = train_epochs(run, watch, console)
            together = True
            return result
    except ReplicaError as e:
        together = e.agreed  # a stop decided together (a NaN, a bad batch, a dead worker); else this
        raise  # process alone, where destroying the group could wait for the others for ever
    finally:
        console.close()
        if run is not None and ranks.distributed:
            # DDP keeps the process group and gloo's pending work alive through reference cycles of
            # its own: freed here, before the group is destroyed, not at the interpreter's exit,
            # where gloo's threads met a finalizing interpreter (a rank aborted: "terminate called
            # without an active exception", once in a full suite)
            run.forward = run.step = None
            import gc

            gc.collect()
        if together:
            ranks.close()
