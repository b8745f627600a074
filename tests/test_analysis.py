"""Fig. 3's colour-specificity measure and the filter picture."""
import numpy as np
import pytest
import torch

from replica.analysis import colour_specificity, filter_image, format_filters, tower_split
from replica.cli import main
from replica.runs import CKPT_FORMAT, CKPT_VERSION


def test_grey_kernel_is_0_and_a_kernel_without_luminance_is_1():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(1, 1, 11, 11)), 3, axis=1)
    chroma = rng.normal(size=(1, 3, 11, 11))
    chroma -= chroma.mean(1, keepdims=True)  # channels cancel at every pixel
    mixed = grey + 0.5 * chroma
    s = colour_specificity(np.concatenate([grey, chroma, mixed]))
    assert s[0] == pytest.approx(0, abs=1e-12) and s[1] == pytest.approx(1, abs=1e-12)
    assert 0 < s[2] < 1


def fake_ckpt(a, b=None):
    model = {"tower_a.conv1.weight": torch.as_tensor(a, dtype=torch.float32)}
    if b is not None:
        model["tower_b.conv1.weight"] = torch.as_tensor(b, dtype=torch.float32)
    return dict(format=CKPT_FORMAT, version=CKPT_VERSION, model=model, meta={}, config={}, progress={})


def test_constructed_two_tower_model_reports_the_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    grey = np.repeat(rng.normal(size=(48, 1, 11, 11)), 3, axis=1) + 0.05 * rng.normal(size=(48, 3, 11, 11))
    colour = rng.normal(size=(48, 3, 11, 11))
    colour -= 0.9 * colour.mean(1, keepdims=True)
    split = tower_split(fake_ckpt(grey, colour))
    assert split["towers"]["a"]["median"] < 0.05 < 0.9 < split["towers"]["b"]["median"]
    assert split["separated"] and split["colour_tower"] == "b"
    assert not tower_split(fake_ckpt(colour, colour))["separated"]
    torch.save(fake_ckpt(grey, colour), tmp_path / "one.pt")
    torch.save(fake_ckpt(colour, grey), tmp_path / "two.pt")  # the GPUs renumbered
    torch.save(fake_ckpt(grey), tmp_path / "half.pt")
    assert main(["filters", str(tmp_path / "one.pt"), str(tmp_path / "two.pt"), str(tmp_path / "half.pt"),
                 "--out", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "tower b colour-specific" in out and "tower a colour-specific" in out
    assert "towers separated in 2 of 2 runs" in out and "the split needs two towers" in out
    from PIL import Image
    img = Image.open(tmp_path / "png" / "filters-one.png")
    assert img.size[0] > img.size[1] > 100  # two blocks side by side


def test_filter_image_contrast_normalizes_each_kernel():
    k = np.zeros((2, 3, 11, 11))
    k[0, :, 5, 5] = 1e-6  # a faint kernel still spans black to white
    k[1] = np.linspace(-5, 5, 363).reshape(3, 11, 11)
    img = filter_image({"a": k}, scale=2, cols=2)
    first = img[2:24, 2:24]
    assert first.max() == 255 and first.min() == 0
    assert format_filters([]) .startswith("run")
