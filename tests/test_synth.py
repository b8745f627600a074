"""The synthetic demo dataset: deterministic, and its classes need shape and colour together."""
import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from replica.cli import main
from replica.errors import ReplicaError
from replica.data.synth import class_names, class_spec, synth


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synth(tmp_path / "a", 10, 2, 1, seed=3, workers=1, progress=False)
    synth(tmp_path / "b", 10, 2, 1, seed=3, workers=1, progress=False)
    synth(tmp_path / "c", 10, 2, 1, seed=4, workers=1, progress=False)
    assert not a["reused"]
    assert len(list((tmp_path / "a").rglob("*.jpg"))) == 30
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert synth(tmp_path / "a", 10, 2, 1, seed=3, workers=1, progress=False)["reused"]
    with pytest.raises(ReplicaError, match="other settings"):
        synth(tmp_path / "a", 10, 3, 1, seed=3, workers=1, progress=False)


@pytest.mark.parametrize("n", [4, 6, 8, 10])
def test_each_shape_and_each_colour_belongs_to_two_classes(n):
    specs = [class_spec(i, n) for i in range(n)]
    assert len(set(specs)) == n
    shapes, colours = Counter(s for s, _ in specs), Counter(c for _, c in specs)
    assert set(shapes.values()) == {2} and set(colours.values()) == {2}
    assert class_names(10)[5] == "05_green_disk"
    assert class_names(6) == ["00_red_disk", "01_green_cross", "02_blue_triangle", "03_green_disk", "04_blue_cross",
                              "05_red_triangle"]  # the demo's classes


def colour_histogram(path, bins=24):
    """Hue histogram of the strongly coloured pixels: the object's colour, whatever its shape."""
    hsv = np.asarray(Image.open(path).convert("HSV")).reshape(-1, 3).astype(int)
    strong = hsv[(hsv[:, 1] > 110) & (hsv[:, 2] > 60)]
    h = np.bincount(strong[:, 0] * bins // 256, minlength=bins).astype(float)
    return h / max(h.sum(), 1)


@pytest.mark.parametrize("n", [6, 10])  # the demo's set, and the default of `replica synth`
def test_colour_alone_does_not_separate_the_classes(tmp_path, n):
    """A nearest-centroid classifier on colour histograms: its errors go to the colour twin."""
    synth(tmp_path / "s", n, 24, 12, seed=0, workers=1, progress=False)
    names = class_names(n)

    def features(split):
        xs, ys = [], []
        for c, name in enumerate(names):
            for p in sorted((tmp_path / "s" / split / name).glob("*.jpg")):
                xs.append(colour_histogram(p))
                ys.append(c)
        return np.array(xs), np.array(ys)

    xtr, ytr = features("train")
    xva, yva = features("val")
    cents = np.stack([xtr[ytr == c].mean(0) for c in range(n)])
    pred = np.argmin(((xva[:, None] - cents[None]) ** 2).sum(-1), 1)
    acc = (pred == yva).mean()
    print(f"colour-only accuracy {acc:.2f}")
    assert 0.3 < acc < 0.7  # colour carries information, but it cannot tell the twins apart
    twin = {i: next(j for j in range(n) if j != i and class_spec(j, n)[1] == class_spec(i, n)[1]) for i in range(n)}
    wrong = pred != yva
    to_twin = np.mean([pred[k] == twin[yva[k]] for k in np.flatnonzero(wrong)])
    print(f"share of errors that pick the colour twin {to_twin:.2f}")
    assert to_twin > 0.5


def test_synth_command(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--classes", "4", "--train-per-class", "1",
                 "--val-per-class", "1", "--workers", "1"]) == 0
    assert "wrote 8 images (4 classes)" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "e"), "--classes", "40"]) == 2
