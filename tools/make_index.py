#!/usr/bin/env python
"""Write ``path label`` txt indexes from a class-folder tree (the seed's generate_txt_file.py).

    python tools/make_index.py ROOT [--out DIR]

ROOT holds split folders (``train_data``/``test_data``, ``train``/``val``, …) of class folders,
or class folders directly. For each split it writes ``<split>.txt`` (``train.txt`` for the
training split, ``test.txt`` for the held-out one, as the seed named them), one ``PATH LABEL``
line per image, paths relative to the index. Labels are the positions of the class names in
sorted order, not a hard-coded dict; the names go to ``classes.txt`` beside the indexes.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.errors import ReplicaError  # noqa: E402
from replica.data.imageio import is_image_name  # noqa: E402
from replica.data.sources import TRAIN_DIRS, VAL_DIRS, find_classes  # noqa: E402


def make_index(root, out=None) -> dict[str, int]:
    """Write the indexes; returns lines written per index file."""
    root = Path(root)
    if not root.is_dir():
        raise ReplicaError(f"{root}: not a folder")
    out = Path(out) if out else root
    out.mkdir(parents=True, exist_ok=True)
    train = next((root / d for d in TRAIN_DIRS if (root / d).is_dir()), None)
    held = next((root / d for d in VAL_DIRS if (root / d).is_dir()), None)
    splits = {"train.txt": train or root}
    if held is not None:
        splits["test.txt"] = held
    classes = find_classes(splits["train.txt"])
    if not classes:
        raise ReplicaError(f"{splits['train.txt']}: no class folders")
    label = {c: i for i, c in enumerate(classes)}
    written = {}
    for name, folder in splits.items():
        lines = []
        for c in find_classes(folder):
            if c not in label:
                raise ReplicaError(f"{folder / c}: class {c!r} is not among the training classes")
            for dirpath, dirnames, files in os.walk(folder / c):
                dirnames.sort()
                for f in sorted(files):
                    if is_image_name(f):
                        rel = os.path.relpath(os.path.join(dirpath, f), out).replace(os.sep, "/")
                        lines.append(f"{rel} {label[c]}\n")
        (out / name).write_text("".join(lines))
        written[name] = len(lines)
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--out", default=None, help="where to write the indexes (default: ROOT)")
    args = p.parse_args(argv)
    try:
        written = make_index(args.root, args.out)
    except ReplicaError as e:
        print(f"make_index: error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.root
    for name, n in written.items():
        print(f"Successfully generated {os.path.join(out, name)} with {n} image paths and labels.")
    print(f"class names: {os.path.join(out, 'classes.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
