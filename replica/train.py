"""One plain loop: train_one_epoch → end of epoch (validate, schedule, checkpoint, metrics).

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

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import augment
from .colour import tower_medians
from .config import Config, departures, dump_config, show
from .data.loaders import (TrainBatches, check_stats_feasible, data_stats, decode_if_encoded, loader,
                           open_training, worker_deaths_at_next_batch)
from .data.store import PreparedStore
from .dist import StopSignals, setup_ranks
from .errors import ReplicaError, TrainingStopped
from .evaluate import evaluate, percent
from .fileio import take_lock
from .live import LiveViews, rate_text, stall_warning
from .model import AlexNet
from .optim import PaperSGD, Schedule, apply_lrs, param_groups
from .runs import (TRAIN_LOCK, Checkpoint, Progress, Tally, append_metrics, atomic_write, check_compatible, code_version,
                   load_checkpoint, log_bad_inputs, rng_state, save_checkpoint, set_rng_state, write_metrics)
from .runtime import autocast, describe_numerics, fused_norms_for, set_cuda_numerics, to_device

log = logging.getLogger("replica")

# Losses stay on the device and are read (and checked for NaN) every this many steps, and
# before every save: reading one makes the CPU wait for the GPU. On the CPU there is no wait.
LOSS_READ_STEPS = {"cpu": 1, "cuda": 20}


# ----------------------------------------------------------------------------------------------
# Setup


def describe_departures(cfg: Config) -> str:
    """One line: every way this run departs from run 145's recipe (an ablation shows here)."""
    d = departures(cfg)
    if not d:
        return "run 145's recipe (preset as-run), unchanged"
    return "departs from run 145's recipe (preset as-run) in: " + ", ".join(f"{k}={show(v)}" for k, v in d.items())


def build_model(cfg: Config, num_classes: int, devices) -> AlexNet:
    return AlexNet.from_options(cfg.net, num_classes, devices, channels_last=cfg.channels_last)


# ----------------------------------------------------------------------------------------------
# The loop


