"""Using a trained run or checkpoint: evaluate it (``replica eval``: run_eval) and predict with it
(``replica predict``); the model rebuilt from a checkpoint, the held-out split opened without stand-ins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import augment
from .data.loaders import match_classes, open_heldout, open_images
from .errors import ReplicaError
from .evaluate import evaluate, evaluate_members, percent, predict_probs
from .data.imageio import BadImage, read_prepared
from .model import AlexNet
from .runs import Checkpoint, atomic_write, describe_source, load_checkpoint, run_checkpoint
from .runtime import fast_bf16, set_cuda_numerics


# what eval.json, the printed table and the report call images of a store that has no val split
TRAIN_SPLIT_ONLY = "training images (the store has no val split)"


def model_from_checkpoint(ck: Checkpoint, devices="auto") -> AlexNet:
    """The net the checkpoint's options describe, with its weights, in eval mode (its shapes
    checked before anything is allocated: :meth:`AlexNet.with_weights`)."""
    try:
        return AlexNet.with_weights(ck.net, ck.num_classes, ck.model, devices).eval()
    except ReplicaError as e:
        raise ReplicaError(f"{ck.path or 'checkpoint'}: {e}") from None


def trained_precision_bf16(ck: Checkpoint, model: AlexNet) -> bool:
    """Evaluate as the run trained: bf16 autocast if it trained so and the device has native bf16."""
    return ck.bf16 and fast_bf16(model.devices[0])


def open_split(data, split: str, training_data=None):
    """The ``split`` of a store or image source, with no silent stand-in for a missing val split.

    Held-out data named as such (``--data``, or the run's ``val_data``) may be a single
    class-folder tree: its only split is the held-out set, as in training. The run's own training
    data must hold a val split; its training images are measured only on request."""
    same = training_data is not None and Path(data).resolve() == Path(training_data).resolve()
    if split == "val" and not same:
        return open_heldout(data)
    try:
        return open_images(data, split)
    except ReplicaError as e:
        if split == "val":
            raise ReplicaError(f"{data} has no held-out (val) split to evaluate on ({e}): give --data with one, "
                               f"or --split train to measure the training images (reported as such)") from None
        raise


# images a forward pass (each gives ten views) where none is given: 2,560 views a pass on a GPU
# (fewer, larger launches; its rate there is tools/gpu_perf.py's to measure), 320 on the CPU
EVAL_BATCH = {"cuda": 256, "cpu": 32}


def eval_images(ck: Checkpoint, data, split: str):
    """(data, images, the classes evaluated, what they are called) for measuring ``ck`` on
    ``split`` of ``data`` (default: the run's own held-out data)."""
    if data is None:
        data = (ck.config.get("val_data") if split == "val" else None) or ck.config.get("data")
        if data is None:
            raise ReplicaError("no --data given and the checkpoint names none")
    images = open_split(data, split, training_data=ck.config.get("data"))
    images_of = {"train": "training images", "val": "validation images", "test": "test images"}[split]
    if split == "val" and getattr(images, "split", None) == "train" and (Path(data) / "meta.json").exists():
        images_of = TRAIN_SPLIT_ONLY  # a store records its splits: this one holds training images only
    images, subset = match_classes(images, ck.classes, data)
    if len(images) == 0:
        raise ReplicaError(f"{data}: the {split} split holds no images")
    return data, images, subset, images_of


def run_eval(target, data=None, views=(1, 10), devices="auto", batch: int | None = None, progress: bool = True,
             bf16: bool | None = None, checkpoint: str = "last", split: str = "val", workers: int = 2,
             tf32: bool | None = None, graph: bool = False, per_view: bool = False) -> dict:
    """top-1/top-5 error, one view and ten views (one pass); writes eval.json into the run folder.

    ``checkpoint``: a run folder's ``last`` (the final network, what the 2012 run reported: run 145
    was stopped after epoch 91 and tested; the default) or ``best`` (the lowest one-view
    validation error, chosen on the same images it is then measured on: optimistic).
    ``split``: ``val`` (the default; an error if there is none), ``test`` (ILSVRC-2010's labelled test
    set: the paper's Table 1) or ``train``, said on every line.
    ``bf16=None``: bfloat16 autocast if the run trained with it and the device has native bf16
    (:func:`replica.runtime.fast_bf16`). ``tf32=None``: as the run trained (its ``tf32`` key). eval.json
    records what was measured and how: the device, the precision, and on CUDA whether float32 meant TF32.
    """
    if split not in ("val", "test", "train"):
        raise ReplicaError(f"split: expected 'val', 'test' or 'train', got {split!r}")
    target = Path(target)
    ckpt_path = run_checkpoint(target, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, devices)
    if bf16 is None:
        bf16 = trained_precision_bf16(ckpt, model)
    if tf32 is None:  # as the run trained (false: true float32), never cuDNN's TF32 default
        tf32 = bool(ckpt.config.get("tf32", False))
    numerics = set_cuda_numerics(tf32)
    cuda = any(d.type == "cuda" for d in model.devices)
    batch = batch or EVAL_BATCH["cuda" if cuda else "cpu"]
    data, images, subset, images_of = eval_images(ckpt, data, split)
    results = evaluate(model, images, ckpt.mean.numpy(), views=tuple(views), batch=batch, crop=ckpt.crop,
                       progress=progress, bf16=bf16, workers=workers, graph=graph, per_view=per_view)
    prog = ckpt.progress
    out = dict(checkpoint=str(ckpt_path), network=checkpoint if target.is_dir() else "file",
               epoch=prog.epoch, step=prog.step, finished=bool(prog.done),
               split=split, images_of=images_of,
               data=str(data), dataset=ckpt.dataset, classes=ckpt.num_classes,
               classes_evaluated=subset or "all",
               precision="bf16" if bf16 else "fp32", device=" + ".join(map(str, model.devices)),
               tf32=numerics["tf32"] if cuda else None, graph=bool(graph and cuda), **results)
    if ckpt.source:  # imported weights: no epoch or step of replica's
        out.update(imported=describe_source(ckpt.source), epoch=None, step=None)
    run = target if target.is_dir() else target.parent
    if (run / "config.yaml").exists():
        name = eval_record_name(out["network"], split, views)
        atomic_write(run / name, lambda f: f.write(json.dumps(out, indent=1).encode()))
        out["record"] = str(run / name)
    return out


def file_sha1(path: Path) -> str:
    import hashlib

    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_ensemble_eval(targets, data=None, views=(1, 10), devices="auto", batch: int | None = None,
                      progress: bool = True, bf16: bool | None = None, checkpoint: str = "last", split: str = "val",
                      workers: int = 2, out=None, weights=None, graph: bool = False, per_view: bool = False) -> dict:
    """Table 2's "k CNNs": the members' softmax probabilities averaged (``weights``: Σ c_k·P_k),
    view by view, on the same images in one pass, as the 2012 code's avg-valid.py did; each
    member's own figures beside the ensemble's. Members must agree on their classes and crop.
    With ``out``: ``OUT/eval.json``, the ensemble's figures where a run's are, and each member
    named (folder, checkpoint, sha1) with its own."""
    if split not in ("val", "test", "train"):
        raise ReplicaError(f"split: expected 'val', 'test' or 'train', got {split!r}")
    if weights is not None and len(weights) != len(targets):
        raise ReplicaError(f"--weights: {len(weights)} given for {len(targets)} members")
    paths = [run_checkpoint(Path(t), checkpoint) for t in targets]
    cks = [load_checkpoint(p) for p in paths]
    first = cks[0]
    for t, ck in zip(targets[1:], cks[1:]):
        if list(ck.classes) != list(first.classes):
            raise ReplicaError(f"{t}: its {ck.num_classes} classes are not {targets[0]}'s {first.num_classes} (in "
                               f"order): an ensemble averages the same classes")
        if ck.crop != first.crop:
            raise ReplicaError(f"{t}: crop {ck.crop}, {targets[0]}'s {first.crop}: an ensemble sees the same views")
    models = [model_from_checkpoint(ck, devices) for ck in cks]
    members = [dict(model=m, mean=ck.mean.numpy(), bf16=trained_precision_bf16(ck, m) if bf16 is None else bf16)
               for m, ck in zip(models, cks)]
    numerics = set_cuda_numerics(bool(first.config.get("tf32", False)))
    cuda = any(d.type == "cuda" for d in models[0].devices)
    batch = batch or EVAL_BATCH["cuda" if cuda else "cpu"]
    data, images, subset, images_of = eval_images(first, data, split)
    r = evaluate_members(members, images, views=tuple(views), batch=batch, crop=first.crop, progress=progress,
                         workers=workers, weights=weights, graph=graph, per_view=per_view)
    record = dict(ensemble=len(cks), weights=weights, network=checkpoint, split=split, images_of=images_of,
                  data=str(data), dataset=first.dataset, classes=first.num_classes, classes_evaluated=subset or "all",
                  precision="+".join(sorted({"bf16" if m["bf16"] else "fp32" for m in members})),
                  device=" + ".join(map(str, models[0].devices)), tf32=numerics["tf32"] if cuda else None,
                  graph=bool(graph and cuda),
                  members=[dict(run=str(t), checkpoint=str(p), sha1=file_sha1(p), **fig)
                           for t, p, fig in zip(targets, paths, r["members"])], **r["ensemble"])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "eval.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
        record["record"] = str(out / "eval.json")
    return record


def eval_record_name(network: str, split: str, views) -> str:
    """The file a run folder keeps an eval in, one per way of measuring: ``eval.json`` for the
    paper's way (the final network, the validation split, one and ten views), else
    ``eval-NETWORK-SPLIT-VIEWS.json`` (e.g. ``eval-best-val-1view.json``), so that another way
    never replaces the paper's figures behind the report's back."""
    views = tuple(sorted(views))
    if network in ("last", "file") and split == "val" and views == (1, 10):
        return "eval.json"
    return f"eval-{network}-{split}-{'+'.join(f'{v}view' for v in views)}.json"


def read_eval(run) -> dict:
    """A run folder's eval record for a report: the paper's way (eval.json) when there is one,
    else the newest other way's (its ``network``, ``split`` and views say which)."""
    run = Path(run)
    records = [run / "eval.json"] if (run / "eval.json").exists() else \
        sorted(run.glob("eval-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in records:
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    return {}


def describe_eval(r: dict) -> str:
    """One line: which network, on which images, how."""
    net = {"last": "final network (last.pt)", "best": "best-on-validation network (best.pt)"}.get(
        r.get("network"), r.get("checkpoint", "?"))
    first = next((v for k, v in r.items() if k.endswith("-view")), {})
    sub = "" if r.get("classes_evaluated", "all") == "all" else f", {r['classes_evaluated']}"
    step = f", step {r['step']:,}" if r.get("step") is not None else ""
    when = r["imported"] if r.get("imported") else f"epoch {r.get('epoch', '?')}{step}"
    if r.get("ensemble"):
        net = f"{net.split(' (')[0]}s of {r['ensemble']} runs"
        when = "their probabilities " + ("weighted " + ", ".join(f"{w:g}" for w in r["weights"])
                                         if r.get("weights") else "averaged")
    tf32 = {True: " (TF32 on)", False: " (TF32 off)"}.get(r.get("tf32"), "")  # CUDA only: None on the CPU
    dev = f" on {r['device']}" if r.get("device") else ""
    return (f"{net}, {when}; {first.get('images', 0):,} {r.get('images_of', 'images')} "
            f"of {r.get('data')}{sub}; {first.get('skipped', 0)} skipped; {r.get('precision', '?')}{tf32}{dev}")


def format_eval(r: dict) -> str:
    what = r.get("images_of", "images")
    lines = [f"{'':<10} {'top-1 err':>10} {'top-5 err':>10} {what:>18}"]
    rows = [("", r)]
    if r.get("ensemble"):  # each member's own figures, then the ensemble's
        lines[0] = f"{'':<26}" + lines[0]
        rows = [(f"{Path(m['run']).name[:24]:<26}", m) for m in r["members"]] + [
            (f"{'ensemble of ' + str(r['ensemble']):<26}", r)]
    for who, fig in rows:
        for k in ("1-view", "10-view"):
            if k in fig:
                v = fig[k]
                lines.append(f"{who}{k:<10} {percent(v['top1_err']):>10} {percent(v['top5_err']):>10} "
                             f"{v['images']:>18,}")
    each = r.get("10-view", {}).get("per_view")
    if each:  # the ten views one by one (the ensemble's, for an ensemble)
        lines.append(f"{'each of the ten views alone' + (' (the ensemble)' if r.get('ensemble') else '')}:")
        for v in each:
            lines.append(f"  {v['view']:<24} {percent(v['top1_err']):>10} {percent(v['top5_err']):>10}")
    if any(r.get(k, {}).get("top5_err", 0) is None for k in ("1-view", "10-view")):
        lines.append(f"top-5: n/a with {r.get('classes')} classes (every label is in the top 5)")
    if r.get("split") == "train":
        lines.append("measured on the TRAINING images (--split train), not held-out data")
    if r.get("images_of") == TRAIN_SPLIT_ONLY:
        lines.append(f"measured on TRAINING images: {r.get('data')} is a store with a train split only, not held-out "
                     f"data (prepare held-out images with --val DIR, or give them as a class-folder tree)")
    lines.append(describe_eval(r))
    return "\n".join(lines)


def predict(ckpt_path, images, topk: int = 5, views: int = 1, devices="auto"):
    """Yield (image, [(class, probability), ...]) or (image, error message) for each image."""
    ckpt = load_checkpoint(run_checkpoint(Path(ckpt_path)))
    model = model_from_checkpoint(ckpt, devices)
    bf16 = trained_precision_bf16(ckpt, model)
    classes, names = ckpt.classes, ckpt.names
    if names:  # "tench (n01440764)"
        classes = [f"{n.split(',')[0]} ({c})" if n != c else c for n, c in zip(names, classes)]
    crop = ckpt.crop
    mean_crop = augment.centre_crop_of(ckpt.mean, crop)
    size = ckpt.mean.shape[-1]
    for path in images:
        try:
            u8 = read_prepared(path, size)
        except BadImage as e:
            yield path, str(e)
            continue
        probs = predict_probs(model, torch.from_numpy(np.ascontiguousarray(u8))[None], mean_crop, views, crop,
                              bf16)[0]
        p, i = probs.topk(min(topk, len(classes)))
        yield path, [(classes[j], float(q)) for q, j in zip(p.tolist(), i.tolist())]
