"""Evaluation and prediction from a run or a checkpoint (``replica eval``, ``replica predict``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import augment
from .data import open_heldout
from .errors import ReplicaError
from .evaluate import evaluate, predict_probs
from .imageio import BadImage, read_prepared
from .model import AlexNet
from .runs import atomic_write, best_or_last, load_checkpoint
from .runtime import fast_bf16


def model_from_checkpoint(ckpt: dict, devices="auto") -> AlexNet:
    m = ckpt["meta"]
    model = AlexNet(m["num_classes"], devices=devices, preset=m["preset"], variant=m["variant"], norm=m["norm"],
                    overlap=m["overlap"], dropout=m["dropout"], init=m.get("init"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ReplicaError(f"checkpoint weights do not fit the {m['variant']} model: {str(e).splitlines()[0]}") from None
    return model.eval()


def trained_precision_bf16(ckpt: dict, model: AlexNet) -> bool:
    """Evaluate as the run trained: bf16 autocast if it trained so and the device has native bf16."""
    return bool(ckpt["config"].get("bf16")) and fast_bf16(model.devices[0])


def run_eval(target, data=None, views=(1, 10), devices="auto", batch: int = 32, progress: bool = True,
             bf16: bool | None = None) -> dict:
    """top-1/top-5 error, one view and ten views; writes eval.json into the run folder.

    ``bf16=None``: bfloat16 autocast if the run trained with it and the device has native bf16
    (:func:`replica.runtime.fast_bf16`); eval.json records which precision was used.
    """
    target = Path(target)
    ckpt_path = best_or_last(target)
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, devices)
    if bf16 is None:
        bf16 = trained_precision_bf16(ckpt, model)
    if data is None:
        data = ckpt["config"].get("val_data") or ckpt["config"].get("data")
        if data is None:
            raise ReplicaError("no --data given and the checkpoint names none")
    images = open_heldout(data)
    if list(images.classes) != list(ckpt["meta"]["classes"]):
        raise ReplicaError(f"{data}: its {len(images.classes)} classes are not the {ckpt['meta']['num_classes']} "
                           f"classes this checkpoint was trained on")
    mean = ckpt["mean"].numpy()
    crop = ckpt["meta"].get("crop", augment.CROP)
    results = {f"{v}-view": evaluate(model, images, mean, views=v, batch=batch, crop=crop, progress=progress,
                                     bf16=bf16) for v in views}
    out = dict(checkpoint=str(ckpt_path), data=str(data), precision="bf16" if bf16 else "fp32", **results)
    run = target if target.is_dir() else target.parent
    if (run / "config.yaml").exists():
        atomic_write(run / "eval.json", lambda f: f.write(json.dumps(out, indent=1).encode()))
    return out


def format_eval(r: dict) -> str:
    lines = [f"{'':<10} {'top-1 err':>10} {'top-5 err':>10} {'images':>8}"]
    for k in ("1-view", "10-view"):
        if k in r:
            v = r[k]
            lines.append(f"{k:<10} {v['top1_err']:>10.2%} {v['top5_err']:>10.2%} {v['images']:>8,}")
    return "\n".join(lines)


def predict(ckpt_path, images, topk: int = 5, views: int = 1, devices="auto"):
    """Yield (image, [(class, probability), ...]) or (image, error message) for each image."""
    ckpt = load_checkpoint(best_or_last(Path(ckpt_path)))
    model = model_from_checkpoint(ckpt, devices)
    bf16 = trained_precision_bf16(ckpt, model)
    classes = ckpt["meta"]["classes"]
    crop = ckpt["meta"].get("crop", augment.CROP)
    mean_crop = augment.centre_crop_of(ckpt["mean"], crop)
    size = ckpt["mean"].shape[-1]
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
