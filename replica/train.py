"""One plain loop: train_one_epoch → evaluate → schedule → checkpoint. Resumable exactly.

Everything random is either derived from (seed, epoch, batch) — data order, crops, flips,
colour noise — or kept in the checkpoint — the dropout RNG — so a run stopped anywhere and
resumed ends with the same parameters as one that never stopped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, dump_config
from .data import TrainBatches, compute_stats, loader, open_heldout, open_images
from .errors import ReplicaError
from .evaluate import evaluate
from .model import AlexNet, resolve_devices
from .optim import PaperSGD, Schedule, apply_lrs, param_groups
from .runs import (CKPT_FORMAT, CKPT_VERSION, append_metrics, atomic_write, check_compatible, code_version,
                   load_checkpoint, log_bad_inputs, save_checkpoint, write_metrics)
from .store import PreparedStore

log = logging.getLogger("replica")


class TrainingStopped(ReplicaError):
    """The run stopped on purpose (NaN loss); the message says why and what was kept."""


# ----------------------------------------------------------------------------------------------
# Setup


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def process_devices(cfg: Config, local_rank: int, world: int):
    if world == 1:
        return cfg.devices if "," not in cfg.devices else tuple(cfg.devices.split(","))
    if cfg.devices == "cpu" or not torch.cuda.is_available():
        return "cpu"
    k = cfg.devices_per_process
    first = local_rank * k
    if first + k > torch.cuda.device_count():
        raise ReplicaError(f"process {local_rank} needs cuda:{first}…cuda:{first + k - 1}, but only "
                           f"{torch.cuda.device_count()} GPUs are visible (devices_per_process={k})")
    return tuple(f"cuda:{first + i}" for i in range(k)) if k == 2 else f"cuda:{first}"


def open_data(cfg: Config):
    """(train images, val images or None, class names)."""
    if cfg.data is None:
        raise ReplicaError("data: required; give a prepared store or an image folder (data=PATH)")
    train = open_images(cfg.data, "train")
    if cfg.val_data:
        return train, open_heldout(cfg.val_data), train.classes
    try:
        val = open_images(cfg.data, "val")
    except ReplicaError:  # no validation split: train-loss-only metrics
        val = None
    return train, val, train.classes


def data_stats(train, run: Path):
    """Mean image and PCA: the store's own, or computed once for files and kept in the run."""
    if isinstance(train, PreparedStore):
        return train.mean(), train.pca()
    cache = run / "stats.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        return z["mean"], json.loads(str(z["pca"]))
    mean, pca = compute_stats(train, progress=True)
    atomic_write(cache, lambda f: np.savez(f, mean=mean, pca=np.array(json.dumps(pca))))
    return mean, pca


def fused_norms_for(cfg: Config, device: torch.device) -> bool:
    """``fused_norms``: true / false as set; null (the default) turns them on for float32 on the
    CPU, where they are measured faster (docs/performance.md); off under bf16 there (no faster
    than the eager path, so not worth a compile) and on CUDA until measured there
    (``tools/gpu_check.sh`` prints both). ``REPLICA_FUSED_NORMS=0`` turns the default off."""
    if cfg.fused_norms is not None:
        return cfg.fused_norms
    return device.type == "cpu" and not cfg.bf16 and os.environ.get("REPLICA_FUSED_NORMS", "1") != "0"


def build_model(cfg: Config, num_classes: int, devices) -> AlexNet:
    return AlexNet(num_classes, devices=devices, preset=cfg.preset, variant=cfg.variant, norm=cfg.norm,
                   overlap=cfg.overlap, dropout=cfg.dropout, init=cfg.init, channels_last=cfg.channels_last)


def model_meta(cfg: Config, num_classes: int, classes) -> dict:
    return dict(num_classes=num_classes, variant=cfg.variant, preset=cfg.preset, norm=cfg.norm,
                overlap=cfg.overlap, dropout=cfg.dropout, init=cfg.init, crop=cfg.crop, classes=list(classes))


