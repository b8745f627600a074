"""A run as it trains: :class:`RunLog`, the one place its numbers leave (the console,
metrics.jsonl, bad_inputs.tsv, and the views below), and the views: pictures in the run folder
and TensorBoard's event files (process 0 only).

- ``curves.png`` and ``filters.png`` are redrawn at each epoch's end and replaced atomically, so
  any image viewer shows the run as it stands (``live=false``: not drawn).
- With TensorBoard installed (``pip install -e '.[tensorboard]'``; ``tensorboard=false``:
  not written), ``RUN/tb/`` gets, under these tags:

  ========================================  ================================================
  ``train/loss``                            each training loss read (every step on the CPU,
                                            every 20 on a GPU), at its step
  ``train/lr/<group>``                      each parameter group's learning rate, same steps
  ``train/images_per_s``                    the epoch's rate so far, same steps
  ``train/peak_memory_gb``                  CUDA only: the peak allocated on device 0
  ``val/top1_err``, ``val/top5_err``        each epoch's one-view validation error (0-1)
  ``fig3/colour_specificity/tower_a`` (b)   each tower's median conv1 colour specificity
  ``fig3/conv1_kernels``                    each tower's conv1 kernels, as ``replica filters``
                                            draws them (a left, b right), each epoch
  ``config``                                the resolved config, once (text)
  ========================================  ================================================

  Steps are training steps. A resumed run writes from the step after its checkpoint's with
  ``purge_step``: TensorBoard drops what the stopped run wrote past that step, so no step is
  plotted twice.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

from .errors import ReplicaError, install_hint
from .evaluate import percent
from .fileio import atomic_write
from .pictures import filter_image, picture, plot_curves, tower_kernels
from .runs import append_metrics, log_bad_inputs, write_metrics

log = logging.getLogger("replica")

TB_MISSING = ("TensorBoard is not installed, so RUN/tb/ is not written: " + install_hint("tensorboard") + " to "
              "watch runs with tensorboard --logdir runs/ (tensorboard=false silences this)")


def open_tensorboard(run: Path, purge_step: int | None):
    """A SummaryWriter into ``run/tb``, or None (with one line saying why) if TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        from tqdm import tqdm

        tqdm.write(f"note: {TB_MISSING}")
        return None
    return SummaryWriter(log_dir=str(run / "tb"), purge_step=purge_step)


class LiveViews:
    """What process 0 writes as the run goes: TensorBoard (if on and installed), the pictures (if on)."""

    def __init__(self, run: Path, tensorboard: bool, pictures: bool, resumed_at: int | None = None):
        self.run, self.pictures = Path(run), pictures
        self.tb = open_tensorboard(self.run, resumed_at + 1 if resumed_at else None) if tensorboard else None

    def config(self, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text("config", "```\n" + text + "\n```", 0)

    def losses(self, first_step: int, values: list, lrs: dict, images_per_s: float, device) -> None:
        """``values``: the losses of steps first_step, first_step + 1, …"""
        if self.tb is None or not values:
            return
        for i, v in enumerate(values):
            self.tb.add_scalar("train/loss", v, first_step + i)
        step = first_step + len(values) - 1
        for group, lr in lrs.items():
            self.tb.add_scalar(f"train/lr/{group}", lr, step)
        self.tb.add_scalar("train/images_per_s", images_per_s, step)
        if getattr(device, "type", None) == "cuda":
            import torch

            self.tb.add_scalar("train/peak_memory_gb", torch.cuda.max_memory_allocated(device) / 1e9, step)

    def restore(self, records: list) -> None:
        """A resumed run's metrics.jsonl rewritten from its checkpoint's records."""
        if self.main:
            write_metrics(self.run, records)

    def epoch(self, record: dict, records: list, model) -> None:
        """At an epoch's end: its scalars and kernels to TensorBoard; the pictures redrawn."""
        step = record["step"]
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if k.endswith("conv1.weight")}
        if self.tb is not None:
            for k in ("val_top1_err", "val_top5_err"):
                if record.get(k) is not None:
                    self.tb.add_scalar(f"val/{k[4:]}", record[k], step)
            for t, v in record["colour_specificity"].items():
                self.tb.add_scalar(f"fig3/colour_specificity/tower_{t}", v, step)
            self.tb.add_image("fig3/conv1_kernels", filter_image(tower_kernels(state)), step, dataformats="HWC")
            self.tb.flush()
        if self.pictures:
            from PIL import Image

            img, _, _ = picture(state, step)
            this_run = [dict(name=self.run.name, runs=[dict(metrics=records)])]
            try:
                atomic_write(self.run / "filters.png", lambda f: Image.fromarray(img).save(f, format="PNG"))
                plot_curves(this_run, self.run / "curves.png", title=f"{self.run.name}: {len(records)} epoch(s) so far")
            except ReplicaError as e:  # a picture is not worth a run: say so once, draw no more
                from tqdm import tqdm

                self.pictures = False
                tqdm.write(f"warning: {e}; the live pictures are off for the rest of this run (training goes on)")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def rate_text(images_per_s: float) -> str:
    """A rate as people read it: whole numbers from 10 up, two digits below (a short epoch's rate,
    its first step's compile included, is a fraction of an image a second: not "0")."""
    return f"{images_per_s:.0f}" if images_per_s >= 10 else f"{images_per_s:.2g}"


