"""Fig. 4's nearest neighbours by fc7 features (replica.neighbors)."""
import numpy as np
import torch

from replica.cli import main
from runs_helpers import NARROW


def test_nearest_neighbours_on_a_constructed_feature_set():
    from replica.neighbors import nearest

    rng = np.random.default_rng(2)
    pool = torch.as_tensor(rng.normal(size=(1000, 16)))
    queries = pool[[5, 700, 999]] + 1e-3  # each query sits next to a known pool item
    idx, dist = nearest(queries, pool, k=3, chunk=128)  # chunks smaller than the pool
    assert idx[:, 0].tolist() == [5, 700, 999]
    brute = torch.cdist(queries.double(), pool.double()).topk(3, largest=False)
    # exact indices: float64, and the 2nd/3rd neighbours are O(1) apart, far beyond any rounding of
    # the chunked products; the distances themselves are numerical (allclose)
    assert torch.equal(idx, brute.indices) and torch.allclose(dist, brute.values)


def test_neighbors_command_draws_the_grid(tmp_path):
    from replica.data.writer import prepare
    from replica.data.synth import synth
    from replica.config import load_config
    from replica.train import train

    synth(tmp_path / "s", classes=3, train_per_class=3, val_per_class=1, workers=1, progress=False)
    prepare(tmp_path / "s", tmp_path / "st", workers=1, progress=False)
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(tmp_path / "st"), batch_size=3, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", width=NARROW))
    train(cfg, tmp_path / "run", progress=False)
    assert main(["neighbors", str(tmp_path / "run"), "--queries", "2", "--k", "3", "--devices", "cpu"]) == 0
    head, *legend = (tmp_path / "run" / "neighbors.txt").read_text().splitlines()
    assert head == f"classes: {tmp_path / 'st'}'s"
    assert len(legend) == 2 and all(line.count(",") == 2 and " → " in line for line in legend)
    from PIL import Image
    img = Image.open(tmp_path / "run" / "neighbors.png")
    assert img.size == (4 * 100 + 8, 2 * 100)


def test_neighbors_on_other_data_name_the_datas_classes_not_the_runs(tmp_path, capsys):
    """A run of 3 classes shown images of a store of 5: every row's names are the store's (the
    run's list is shorter: indexing it with the store's labels was an IndexError), said so."""
    from replica.config import load_config
    from replica.data.synth import synth
    from replica.data.writer import prepare
    from replica.train import train

    synth(tmp_path / "s3", classes=3, train_per_class=3, val_per_class=1, workers=1, progress=False)
    prepare(tmp_path / "s3", tmp_path / "st3", workers=1, progress=False)
    synth(tmp_path / "s5", classes=5, train_per_class=2, val_per_class=1, seed=4, workers=1, progress=False)
    for c in sorted((tmp_path / "s5").glob("*/*")):  # other names than the run's classes
        c.rename(c.with_name("other_" + c.name))
    prepare(tmp_path / "s5", tmp_path / "st5", workers=1, progress=False)
    cfg = load_config(None, dict(tensorboard=False, live=False, data=str(tmp_path / "st3"), batch_size=3, epochs=1,
                                 steps_per_epoch=1, workers=0, devices="cpu", init="caffe", width=NARROW))
    train(cfg, tmp_path / "run", progress=False)
    assert main(["neighbors", str(tmp_path / "run"), "--data", str(tmp_path / "st5"), "--queries", "5", "--k", "2",
                 "--devices", "cpu"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    head, *legend = (tmp_path / "run" / "neighbors.txt").read_text().splitlines()
    assert "the run was trained on other classes" in head and str(tmp_path / "st5") in head
    words = [w.strip(",") for line in legend for w in line.split(":", 1)[1].split() if w != "→"]
    assert len(legend) == 5 and words and all(w.startswith("other_") for w in words), legend
