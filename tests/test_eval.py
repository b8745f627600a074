"""Numbers you can trust: no figure that looks right while being wrong.

Each test here failed before its fix: a flat val folder scored 0.00%, eval fell back to the
training images, val_data's labels shifted with a missing class, top-5 read 0.00% with two
classes, eval read best.pt, and the one-view figure needed a second pass.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from replica.cli import main
from replica.colour import colour_specificity
from replica.config import load_config
from replica.data.loaders import open_heldout
from replica.errors import ReplicaError
from replica.evaluate import evaluate, predict_probs, view_probs
from replica.inference import model_from_checkpoint
from replica.runs import load_checkpoint, read_metrics
from replica.data.writer import prepare
from replica.data.loaders import open_training
from replica.train import train
from runs_helpers import NARROW, tiny


def _jpegs(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG")


def test_a_flat_val_folder_is_an_error_at_prepare_and_at_train(tiny_tree, tmp_path, capsys):
    """ILSVRC-2012's val tar unpacks to 50,000 JPEGs and no class folders: 0 labelled images."""
    import shutil

    shutil.rmtree(tiny_tree / "val")
    _jpegs(tiny_tree / "val", 3)
    assert main(["prepare", str(tiny_tree), str(tmp_path / "st")]) == 2
    err = capsys.readouterr().err
    assert "val: this split has no labelled image (3 image files directly in it but no class folders)" in err
    assert "val/<class>/<image>" in err and "Traceback" not in err
    cfg = tiny(tiny_tree, batch_size=3)
    with pytest.raises(ReplicaError, match="this split has no labelled image"):
        train(cfg, tmp_path / "run", progress=False)