def stall_warning(recent: list, num_classes: int, step: int) -> str | None:
    """The warning, if the recent losses still sit at ln(classes), where a start stalls."""
    ln_c = math.log(num_classes)
    avg = sum(recent) / len(recent)
    if avg > 0.97 * ln_c:
        return (f"warning: after {step} steps the loss is still {avg:.3f} ≈ ln({num_classes}) = {ln_c:.3f}: a "
                f"stalled start. The paper's init (biases 1, σ 0.01) is known to sit there for a long time; "
                f"init=caffe (biases 0.1, fc6/fc7 σ 0.005) usually starts at once.")
    return None


class RunLog:
    """Where every number and word of a training run leaves it: the console (messages, the epoch's
    progress bar and line), metrics.jsonl, TensorBoard and the live pictures, bad_inputs.tsv.
    Process 0 writes; another process only names its own bad inputs on the console.

    The calls: :meth:`info` (the header, to the log), :meth:`say` (a line on the console),
    :meth:`epoch_bar` and :meth:`stepped` (the bar), :meth:`losses` (each loss read),
    :meth:`bad_inputs`, :meth:`epoch` (an epoch's record; :meth:`restore` on a resume), :meth:`close`.
    """

    def __init__(self, run: Path, rank: int = 0, progress: bool = True):
        self.run, self.rank, self.main, self.progress = Path(run), rank, rank == 0, progress
        self.views: LiveViews | None = None
        self.bar = None
        self.bad_named = 0  # the first 10 bad inputs are named on the console; all go to bad_inputs.tsv

    def open_views(self, tensorboard: bool, pictures: bool, resumed_at: int | None, config_text: str) -> None:
        """TensorBoard and the pictures, from the step after ``resumed_at`` (a new run: the config too)."""
        if self.main:
            self.views = LiveViews(self.run, tensorboard, pictures, resumed_at=resumed_at)
            if not resumed_at:
                self.views.config(config_text)

    def info(self, fmt: str, *args) -> None:
        if self.main:
            log.info(fmt, *args)

    def say(self, text: str | None) -> None:
        from tqdm import tqdm

        if self.main and text:
            tqdm.write(text)

    @contextlib.contextmanager
    def epoch_bar(self, epoch: int, done: int, total: int):
        """The epoch's progress bar (process 0, with progress on), closed however the epoch ends."""
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}", unit="step",
                        disable=not (self.progress and self.main), dynamic_ncols=True, leave=False)
        try:
            yield self.bar
        finally:
            self.bar.close()
            self.bar = None

    def stepped(self, loss: float | None, lr: float, images_per_s: float) -> None:
        """One step done: the bar moves, with the last loss read (None: none to show)."""
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.0e}", img_s=rate_text(images_per_s), refresh=False)

    def losses(self, first_step: int, values: list, lrs: dict, images_per_s: float, device) -> None:
        if self.views is not None:
            self.views.losses(first_step, values, lrs, images_per_s, device)

    def bad_inputs(self, epoch: int, batch: int, bad: list) -> None:
        """Process 0 appends them to bad_inputs.tsv (naming the first 10 on the console); another
        process names its own on the console."""
        if self.main:
            log_bad_inputs(self.run, epoch, batch, bad, warn=10 - self.bad_named)
            self.bad_named += len(bad)
            return
        from tqdm import tqdm

        for what, why, _ in bad:
            tqdm.write(f"warning: process {self.rank} skipped {what}: {why}")

    def restore(self, records: list) -> None:
        """A resumed run's metrics.jsonl rewritten from its checkpoint's records."""
        if self.main:
            write_metrics(self.run, records)

    def epoch(self, record: dict, records: list, model) -> None:
        """An epoch's record: its metrics.jsonl line, its scalars and pictures, its console line."""
        if not self.main:
            return
        append_metrics(self.run, record)
        self.views.epoch(record, records, model)
        loss = f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "n/a (no usable input)"
        msg = f"epoch {record['epoch']}: loss {loss}"
        if record.get("val_top1_err") is not None:
            msg += (f", val top-1 {percent(record['val_top1_err'])} top-5 {percent(record['val_top5_err'])} "
                    f"(1 view, {record['val_images']:,} images)")
        self.say(msg + f", {rate_text(record['images_per_s'])} img/s")

    def close(self) -> None:
        if self.views is not None:
            self.views.close()