def rng_state() -> dict:
    st = dict(torch=torch.get_rng_state(), python=repr(random.getstate()),
              numpy=json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]))
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    import ast

    torch.set_rng_state(st["torch"])
    random.setstate(ast.literal_eval(st["python"]))
    n = json.loads(st["numpy"])
    np.random.set_state((n[0], np.asarray(n[1], np.uint32), *n[2:]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------------
# The loop


class _Stop:
    """Ctrl-C / SIGTERM: finish the step, save, exit cleanly."""

    def __init__(self):
        self.requested = None
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
        if self.requested is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: Config, out, resume: bool = False, progress: bool = True) -> dict:
    """Train per ``cfg`` into the run folder ``out``; with ``resume``, continue what is there."""
    from tqdm import tqdm

    run = Path(out)
    rank, world, local_rank = dist_info()
    main = rank == 0
    if cfg.batch_size % world:
        raise ReplicaError(f"batch_size {cfg.batch_size} does not split across {world} processes: give a "
                           f"multiple of {world}")
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.devices != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    per_rank = cfg.batch_size // world
    if main:
        run.mkdir(parents=True, exist_ok=True)

    train_images, val_images, classes = open_data(cfg)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise ReplicaError(f"num_classes={cfg.num_classes}, but {cfg.data} has {len(classes)} classes")
    num_classes = len(classes)
    if world > 1:
        torch.distributed.barrier()
    mean, pca = data_stats(train_images, run) if main or isinstance(train_images, PreparedStore) else (None, None)
    if world > 1 and not isinstance(train_images, PreparedStore):
        box = [mean, pca]
        torch.distributed.broadcast_object_list(box, src=0)
        mean, pca = box

    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    devices = resolve_devices(process_devices(cfg, local_rank, world))
    model = build_model(cfg, num_classes, devices)
    meta = model_meta(cfg, num_classes, classes)
    opt = PaperSGD(param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr), momentum=cfg.momentum)
    steps_per_epoch = len(TrainBatches(train_images, per_rank, mean, None, world=world, rank=rank, crop=cfg.crop))
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    sched = Schedule(cfg, steps_per_epoch)
    epoch, in_epoch, step, best = 0, 0, 0, math.inf
    records: list[dict] = []  # metrics.jsonl's lines, also kept in each checkpoint
    partial = None  # the running sums of an epoch stopped part-way, so its record counts every step
    t_epoch, seen, loss_sum, loss_n, skipped = time.time(), 0, 0.0, 0, 0
    torch.manual_seed(cfg.seed * 1000 + rank + 1)  # dropout masks: one stream per process

    if resume and not (run / "last.pt").exists():  # stopped before its first checkpoint: nothing to keep
        if main:
            print(f"{run} has no checkpoint yet: starting from the beginning")
        resume = False
    if resume:
        ckpt = load_checkpoint(run / "last.pt")
        check_compatible(ckpt["meta"], meta, run / "last.pt")
        model.load_state_dict(ckpt["model"])
        names = dict(model.named_parameters())
        if "momentum" in ckpt:  # the optimizer's own buffers: bit for bit
            opt.load_checkpoint_state(names, ckpt["momentum"])
        else:  # a checkpoint from before the fused optimizer: velocities only
            for name, v in ckpt["velocity"].items():
                opt.set_velocity(names[name], v.to(names[name].device))
        sched.load_state_dict(ckpt["schedule"])
        epoch, in_epoch, step, best = (ckpt["progress"][k] for k in ("epoch", "in_epoch", "step", "best"))
        records = list(ckpt["progress"].get("records", []))
        partial = ckpt["progress"].get("partial") if in_epoch else None
        if main:  # metrics.jsonl says what the checkpoint says: no epoch lost, none counted twice
            write_metrics(run, records)
        if ckpt["progress"].get("done"):
            if main:
                print(f"{run} finished already ({step} steps); nothing to resume")
            return dict(stopped=None, step=step, epochs=epoch, best_val_top1_err=best)
        states = ckpt["rng"]  # one per process that saved it
        set_rng_state(states[rank] if rank < len(states) else states[0])
        if main:
            log.info("resumed %s at epoch %d, step %d of the epoch (%d in all)", run, epoch + 1, in_epoch, step)
    elif main:
        atomic_write(run / "config.yaml", lambda f: f.write(dump_config(cfg).encode()))
        atomic_write(run / "version.json", lambda f: f.write(json.dumps(code_version(), indent=1).encode()))
        (run / "metrics.jsonl").unlink(missing_ok=True)
        log.info("run %s: %s, %d classes, %d training images, batch %d, %d steps (%d per epoch), devices %s",
                 run, cfg.preset, num_classes, len(train_images), cfg.batch_size, sched.total_steps,
                 steps_per_epoch, " + ".join(map(str, devices)))

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None)  # the module may span two devices
    fwd = torch.compile(net) if cfg.compile else net
    dev0 = devices[0]
    model.fused_norms = fused_norms_for(cfg, dev0)  # this run's model only; eval afterwards is eager
    if main and model.fused_norms:
        log.info("fused norms: the first step compiles them (about half a minute the first time, "
                 "seconds from the cache); fused_norms=false runs the eager ones")
    amp = torch.autocast(dev0.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()

    def checkpoint(path: Path):
        states = [rng_state()]
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        if not main:
            return
        ckpt = dict(format=CKPT_FORMAT, version=CKPT_VERSION, meta=meta, config=cfg.to_dict(),
                    model={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    momentum=opt.state_for_checkpoint(model.named_parameters()),  # v = −ε·b (PaperSGD)
                    schedule=sched.state_dict(),
                    progress=dict(epoch=epoch, in_epoch=in_epoch, step=step, best=best,
                                  done=sched.finished(step) and in_epoch == 0, records=records,
                                  partial=dict(loss_sum=loss_sum, loss_n=loss_n, seen=seen, skipped=skipped,
                                               seconds=time.time() - t_epoch)),
                    rng=states, mean=torch.as_tensor(mean, dtype=torch.float32),
                    pca={k: v for k, v in pca.items()} if pca else {})
        try:
            save_checkpoint(path, ckpt)
        except ReplicaError as e:  # disk full, read-only, quota: the previous file is untouched
            kept = "; the previous checkpoint is intact" if path.exists() else ""
            raise ReplicaError(f"{e}{kept}. Free space or fix permissions, then resume with: "
                               f"replica train --resume {run}") from None

    def stop_with_save(message: str):
        """Save what the steps so far have done, then stop with ``message``."""
        checkpoint(run / "last.pt")
        raise ReplicaError(f"{message}. Progress is saved in {run / 'last.pt'} (epoch {epoch + 1}, step "
                           f"{in_epoch} of {steps_per_epoch}); resume with: replica train --resume {run}")

    ln_c = math.log(num_classes)
    recent: list[float] = []
    stall_warned = False
    bad_warned = 0  # the first 10 bad inputs are named on the console; all go to bad_inputs.tsv
    last_save = time.time()
    with _Stop() as stop:
        while not sched.finished(step):
            ds = TrainBatches(train_images, per_rank, mean, pca, seed=cfg.seed, epoch=epoch, start=in_epoch,
                              pca_mode=cfg.pca_kind, noise=cfg.pca_noise, chunk=cfg.flip_chunk, rank=rank,
                              world=world, crop=cfg.crop)
            todo = min(steps_per_epoch - in_epoch, sched.total_steps - step)
            t_epoch, seen, loss_sum, loss_n, skipped = time.time(), 0, 0.0, 0, 0
            if partial:
                loss_sum, loss_n, seen, skipped = (partial[k] for k in ("loss_sum", "loss_n", "seen", "skipped"))
                t_epoch -= partial["seconds"]
                partial = None
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}", unit="step",
                       disable=not (progress and main), dynamic_ncols=True, leave=False)
            it = iter(loader(ds, cfg.workers, pin_memory=dev0.type == "cuda"))
            try:
                for _ in range(todo):
                    try:
                        crops, shift, labels, b, bad = next(it)
                    except RuntimeError as e:
                        if "DataLoader worker" not in str(e):
                            raise
                        stop_with_save(f"a data-loader worker died at epoch {epoch + 1}, batch {in_epoch + 1} "
                                       f"({str(e).strip().splitlines()[0][:160]}). Out of memory is the usual "
                                       f"cause: lower workers={cfg.workers} or batch_size={cfg.batch_size}")
                    if bad:
                        skipped += len(bad)
                        if main:
                            log_bad_inputs(run, epoch, b, bad, warn=10 - bad_warned)
                            bad_warned += len(bad)
                        if cfg.strict_data:
                            what, why, _ = bad[0]
                            stop_with_save(f"bad input {what}: {why} (strict_data=true; set strict_data=false to "
                                           f"skip and count such inputs)")
                    lrs = sched.lrs(step)
                    apply_lrs(opt, lrs)
                    if len(labels) == 0:  # every input of this batch was bad: nothing to learn from
                        if world > 1:  # the other processes wait in all-reduce for this one's gradients
                            stop_with_save(f"every input of batch {in_epoch + 1} on process {rank} was bad; "
                                           f"see {run / 'bad_inputs.tsv'}")
                        step, in_epoch = step + 1, in_epoch + 1
                        bar.update(1)
                        continue
                    x = ds.finish(crops.to(dev0, non_blocking=True), shift if sched.noise_on(step) else None)
                    y = labels.to(dev0, non_blocking=True)
                    with amp:
                        logits = fwd(x)
                    loss = F.cross_entropy(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise TrainingStopped(
                            f"loss is {loss.item()} at epoch {epoch + 1}, step {in_epoch + 1}: stopped. The last "
                            f"good checkpoint is kept in {run / 'last.pt'}. Try a lower lr or init=caffe.")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step, in_epoch = step + 1, in_epoch + 1
                    lv = loss.item()
                    loss_sum, loss_n, seen = loss_sum + lv, loss_n + 1, seen + len(y) * world
                    recent = (recent + [lv])[-50:]
                    if cfg.stall_steps and step == cfg.stall_steps and not stall_warned and main:
                        if sum(recent) / len(recent) > 0.97 * ln_c:
                            stall_warned = True
                            tqdm.write(f"warning: after {step} steps the loss is still {sum(recent) / len(recent):.3f} "
                                       f"≈ ln({num_classes}) = {ln_c:.3f}: a stalled start. The paper's init (biases 1, "
                                       f"σ 0.01) is known to sit there for a long time; init=caffe (biases 0.1, "
                                       f"fc6/fc7 σ 0.005) usually starts at once.")
                    rate = seen / max(time.time() - t_epoch, 1e-9)
                    bar.update(1)
                    bar.set_postfix(loss=f"{lv:.3f}", lr=f"{lrs['weight']:.0e}", img_s=f"{rate:.0f}", refresh=False)
                    if stop.requested:
                        break
                    if time.time() - last_save > cfg.checkpoint_minutes * 60:
                        checkpoint(run / "last.pt")
                        last_save = time.time()
            finally:
                bar.close()
                del it
            if stop.requested:
                checkpoint(run / "last.pt")
                if main:
                    print(f"stopped by {stop.requested} at epoch {epoch + 1}, step {in_epoch} of {steps_per_epoch}; "
                          f"saved {run / 'last.pt'}. Resume with: replica train --resume {run}")
                return dict(stopped=stop.requested, step=step)
            if in_epoch < steps_per_epoch and not sched.finished(step):
                continue
            # end of an epoch (or of the run)
            record = dict(epoch=epoch + 1, step=step, train_loss=loss_sum / loss_n if loss_n else None,
                          lr={k: v for k, v in sched.lrs(step - 1).items()}, noise=sched.noise_on(step - 1),
                          seconds=time.time() - t_epoch, images_per_s=seen / max(time.time() - t_epoch, 1e-9),
                          skipped_files=skipped)
            err = None
            if val_images is not None and main:
                r = evaluate(model, val_images, mean, views=1, batch=min(cfg.batch_size, 128),
                             max_batches=cfg.val_batches, crop=cfg.crop, bf16=cfg.bf16)
                record.update(val_top1_err=r["top1_err"], val_top5_err=r["top5_err"], val_images=r["images"])
                err = r["top1_err"]
            if world > 1:
                box = [err]
                torch.distributed.broadcast_object_list(box, src=0)
                err = box[0]
            if err is not None and sched.on_validation(err) and main:
                tqdm.write(f"validation error stopped improving: learning rate ÷10 (drop {sched.plateau_drops})")
            epoch, in_epoch = epoch + 1, 0
            improved = err is not None and err < best
            if improved:
                best = err
            records.append(record)
            # best, then last, then the metrics line: a kill between any two is repaired on resume
            # (the epoch is redone from the older last.pt, or metrics.jsonl is rewritten from it)
            if improved:
                checkpoint(run / "best.pt")
            checkpoint(run / "last.pt")
            last_save = time.time()
            if main:
                append_metrics(run, record)
                loss_text = f"{record['train_loss']:.4f}" if loss_n else "n/a (no usable input)"
                msg = f"epoch {record['epoch']}: loss {loss_text}"
                if err is not None:
                    msg += f", val top-1 {record['val_top1_err']:.2%} top-5 {record['val_top5_err']:.2%} (1 view)"
                tqdm.write(msg + f", {record['images_per_s']:.0f} img/s")
    if world > 1:
        torch.distributed.barrier()
    return dict(stopped=None, step=step, epochs=epoch, best_val_top1_err=best)