def test_eval_refuses_to_stand_the_training_images_in_for_a_val_split(tmp_path, capsys):
    from replica.data.synth import synth

    synth(tmp_path / "s", classes=3, train_per_class=4, val_per_class=1, workers=1, progress=False)
    import shutil

    shutil.rmtree(tmp_path / "s" / "val")
    prepare(tmp_path / "s", tmp_path / "st", workers=1, progress=False)
    run = tmp_path / "run"
    train(load_config(None, dict(tensorboard=False, live=False, data=str(tmp_path / "st"), batch_size=4, epochs=1, steps_per_epoch=1, workers=0,
                                 devices="cpu", init="caffe", width=NARROW)), run, progress=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no held-out (val) split" in err and "--split train" in err
    assert main(["eval", str(run), "--devices", "cpu", "--data", str(tmp_path / "st")]) == 2  # named, still its own
    assert "has no held-out (val) split" in capsys.readouterr().err
    # held-out images named as such may be one class-folder tree (its only split is the held-out set)
    synth(tmp_path / "v", classes=3, train_per_class=2, val_per_class=0, seed=9, workers=1, progress=False)
    assert main(["eval", str(run), "--devices", "cpu", "--data", str(tmp_path / "v" / "train"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "validation images" in out.splitlines()[0]
    assert json.loads((run / "eval.json").read_text())["1-view"]["images"] == 6
    assert main(["eval", str(run), "--devices", "cpu", "--split", "train", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "training images" in out.splitlines()[0] and "measured on the TRAINING images" in out
    ev = json.loads((run / "eval-last-train-1view+10view.json").read_text())  # its own record: one per way
    assert ev["split"] == "train" and ev["images_of"] == "training images" and ev["1-view"]["images"] == 12
    assert json.loads((run / "eval.json").read_text())["split"] == "val"  # the paper's way, kept


def test_val_data_classes_are_matched_by_name(tiny_tree, tmp_path):
    """val_data holding bee and cat only: labels 1 and 2 of the training classes, not 0 and 1."""
    import shutil

    sub = tmp_path / "val-sub"
    for c in ("bee", "cat"):
        shutil.copytree(tiny_tree / "val" / c, sub / c)
    cfg = tiny(tiny_tree, batch_size=3, val_data=str(sub))
    train_images, val = open_training(cfg.data, cfg.val_data)
    assert train_images.classes == ["ant", "bee", "cat"]
    _, labels, _ = val.batch(np.arange(len(val)))
    assert sorted(set(labels.tolist())) == [1, 2] and len(val) == 4
    shutil.copytree(tiny_tree / "val" / "cat", sub / "dog")  # a class training never saw
    with pytest.raises(ReplicaError, match="class\\(es\\) 'dog' are not among the 3 training classes"):
        open_training(str(tiny_tree), str(sub))


def test_top5_is_not_applicable_with_five_classes_or_fewer(store, tmp_path, capsys):
    """The store has 4 classes: top-5 error would be 0.00% by construction."""
    run = tmp_path / "run"
    train(tiny(store, epochs=1), run, progress=True)
    assert "top-5 n/a" in capsys.readouterr().out  # the epoch's line
    m = read_metrics(run)[0]
    assert m["val_top5_err"] is None and m["val_top1_err"] is not None
    assert main(["eval", str(run), "--devices", "cpu", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "n/a" in out.splitlines()[1] and "top-5: n/a with 4 classes" in out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["10-view"]["top5_err"] is None
    assert main(["report", str(run)]) == 0
    assert "/ n/a |" in (run / "report.md").read_text()


def test_eval_reports_the_final_network_unless_asked_and_records_how(store, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(store), run, progress=False)
    assert main(["eval", str(run), "--devices", "cpu", "--workers", "0"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["checkpoint"] == str(run / "last.pt") and ev["network"] == "last"
    assert (ev["epoch"], ev["step"], ev["finished"]) == (2, 6, True)
    assert ev["data"] == str(store) and ev["classes"] == 4 and ev["precision"] == "fp32" and ev["split"] == "val"
    assert ev["1-view"]["images"] == ev["10-view"]["images"] == 8 and ev["1-view"]["skipped"] == 0
    assert "final network (last.pt), epoch 2, step 6; 8 validation images" in capsys.readouterr().out
    paper_way = (run / "eval.json").read_bytes()
    assert main(["eval", str(run), "--devices", "cpu", "--checkpoint", "best", "--workers", "0"]) == 0
    ev = json.loads((run / "eval-best-val-1view+10view.json").read_text())  # one record per way of measuring
    assert ev["checkpoint"] == str(run / "best.pt") and ev["network"] == "best"
    assert (run / "eval.json").read_bytes() == paper_way  # never replaced by another way
    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "final network (last.pt)" in md and "best-on-validation network" not in md  # the paper's way first
    (run / "eval.json").unlink()
    assert main(["report", str(run)]) == 0  # without it, the way that was measured, said as such
    assert "best-on-validation network (best.pt)" in (run / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(run), "--devices", "cpu", "--workers", "0", "--per-view"]) == 0
    out = capsys.readouterr().out
    assert "each of the ten views alone:" in out and "  bottom-right, flipped" in out
    assert len(json.loads((run / "eval.json").read_text())["10-view"]["per_view"]) == 10
    assert main(["eval", str(run), "--devices", "cpu", "--views", "1", "--per-view"]) == 2
    assert capsys.readouterr().err.startswith("replica: error: --per-view: each of the ten views' figures needs")


def test_one_pass_gives_the_one_view_figure_of_the_separate_path(store, tmp_path):
    run = tmp_path / "run"
    train(tiny(store, epochs=1), run, progress=False)
    ck = load_checkpoint(run)
    model = model_from_checkpoint(ck, "cpu")
    val = open_heldout(store)
    mean = ck.mean.numpy()
    both = evaluate(model, val, mean, views=(1, 10), batch=3, workers=1)  # through a loader worker
    one = evaluate(model, val, mean, views=1, batch=3)
    ten = evaluate(model, val, mean, views=10, batch=3)
    assert both["1-view"] == one and both["10-view"] == ten
    u8 = torch.from_numpy(val.batch(np.arange(4))[0])
    from replica.augment import centre_crop_of

    mc = centre_crop_of(ck.mean, 224)
    # view 2 of the ten is the centre view: the same probabilities as the one-view path (the batch
    # is 10× larger, so the convolutions may block differently: float32 rounding)
    torch.testing.assert_close(view_probs(model, u8, mc, 10)[:, 2], predict_probs(model, u8, mc, 1),
                               rtol=1e-4, atol=1e-6)


def test_each_epoch_records_each_towers_colour_specificity(store, tmp_path):
    run = tmp_path / "run"
    train(tiny(store), run, progress=False)
    m = read_metrics(run)
    assert [sorted(r["colour_specificity"]) for r in m] == [["a", "b"], ["a", "b"]]
    ck = load_checkpoint(run)  # the end of the last epoch
    for t in ("a", "b"):
        want = float(np.median(colour_specificity(ck.model[f"tower_{t}.conv1.weight"])))
        assert m[-1]["colour_specificity"][t] == pytest.approx(want, abs=1e-12)
        assert 0 < m[-1]["colour_specificity"][t] < 1
    assert m[0]["colour_specificity"] != m[1]["colour_specificity"]  # the kernels moved


def test_capped_validation_takes_images_from_every_class_not_the_first_batches():
    """Sets are stored class by class: ``val_batches`` capping at the first batches measured class 0 only."""
    from replica.evaluate import EvalBatches

    class Sorted:  # 10 classes, 20 images each, in class order as a store holds them
        labels = np.repeat(np.arange(10), 20)

        def __len__(self):
            return len(self.labels)

        def batch(self, idx):
            return np.zeros((len(idx), 3, 8, 8), np.uint8), self.labels[idx], []

    ds = EvalBatches(Sorted(), batch=8, max_batches=4)
    labels = np.concatenate([ds[i][1].numpy() for i in range(len(ds))])
    assert len(labels) == 32 and len(set(labels)) == 10
    assert list(labels) == sorted(labels)  # the same images every time, in order
    whole = EvalBatches(Sorted(), batch=8)
    assert sum(len(whole[i][1]) for i in range(len(whole))) == 200


def test_eval_on_a_store_without_a_val_split_says_training_images(store, tmp_path, capsys):
    """A store prepared from a training folder alone: its images are training images, and
    eval.json, the printed table and the report say so."""
    from replica.data.synth import synth

    synth(tmp_path / "s", classes=4, train_per_class=3, val_per_class=0, seed=5, workers=1, progress=False)
    prepare(tmp_path / "s" / "train", tmp_path / "trainonly", workers=1, progress=False)
    run = tmp_path / "run"
    train(tiny(store, epochs=1, steps_per_epoch=1), run, progress=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--devices", "cpu", "--data", str(tmp_path / "trainonly"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "validation images" not in out and "training images (the store has no val split)" in out
    assert "measured on TRAINING images" in out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["images_of"] == "training images (the store has no val split)" and ev["1-view"]["images"] == 12
    assert main(["report", str(run)]) == 0
    assert "12 training images (the store has no val split)" in (run / "report.md").read_text()


def test_ten_view_eval_counts_on_the_device_and_reads_once(store, monkeypatch):
    """The misses are summed where the model is and read after the last batch: as many host
    reads of a tensor for four batches as for two (each read would make a GPU's host wait)."""
    import torch

    from replica.data.store import PreparedStore
    from replica.evaluate import evaluate
    from replica.model import AlexNet

    st = PreparedStore(store)
    torch.manual_seed(0)
    model = AlexNet(4, devices="cpu", width=0.0625, init="he")
    reads = []
    for name in ("cpu", "item", "tolist", "numpy", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: reads.append(_n) or _r(self, *a, **k))
    counts, results = [], []
    for batches in (2, 4):
        reads.clear()
        results.append(evaluate(model, st, st.mean(), views=(1, 10), batch=2, max_batches=batches, per_view=True))
        counts.append(len(reads))
    monkeypatch.undo()
    assert counts[0] == counts[1], counts
    assert results[1]["10-view"]["images"] == 8 and results[0]["10-view"]["images"] == 4
    for r in results:  # the figures as the host-side count gives them
        p_total = r["10-view"]["top1_err"] * r["10-view"]["images"]
        assert abs(p_total - round(p_total)) < 1e-9


def test_each_view_alone_against_its_probabilities_by_hand(store, tmp_path, capsys):
    """--per-view: each of the ten views' top-1/top-5 misses, counted on the device in the same
    pass, equal the misses of that view's probabilities computed image by image; the centre view
    alone is the one-view figure; the views differ (a random net: the test can tell them apart)."""
    from replica.augment import VIEW_NAMES, centre_crop_of
    from replica.data.store import PreparedStore
    from replica.model import AlexNet

    st = PreparedStore(store)
    torch.manual_seed(1)
    model = AlexNet(4, devices="cpu", width=0.0625, init="he").eval()
    r = evaluate(model, st, st.mean(), views=(1, 10), batch=5, per_view=True)
    each = r["10-view"]["per_view"]
    assert [v["view"] for v in each] == [*VIEW_NAMES, *(f"{n}, flipped" for n in VIEW_NAMES)]
    u8, labels, _ = st.batch(np.arange(len(st)))
    p = view_probs(model, torch.from_numpy(u8), centre_crop_of(torch.as_tensor(st.mean()), 224), 10)
    misses = (p.argmax(-1) != torch.as_tensor(labels)[:, None]).sum(0)
    assert [v["top1_err"] * len(st) for v in each] == pytest.approx(misses.tolist(), abs=1e-9)
    assert each[2]["top1_err"] == r["1-view"]["top1_err"] and len({v["top1_err"] for v in each}) > 1
    assert all(v["top5_err"] is None for v in each)  # 4 classes: no top-5 figure
    with pytest.raises(ValueError, match="ten views"):
        evaluate(model, st, st.mean(), views=1, per_view=True)


def test_graphed_eval_forward_gives_the_eager_figures_and_replays_each_full_batch(store):
    """graph=true (CUDA) with the capture stood in for on the CPU: the same probabilities and
    figures as the eager pass; a batch shape's first batch warms, its second is captured and
    replayed, later ones replayed; the last short batch (a shape seen once) never gets a graph."""
    from replica.data.store import PreparedStore
    from replica.evaluate import evaluate_members
    from replica.model import AlexNet
    from replica.steps import EagerGraphs, ForwardRunner

    st = PreparedStore(store)
    torch.manual_seed(0)
    model = AlexNet(4, devices="cpu", width=0.0625, init="he")
    members = [dict(model=model, mean=st.mean(), bf16=False)]
    eager = evaluate_members(members, st, views=(1, 10), batch=5)
    graphs = EagerGraphs()
    graphed = evaluate_members(members, st, views=(1, 10), batch=5, graph=True, graphs=graphs)
    assert graphed == eager
    full, short = divmod(len(st), 5)
    assert full >= 3 and short  # (24 images: 4 batches of 5, then 4)
    assert graphs.calls == ["warm", "capture"] + ["replay"] * (full - 1) + ["warm"]
    x = torch.randn(6, 3, 224, 224)
    runner = ForwardRunner(model.eval(), bf16=False, graph=True, graphs=EagerGraphs())
    outs = [runner(x), runner(x), runner(x * 2)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2]) and runner.replays == 2
    assert torch.equal(outs[2], ForwardRunner(model, bf16=False, graph=False)(x * 2))


# -- ensembles: Table 2's "5 CNNs" ---------------------------------------------------------------

def test_an_ensemble_of_a_run_with_itself_is_the_run_and_members_are_named(store, tiny_tree, tmp_path, capsys):
    """replica eval r r: r's own figures; replica eval r0 r1 --out F: both members named in
    F/eval.json (folder, checkpoint, sha1) with their own figures, which are what each gives alone;
    a member with other classes: one line, nothing written."""
    from replica.inference import file_sha1, run_ensemble_eval, run_eval

    r0, r1 = tmp_path / "r0", tmp_path / "r1"
    train(tiny(store, init="he", epochs=1), r0, progress=False)
    train(tiny(store, init="he", epochs=1, seed=1), r1, progress=False)
    alone = [run_eval(r, views=(1, 10), progress=False) for r in (r0, r1)]
    same = run_ensemble_eval([r0, r0], views=(1, 10), progress=False)
    for v in ("1-view", "10-view"):
        assert same[v] == alone[0][v]
    assert main(["eval", str(r0), str(r1), "--out", str(tmp_path / "ens")]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2" in out and "r0" in out and "r1" in out
    rec = json.loads((tmp_path / "ens" / "eval.json").read_text())
    assert rec["ensemble"] == 2 and [m["run"] for m in rec["members"]] == [str(r0), str(r1)]
    assert rec["members"][1]["sha1"] == file_sha1(r1 / "last.pt")
    for m, a in zip(rec["members"], alone):
        assert m["10-view"] == a["10-view"] and m["1-view"] == a["1-view"]
    assert rec["10-view"]["images"] == alone[0]["10-view"]["images"]
    weighted = run_ensemble_eval([r0, r1], views=(1,), progress=False, weights=[1.0, 0.0])
    assert weighted["1-view"] == alone[0]["1-view"]  # all the weight on r0: r0's own figure
    prepare(tiny_tree, tmp_path / "st3", workers=1, progress=False)  # 3 classes, not 4
    train(tiny(tmp_path / "st3", epochs=1, batch_size=3, steps_per_epoch=1), tmp_path / "three", progress=False)
    assert main(["eval", str(r0), str(tmp_path / "three"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "classes are not" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert main(["report", str(r0), str(r1), str(tmp_path / "ens"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| ens | 2 |"))
    assert row.endswith("| — |")  # not ILSVRC-2012: no paper figure beside it
    assert "Members: ens: r0, r1" in md and "| ens |" not in md.split("## Ensembles")[0]  # not a run of its own
