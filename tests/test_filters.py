"""Fig. 3's colour-specificity measure and the filter picture (replica.filters)."""
import numpy as np
import pytest
import torch

from replica.cli import main
from replica.colour import colour_specificity
from replica.config import NetOptions
from replica.filters import filter_image, format_filters, tower_split
from replica.runs import Checkpoint, Progress, save_checkpoint


def test_grey_kernel_is_0_and_a_kernel_without_luminance_is_1():
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(1, 1, 11, 11)), 3, axis=1)
    chroma = rng.normal(size=(1, 3, 11, 11))
    chroma -= chroma.mean(1, keepdims=True)  # channels cancel at every pixel
    mixed = grey + 0.5 * chroma
    s = colour_specificity(np.concatenate([grey, chroma, mixed]))
    assert s[0] == pytest.approx(0, abs=1e-12) and s[1] == pytest.approx(1, abs=1e-12)
    assert 0 < s[2] < 1


def fake_ckpt(a, b=None, step=0):
    """A checkpoint of conv1 kernels alone (what filters reads)."""
    model = {"tower_a.conv1.weight": torch.as_tensor(a, dtype=torch.float32)}
    if b is not None:
        model["tower_b.conv1.weight"] = torch.as_tensor(b, dtype=torch.float32)
    return Checkpoint(net=NetOptions(), classes=["x", "y"], model=model, mean=torch.zeros(3, 256, 256),
                      progress=Progress(step=step))


def test_constructed_two_tower_model_reports_the_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    grey = np.repeat(rng.normal(size=(48, 1, 11, 11)), 3, axis=1) + 0.05 * rng.normal(size=(48, 3, 11, 11))
    colour = rng.normal(size=(48, 3, 11, 11))
    colour -= 0.9 * colour.mean(1, keepdims=True)
    split = tower_split(fake_ckpt(grey, colour).model)
    assert split["towers"]["a"]["median"] < 0.05 < 0.9 < split["towers"]["b"]["median"]
    assert split["separated"] and split["colour_tower"] == "b"
    assert not tower_split(fake_ckpt(colour, colour).model)["separated"]
    save_checkpoint(tmp_path / "one.pt", fake_ckpt(grey, colour))
    save_checkpoint(tmp_path / "two.pt", fake_ckpt(colour, grey))  # the GPUs renumbered
    save_checkpoint(tmp_path / "half.pt", fake_ckpt(grey))
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


def test_the_picture_says_what_it_shows_and_that_a_short_run_cannot_show_the_split(tmp_path, capsys):
    """A new user takes a short run's noisy kernels for a bug: the caption and the printout say why."""
    from PIL import Image

    from replica.filters import PAPER_STEPS, filters
    rng = np.random.default_rng(2)
    k = rng.normal(size=(48, 3, 11, 11))
    for name, step in (("short", 1_000), ("long", PAPER_STEPS)):
        save_checkpoint(tmp_path / f"{name}.pt", fake_ckpt(k, k, step=step))
    short, long = filters([tmp_path / "short.pt", tmp_path / "long.pt"], tmp_path / "png")
    assert "after 1,000 steps" in short["caption"][0] and "short run" in " ".join(short["caption"])
    assert "random start" in short["caption"][-1]
    assert len(long["caption"]) == 1 and "after 450,000 steps" in long["caption"][0]
    a, b = (np.asarray(Image.open(r["png"])) for r in (short, long))
    assert a.shape[0] > b.shape[0]  # the extra lines are drawn
    assert (a[:30] < 128).any()  # dark text in the strip above the kernels
    assert main(["filters", str(tmp_path / "short.pt")]) == 0
    assert "note: a short run (1,000 steps)" in capsys.readouterr().out