class _Run:
    """One training run's state and its three phases: setup, train_one_epoch, end_of_epoch."""

    def __init__(self, cfg: Config, out, progress: bool):
        self.cfg, self.run, self.progress = cfg, Path(out), progress
        self.ranks, self.devices = setup_ranks(cfg.devices, cfg.net.towers, cfg.devices_per_process, cfg.batch_size)
        self.dev0 = self.devices[0]  # tower a's and fc8's device: where the batch goes
        self.main = self.ranks.main
        self.per_rank = cfg.batch_size // self.ranks.world
        self.lock = None
        created = not self.run.exists()
        if self.main:  # one trainer per run folder, before anything is written into it
            self.run.mkdir(parents=True, exist_ok=True)
            self.lock, holder = take_lock(self.run, TRAIN_LOCK)
            if self.lock is None:
                raise ReplicaError(f"{self.run} is being trained by another process ({holder}); wait for it to end "
                                   f"(or stop it), then continue with: replica train --resume {self.run}")
        try:
            self._setup(cfg)
        except BaseException:
            self.unlock()
            if self.main and created and {p.name for p in self.run.iterdir()} <= {TRAIN_LOCK}:
                (self.run / TRAIN_LOCK).unlink(missing_ok=True)  # a failed start leaves no empty run folder
                self.run.rmdir()
            raise

    def unlock(self) -> None:
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def _setup(self, cfg: Config) -> None:
        self.train_images, self.val_images = open_training(cfg.data, cfg.val_data)
        classes = self.train_images.classes
        if cfg.num_classes is not None and cfg.num_classes != len(classes):
            raise ReplicaError(f"num_classes={cfg.num_classes}, but {cfg.data} has {len(classes)} classes")
        self.num_classes = len(classes)
        check_stats_feasible(self.train_images, self.run)
        self.ranks.barrier()  # the run folder exists for every process
        store = isinstance(self.train_images, PreparedStore)
        mean, pca = data_stats(self.train_images, self.run) if self.main or store else (None, None)
        if not store:
            mean, pca = self.ranks.broadcast((mean, pca))
        self.mean, self.pca = mean, pca

        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        # explicit, never cuDNN's defaults: float32 there is TF32 unless told, and fixed shapes
        # make cudnn.benchmark's one-time search pay (docs/training.md)
        self.numerics = set_cuda_numerics(cfg.tf32, cfg.deterministic, benchmark=True)
        self.model = build_model(cfg, self.num_classes, self.devices)
        self.classes, self.names = list(classes), getattr(self.train_images, "names", None)
        self.opt = PaperSGD(param_groups(self.model, cfg.lr, cfg.weight_decay, cfg.bias_lr), momentum=cfg.momentum)
        r, w = self.ranks.rank, self.ranks.world
        n = len(TrainBatches(self.train_images, self.per_rank, mean, None, world=w, rank=r, crop=cfg.crop))
        self.steps_per_epoch = min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n
        self.sched = Schedule(cfg, self.steps_per_epoch)
        # the mean crop, once on the device (finish() would otherwise copy it every step)
        self.mean_crop = augment.centre_crop_of(torch.as_tensor(mean), cfg.crop).to(self.dev0)
        self.epoch, self.in_epoch, self.step, self.best = 0, 0, 0, math.inf
        self.records: list[dict] = []  # metrics.jsonl's lines, also kept in each checkpoint
        self.tally = Tally()  # this epoch's running sums (a resumed epoch's go on from the checkpoint's)
        self.live = None  # TensorBoard and the pictures (process 0)
        self.pending: list[torch.Tensor] = []  # this process's losses not read yet (on the device)
        self.last_loss = None
        self.recent: list[float] = []
        self.stall_warned = False
        self.bad_warned = 0  # the first 10 bad inputs are named on the console; all go to bad_inputs.tsv
        self.read_every = LOSS_READ_STEPS.get(self.dev0.type, 20)
        # a JPEG store's batches: decoded by the workers (CPU; auto: measured faster on an H200 with 8
        # workers on 16 cores, docs/performance.md), or as a batch where the model is (nvJPEG)
        self.decode = cfg.decode if cfg.decode != "auto" else "workers"
        torch.manual_seed(cfg.seed * 1000 + r + 1)  # dropout masks: one stream per process

    # -- resume / start ------------------------------------------------------------------------

    def resume(self) -> bool:
        """Load last.pt; False if the run finished already."""
        ck = load_checkpoint(self.run / "last.pt")
        check_compatible(ck, self.cfg.net, self.classes, self.run / "last.pt")
        try:
            AlexNet.check_state(self.cfg.net, self.num_classes, ck.model)
        except ReplicaError as e:
            raise ReplicaError(f"{self.run / 'last.pt'}: {e}") from None
        self.model.load_state_dict(ck.model)
        names = dict(self.model.named_parameters())
        if ck.momentum is not None:  # the optimizer's own buffers: bit for bit
            self.opt.load_checkpoint_state(names, ck.momentum)
        else:  # a checkpoint from before the fused optimizer: velocities only
            for name, v in ck.velocity.items():
                self.opt.set_velocity(names[name], v.to(names[name].device))
        self.sched.load_state_dict(ck.schedule)
        prog = ck.progress
        self.epoch, self.in_epoch, self.step, self.best = prog.epoch, prog.in_epoch, prog.step, prog.best
        self.records = list(prog.records)
        if self.in_epoch and prog.partial:
            self.tally = Tally.from_partial(prog.partial)
        if self.main:  # metrics.jsonl says what the checkpoint says: no epoch lost, none counted twice
            write_metrics(self.run, self.records)
        if prog.done:
            if self.main:
                print(f"{self.run} finished already ({self.step} steps); nothing to resume")
            return False
        states = ck.rng  # one per process that saved it
        set_rng_state(states[self.ranks.rank] if self.ranks.rank < len(states) else states[0])
        if self.main:
            log.info("resumed %s at epoch %d, step %d of the epoch (%d in all); %s", self.run, self.epoch + 1,
                     self.in_epoch, self.step, describe_departures(self.cfg))
        return True

    def start(self) -> None:
        if not self.main:
            return
        cfg, run = self.cfg, self.run
        atomic_write(run / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        atomic_write(run / "version.json", lambda f: f.write(json.dumps(code_version(), indent=1).encode()))
        (run / "metrics.jsonl").unlink(missing_ok=True)
        log.info("run %s: %s%s, %d classes, %d training images, batch %d, %d steps (%d per epoch), devices %s, %s%s",
                 run, cfg.preset, "" if cfg.width == 1 else f", width {cfg.width:g} (not the paper's net)",
                 self.num_classes, len(self.train_images), cfg.batch_size, self.sched.total_steps,
                 self.steps_per_epoch, " + ".join(map(str, self.devices)), "bf16 autocast" if cfg.bf16 else "float32",
                 f" ({describe_numerics(self.numerics)})" if any(d.type == "cuda" for d in self.devices) else "")
        log.info("%s", describe_departures(cfg))

    def prepare_step_function(self) -> None:
        model, cfg = self.model, self.cfg
        net = model
        if self.ranks.distributed:
            one_gpu = len(self.devices) == 1 and self.dev0.type == "cuda"
            # a module spanning two devices takes device_ids=None
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.dev0] if one_gpu else None)
        self.fwd = torch.compile(net) if cfg.compile else net
        model.fused_norms = fused_norms_for(cfg, self.dev0)  # this run's model only; eval afterwards is eager
        if self.main and model.fused_norms:
            log.info("fused norms: the first step compiles them (about half a minute the first time, "
                     "seconds from the cache); fused_norms=false runs the eager ones")

    # -- saving ----------------------------------------------------------------------------------

    def checkpoint(self, path: Path) -> None:
        """Every process's RNG state, and rank 0 writes (a collective: every process calls it)."""
        states = self.ranks.gather(rng_state())
        if not self.main:
            return
        cfg, model, train = self.cfg, self.model, self.train_images
        ckpt = Checkpoint(net=cfg.net, classes=self.classes, names=list(self.names) if self.names else None,
                          dataset=getattr(train, "dataset", None), crop=cfg.crop, config=cfg.to_dict(),
                          model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                          momentum=self.opt.state_for_checkpoint(model.named_parameters()),  # v = −ε·b (PaperSGD)
                          schedule=self.sched.state_dict(),
                          progress=Progress(epoch=self.epoch, in_epoch=self.in_epoch, step=self.step, best=self.best,
                                            done=self.sched.finished(self.step) and self.in_epoch == 0,
                                            records=self.records, partial=self.tally.partial()),
                          rng=states, mean=torch.as_tensor(self.mean, dtype=torch.float32),
                          pca=dict(self.pca) if self.pca else {})
        try:
            save_checkpoint(path, ckpt)
        except ReplicaError as e:  # disk full, read-only, quota: the previous file is untouched
            kept = "; the previous checkpoint is intact" if path.exists() else ""
            raise ReplicaError(f"{e}{kept}. Free space or fix permissions, then resume with: "
                               f"replica train --resume {self.run}") from None

    def save_last(self) -> None:
        """last.pt, after every process has checked its losses since the last read."""
        self.read_losses()
        self.checkpoint(self.run / "last.pt")

    def stop_with_save(self, message: str):
        """Save what the steps so far have done, then stop every process with ``message``."""
        self.save_last()
        self.ranks.barrier()  # no process leaves before rank 0's file is complete
        raise ReplicaError(f"{message}. Progress is saved in {self.run / 'last.pt'} (epoch {self.epoch + 1}, step "
                           f"{self.in_epoch} of {self.steps_per_epoch}); resume with: replica train --resume "
                           f"{self.run}", quiet=not self.main, agreed=True)

    # -- losses ----------------------------------------------------------------------------------

    def read_losses(self) -> None:
        """Bring this process's pending losses to the host (one wait for the device), add them to the
        epoch's sums, and stop every process if any of them saw a NaN since the last read."""
        vals = torch.stack(self.pending).tolist() if self.pending else []
        self.pending = []
        bad = next((i for i, v in enumerate(vals) if not math.isfinite(v)), None)
        if self.ranks.agree(nan=bad is not None)["nan"]:
            msg = None
            if bad is not None:
                in_epoch = self.in_epoch - len(vals) + bad + 1  # the step of the epoch (1-based) that saw it
                msg = f"loss is {vals[bad]} at epoch {self.epoch + 1}, step {in_epoch}"
            msg = self.ranks.first_message(msg)
            raise TrainingStopped(f"{msg}: stopped. The last good checkpoint is kept in {self.run / 'last.pt'}. "
                                  f"Try a lower lr or init=caffe.", quiet=not self.main, agreed=True)
        for v in vals:
            self.tally.add_loss(v)
        if vals:
            self.last_loss = vals[-1]
            self.recent = (self.recent + vals)[-50:]
            if self.live:
                self.live.losses(self.step - len(vals) + 1, vals, self.sched.lrs(self.step - 1), self.tally.rate(),
                                 self.dev0)
        self._check_stall()

    def _check_stall(self) -> None:
        cfg = self.cfg
        if cfg.stall_steps and self.step >= cfg.stall_steps and not self.stall_warned and self.main and self.recent:
            self.stall_warned = True
            stall_warning(self.recent, self.num_classes, self.step)

    # -- one epoch -------------------------------------------------------------------------------

    def _next_batch(self, it):
        """(batch or None, this process's reason to stop the run or None)."""
        cfg = self.cfg
        try:
            batch = next(it)
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            return None, (f"a data-loader worker died at epoch {self.epoch + 1}, batch {self.in_epoch + 1} "
                          f"({str(e).strip().splitlines()[0][:160]}). Out of memory is the usual cause: lower "
                          f"workers={cfg.workers} or batch_size={cfg.batch_size}")
        crops, shift, labels, b, bad = batch
        crops, shift, labels, more = decode_if_encoded(crops, shift, labels, self.dev0)
        bad = list(bad) + more  # entries the decoder refused are bad inputs like any other
        batch = (crops, shift, labels, b, bad)
        if bad:
            self.tally.skipped += len(bad)
            if self.main:
                log_bad_inputs(self.run, self.epoch, b, bad, warn=10 - self.bad_warned)
                self.bad_warned += len(bad)
            else:  # rank 0 writes the file; the others name theirs on the console
                from tqdm import tqdm

                for what, why, _ in bad:
                    tqdm.write(f"warning: process {self.ranks.rank} skipped {what}: {why}")
            if cfg.strict_data:
                what, why, _ = bad[0]
                return batch, (f"bad input {what}: {why} (strict_data=true; set strict_data=false to skip and "
                               f"count such inputs)")
        if len(labels) == 0 and self.ranks.world > 1:  # the others would wait in all-reduce for this one
            return batch, f"every input of batch {self.in_epoch + 1} was bad; see {self.run / 'bad_inputs.tsv'}"
        return batch, None

    def train_one_epoch(self, stop, bar) -> bool:
        """The epoch's remaining steps; False if a stop was decided (saved already)."""
        cfg, sched, ranks = self.cfg, self.sched, self.ranks
        ds = TrainBatches(self.train_images, self.per_rank, self.mean, self.pca, seed=cfg.seed, epoch=self.epoch,
                          start=self.in_epoch, pca_mode=cfg.pca_kind, noise=cfg.pca_noise, chunk=cfg.flip_chunk,
                          rank=ranks.rank, world=ranks.world, crop=cfg.crop, decode=self.decode)
        todo = min(self.steps_per_epoch - self.in_epoch, sched.total_steps - self.step)
        self.model.train()
        cpu = self.dev0.type == "cpu"
        it = iter(loader(ds, cfg.workers, pin_memory=self.dev0.type == "cuda", background=cpu))
        worker_deaths_at_next_batch()  # a dead worker is seen in _next_batch, where the processes can agree
        try:
            for _ in range(todo):
                batch, problem = self._next_batch(it)
                # the one place where the processes decide together, before anything that waits on the others
                d = ranks.agree(stop=stop.requested is not None, error=problem is not None,
                                save=self.main and time.time() - self.last_save > cfg.checkpoint_minutes * 60)
                if d["error"]:
                    self.stop_with_save(ranks.first_message(problem))
                if d["stop"]:
                    self.save_last()
                    return False
                if d["save"]:
                    self.save_last()
                    self.last_save = time.time()
                self._step(ds, batch, bar)
        finally:
            del it
        return True

    def _step(self, ds, batch, bar) -> None:
        crops, shift, labels, _, _ = batch
        sched = self.sched
        lrs = sched.lrs(self.step)
        apply_lrs(self.opt, lrs)
        if len(labels) == 0:  # one process only: every input of this batch was bad, nothing to learn from
            self.step, self.in_epoch = self.step + 1, self.in_epoch + 1
            bar.update(1)
            return
        noise = shift if sched.noise_on(self.step) else None
        x = augment.finish(to_device(crops, self.dev0), self.mean_crop, to_device(noise, self.dev0),
                           self.cfg.pca_kind)  # (B, 3, 224, 224) float32 on dev0
        y = to_device(labels, self.dev0)
        with autocast(self.devices, self.cfg.bf16):
            logits = self.fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step, self.in_epoch = self.step + 1, self.in_epoch + 1
        self.pending.append(loss.detach())
        self.tally.seen += len(y) * self.ranks.world
        if len(self.pending) >= self.read_every:
            self.read_losses()
        bar.update(1)
        if self.last_loss is not None:
            bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{lrs['weight']:.0e}", img_s=rate_text(self.tally.rate()),
                            refresh=False)

    # -- end of an epoch -------------------------------------------------------------------------

    def end_of_epoch(self) -> None:
        """Validate (rank 0), schedule, checkpoint (best, then last), metrics line."""
        from tqdm import tqdm

        cfg, sched, ranks = self.cfg, self.sched, self.ranks
        self.read_losses()
        step = self.step
        t = self.tally
        record = dict(epoch=self.epoch + 1, step=step, train_loss=t.mean_loss(),
                      lr={k: v for k, v in sched.lrs(step - 1).items()}, noise=sched.noise_on(step - 1),
                      seconds=t.elapsed(), images_per_s=t.rate(), skipped_files=t.skipped,
                      colour_specificity=tower_medians(self.model))  # Fig. 3's split, epoch by epoch
        err = None
        if self.val_images is not None and self.main:
            r = evaluate(self.model, self.val_images, self.mean, views=1, batch=min(cfg.batch_size, 128),
                         max_batches=cfg.val_batches, crop=cfg.crop, bf16=cfg.bf16, workers=min(cfg.workers, 2))
            record.update(val_top1_err=r["top1_err"], val_top5_err=r["top5_err"], val_images=r["images"])
            err = r["top1_err"]
        err = ranks.broadcast(err)
        if err is not None and sched.on_validation(err) and self.main:
            tqdm.write(f"validation error stopped improving: learning rate ÷10 (drop {sched.plateau_drops})")
        self.epoch, self.in_epoch = self.epoch + 1, 0
        improved = err is not None and err < self.best
        if improved:
            self.best = err
        self.records.append(record)
        # best, then last, then the metrics line: a kill between any two is repaired on resume
        # (the epoch is redone from the older last.pt, or metrics.jsonl is rewritten from it)
        if improved and cfg.save_best:
            self.checkpoint(self.run / "best.pt")
        self.checkpoint(self.run / "last.pt")
        self.last_save = time.time()
        if self.main:
            append_metrics(self.run, record)
            self.live.epoch(record, self.records, self.model)
            loss_text = f"{record['train_loss']:.4f}" if t.loss_n else "n/a (no usable input)"
            msg = f"epoch {record['epoch']}: loss {loss_text}"
            if err is not None:
                msg += (f", val top-1 {percent(record['val_top1_err'])} top-5 {percent(record['val_top5_err'])} "
                        f"(1 view, {record['val_images']:,} images)")
            tqdm.write(msg + f", {rate_text(record['images_per_s'])} img/s")

    # -- the whole run ---------------------------------------------------------------------------

    def loop(self) -> dict:
        from tqdm import tqdm

        sched, ranks, cfg = self.sched, self.ranks, self.cfg
        self.last_save = time.time()
        if self.main:  # a resumed run's TensorBoard curves go on from its checkpoint's step
            self.live = LiveViews(self.run, cfg.tensorboard, cfg.live, resumed_at=self.step or None)
            if self.step == 0:
                self.live.config(dump_config(cfg))
        with StopSignals() as stop:
            stop.escalate = not ranks.distributed  # under torchrun the agent ends workers that do not stop
            while not sched.finished(self.step):
                if self.in_epoch == 0:
                    self.tally = Tally()
                bar = tqdm(total=self.steps_per_epoch, initial=self.in_epoch, desc=f"epoch {self.epoch + 1}",
                           unit="step", disable=not (self.progress and self.main), dynamic_ncols=True, leave=False)
                try:
                    finished = self.train_one_epoch(stop, bar)
                    # once more before validating: a stop asked for during the last step need not wait for it
                    if finished and ranks.agree(stop=stop.requested is not None)["stop"]:
                        self.save_last()
                        finished = False
                finally:
                    bar.close()
                if not finished:
                    if self.main:
                        print(f"stopped by {stop.requested or 'a signal to another process'} at epoch "
                              f"{self.epoch + 1}, step {self.in_epoch} of {self.steps_per_epoch}; saved "
                              f"{self.run / 'last.pt'}. Resume with: replica train --resume {self.run}")
                    return dict(stopped=stop.requested or "signal", step=self.step)
                if self.in_epoch < self.steps_per_epoch and not sched.finished(self.step):
                    continue
                self.end_of_epoch()
        ranks.barrier()
        return dict(stopped=None, step=self.step, epochs=self.epoch, best_val_top1_err=self.best)


def train(cfg: Config, out, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``cfg`` into the run folder ``out``; with ``resume``, continue what is there."""
    if cfg.preset == "caffe":
        raise ReplicaError("preset caffe evaluates Caffe's bvlc_alexnet (replica import); Caffe's solver is not "
                           "modelled: train with preset as-run or paper-text"
                           + (f" ({out} holds imported weights)" if resume else ""))
    r = _Run(cfg, out, progress)
    together = False  # whether every process of the job gets to the end of this call at once
    try:
        if resume and not (r.run / "last.pt").exists():  # stopped before its first checkpoint: nothing to keep
            if r.main:
                print(f"{r.run} has no checkpoint yet: starting from the beginning")
            resume = False
        if resume and not r.resume():
            together = True
            return dict(stopped=None, step=r.step, epochs=r.epoch, best_val_top1_err=r.best)
        if not resume:
            r.start()
        r.prepare_step_function()
        result = r.loop()
        together = True
        return result
    except ReplicaError as e:
        together = e.agreed  # a stop decided together (a NaN, a bad batch, a dead worker); else this
        raise  # process alone, where destroying the group could wait for the others for ever
    finally:
        if r.live:
            r.live.close()
        if together:
            r.ranks.close()
        r.unlock()
