"""The report across runs and seeds, and tools/reproduce.py (replica.report)."""

from replica.cli import main
from replica.runs import load_checkpoint
from runs_helpers import NARROW


def _fake_run(root, name, diff, errs, epochs=3, images=1000, network="last", evaluated=True, dataset="ilsvrc2012",
              spec=None):
    import json

    import yaml

    from replica.config import load_config
    d = root / name
    d.mkdir(parents=True)
    cfg = load_config(None, diff).to_dict()
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            f.write(json.dumps(dict(epoch=e, train_loss=2.0 / e, val_top1_err=0.5, val_top5_err=0.2, val_images=64,
                                    lr={"weight": 0.01 / e},
                                    colour_specificity=spec or {"a": 0.7 - 0.1 * e, "b": 0.7 + 0.05 * e})) + "\n")
    if evaluated:  # as run_eval writes it
        (d / "eval.json").write_text(json.dumps(dict(
            checkpoint=str(d / f"{network}.pt"), network=network, epoch=epochs, step=30 * epochs, finished=True,
            split="val", images_of="validation images", data="/data/store", classes=1000, classes_evaluated="all",
            dataset=dataset,
            precision="fp32",
            **{"1-view": dict(views=1, images=images, top1_err=errs[0], top5_err=errs[1], skipped=0),
               "10-view": dict(views=10, images=images, top1_err=errs[2], top5_err=errs[3], skipped=0)})))
    return d


def test_report_tables_curves_config_difference_and_ablation_deltas(tmp_path, capsys):
    base = _fake_run(tmp_path, "baseline", {}, (0.42, 0.20, 0.40, 0.18))
    nonorm = _fake_run(tmp_path, "no-norm", {"norm": False}, (0.44, 0.21, 0.4137, 0.1915))
    fewer = _fake_run(tmp_path, "no-overlap", {"overlap": False}, (0.43, 0.2, 0.41, 0.19), images=500)
    best = _fake_run(tmp_path, "no-pca", {"pca_noise": False}, (0.43, 0.2, 0.41, 0.19), network="best")
    bare = _fake_run(tmp_path, "no-dropout", {"dropout": False}, None, evaluated=False)
    runs = [base, nonorm, fewer, best, bare]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("| baseline | 42.00 / 20.00 | 40.00 / 18.00 | final, epoch 3 | 1,000 validation images | "
            "50.00 / 20.00 (epoch 3, 64 images) |") in md
    assert "- no-norm (1 run): `norm=False`" in md and "- baseline (1 run): none" in md
    assert "## Ablations, each paired by seed with its baseline" in md
    assert "| no-norm | 1 | +1.37 | +1.15 | LRN: 1.4 / 1.2 | 1.37 / 1.15 (148 − 145) | one seed: no interval (n=1); " \
           "one seed: no interval | baseline, ten views |" in md
    # unlike figures are never set against the baseline's: other images, another checkpoint rule, none
    assert "- no-overlap, seed 0: left out, not comparable (images differ)" in md
    assert "- no-pca, seed 0: left out, not comparable (network differ)" in md
    assert "- no-dropout, seed 0: left out, not evaluated" in md
    assert "| no-dropout | not evaluated | not evaluated | — | — | 50.00 / 20.00 (epoch 3, 64 images) |" in md
    assert "- baseline: final network (last.pt), epoch 3, step 90; 1,000 validation images of /data/store" in md
    assert "40.66 / 18.21" in md and "ILSVRC-2012 val" in md  # the original run's log beside, for its dataset
    assert "37.47 / 17.00" not in md  # 2010's figures are not set beside 2012 runs
    other = _fake_run(tmp_path, "synthetic", {}, (0.1, 0.0, 0.1, 0.0), dataset=None)
    assert main(["report", str(other)]) == 0
    md = (other / "report.md").read_text()
    assert "40.66" not in md and "Not shown: no run here was evaluated on ILSVRC" in md
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "not a finished run folder" in capsys.readouterr().err


def test_reproduce_runs_baseline_and_every_ablation_in_tiny_mode(tmp_path):
    from reproduce import ABLATIONS, reproduce
    from replica.data.writer import prepare
    from replica.data.synth import synth

    synth(tmp_path / "s", classes=10, train_per_class=1, val_per_class=1, workers=1, progress=False)
    prepare(tmp_path / "s", tmp_path / "st", workers=1, progress=False)
    narrow = ["devices=cpu"]  # --tiny is the plumbing at 1/16 of the net's width by itself
    path = reproduce(tmp_path / "st", tmp_path / "out", tiny=True, progress=False, overrides=narrow)
    md = path.read_text()
    size = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert size < 100e6, f"{size / 1e6:.0f} MB for one seed of --tiny"
    assert load_checkpoint(tmp_path / "out" / "no-norm-seed0").net.width == NARROW
    for name in ["alexnet-2gpu", "alexnet-2010", *ABLATIONS]:
        assert f"| {name}-seed0 |" in md
        assert (tmp_path / "out" / f"{name}-seed0" / "eval.json").exists()
    assert "LRN: 1.4 / 1.2" in md and "two GPUs: 1.7 / 1.2" in md and "overlapping pooling: 0.4 / 0.3" in md
    # each claim against its own baseline recipe: two GPUs against run 145-2010's, the rest run 145's
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.split("## Ablations")[1].split("\n## ")[0].splitlines()
            if ln.startswith("| ") and " | " in ln and not ln.startswith("| ablation")}
    assert sorted(rows) == sorted(ABLATIONS)  # the 2010 baseline is paired with, not a row
    assert rows["one-gpu-half"].endswith("| alexnet-2010, ten views |")
    assert all(rows[a].endswith("| alexnet-2gpu, ten views |") for a in ABLATIONS if a != "one-gpu-half")
    assert load_checkpoint(tmp_path / "out" / "one-gpu-half-seed0").config["lr_drops"] == [23, 51, 78]
    # a second seed (seed 0's runs are reused): the report groups the seeds and pairs them
    path = reproduce(tmp_path / "st", tmp_path / "out", seeds=(0, 1), ablations=["no-norm"], tiny=True,
                     progress=False, overrides=narrow)
    md = path.read_text()
    assert "| alexnet-2gpu | 2 | 0, 1 |" in md and "| no-norm | 2 | 0, 1 |" in md
    row = next(ln for ln in md.split("## Ablations")[1].splitlines() if ln.startswith("| no-norm | 2 | "))
    assert " [" in row and "(n=2)" in row and "LRN: 1.4 / 1.2" in row  # an interval, and a verdict with n
    assert "- no-norm: seed 0 " in md and ", seed 1 " in md


def test_reproduce_takes_overrides_in_any_position(tmp_path, monkeypatch, capsys):
    """`--seeds 0 1 2 epochs=6`: argparse's nargs="+" took epochs=6 as a seed ("invalid int value")."""
    import reproduce as rep

    seen = []
    monkeypatch.setattr(rep, "reproduce", lambda *a, **kw: seen.append(a + (kw,)) or tmp_path / "report.md")
    for argv in (["--data", "st", "--seeds", "0", "1", "2", "epochs=6", "width=0.5"],
                 ["--data", "st", "epochs=6", "--ablations", "no-norm", "width=0.5", "--seeds", "0", "1", "2"],
                 ["--data", "runs/a=1", "--seeds", "0", "1", "2", "--ablations", "no-norm", "epochs=6", "width=0.5"]):
        assert rep.main(argv) == 0
    assert [a[3] for a in seen] == [[0, 1, 2]] * 3 and all(a[5] == ["epochs=6", "width=0.5"] for a in seen)
    assert seen[1][4] == ["no-norm"] and seen[2][0] == "runs/a=1"  # a path holding "=" stays a path
    assert [a[-1] for a in seen] == [dict(baseline=None)] * 3  # each claim against its own baseline recipe
    assert rep.main(["--data", "st", "--baseline", "alexnet-2gpu", "width=0.5"]) == 0
    assert seen[-1][-1] == dict(baseline="alexnet-2gpu") and seen[-1][5] == ["width=0.5"]
    assert [(n, b) for n, b, _ in rep.plan(["one-gpu-half", "no-norm"])] == [
        ("alexnet-2gpu", "alexnet-2gpu"), ("alexnet-2010", "alexnet-2010"), ("one-gpu-half", "alexnet-2010"),
        ("no-norm", "alexnet-2gpu")]
    assert [b for _, b, _ in rep.plan(["one-gpu-half"], baseline="alexnet-2gpu")] == ["alexnet-2gpu"] * 2


def test_report_across_seeds_means_paired_intervals_and_verdicts(tmp_path):
    """Hand-made eval.json/config.yaml with known numbers: grouping by config, mean and sample
    standard deviation, paired differences, Student's t intervals, every verdict, n = 1, a run
    that is not comparable, and Fig. 3 across seeds."""
    from replica.report import report

    T2 = 4.302652729911275  # Student's t, 97.5%, 2 degrees of freedom (tables)
    base_top1 = {0: 0.40, 1: 0.41, 2: 0.42}
    specs = {0: {"a": 0.30, "b": 0.60}, 1: {"a": 0.70, "b": 0.20}, 2: {"a": 0.40, "b": 0.45}}
    deltas = {"no-norm": ({"norm": False}, (0.014, 0.012, 0.016)),  # 1.4 ± 0.50: contains the claim 1.4
              "no-overlap": ({"overlap": False}, (0.001, 0.002, 0.0015)),  # [0.03, 0.27]: below the claim 0.4
              "one-gpu-half": ({"variant": "one-gpu-half"}, (-0.01, 0.02, 0.005)),  # contains 0
              "no-pca": ({"pca_noise": False}, (0.02,)),  # one seed
              "no-dropout": ({"dropout": False}, (0.05, 0.05))}  # seed 1 measured on other images
    runs = []
    for seed, e in base_top1.items():
        runs.append(_fake_run(tmp_path, f"alexnet-2gpu-seed{seed}", {"seed": seed, "workers": seed},
                              (e + 0.02, 0.20, e, 0.18 + seed / 100), spec=specs[seed]))
    for name, (diff, ds) in deltas.items():
        for seed, d in enumerate(ds):
            runs.append(_fake_run(tmp_path, f"{name}-seed{seed}", dict(diff, seed=seed),
                                  (0.5, 0.2, base_top1[seed] + d, 0.18 + seed / 100 + d / 2),
                                  images=500 if (name == "no-dropout" and seed == 1) else 1000))
    md = report(runs, tmp_path / "rep").read_text()
    # grouped: seeds (and the loader's workers) are not part of a config
    assert "| alexnet-2gpu | 3 | 0, 1, 2 | 41.00 ± 1.00 | 19.00 ± 1.00 | 43.00 ± 1.00 | 20.00 ± 0.00 |" in md
    assert "| no-pca | 1 | 0 | 42.00 | 19.00 | 50.00 | 20.00 |" in md
    # paired differences: mean, t interval with n − 1 degrees of freedom
    half = T2 * 0.2 / 3 ** 0.5
    assert (f"| no-norm | 3 | +1.40 [{1.4 - half:+.2f}, {1.4 + half:+.2f}] | +0.70 [{0.7 - half / 2:+.2f}, "
            f"{0.7 + half / 2:+.2f}] | LRN: 1.4 / 1.2 | 1.37 / 1.15 (148 − 145) | reproduced (n=3); "
            f"smaller than claimed |") in md
    half = T2 * 0.05 / 3 ** 0.5
    assert (f"| no-overlap | 3 | +0.15 [{0.15 - half:+.2f}, {0.15 + half:+.2f}] |" in md
            and "| 0.40 / 0.30 (147 − 145) | smaller than claimed (n=3);" in md)
    assert "| one-gpu-half | 3 | +0.50 [" in md and "1.70 / 1.23 (145-half − 145-2010) | not distinguishable from " \
                                                    "seed noise (n=3);" in md
    # paired with the only baseline here, which is not the claim's recipe: the row says so
    assert ("| alexnet-2gpu, ten views (not the claim's recipe, configs/alexnet-2010.yaml of run 145-2010: "
            "conv1_drop_epoch, lr_drops, pca_off_epoch, schedule_epochs differ) |") in md
    assert md.split("## Ablations")[1].split("| no-norm | 3 |")[1].split("\n")[0].endswith("| alexnet-2gpu, ten views |")
    assert "| no-pca | 1 | +2.00 | +1.00 | PCA noise: 1.0 / ? | — | one seed: no interval (n=1); no number claimed |" in md
    assert "| no-dropout | 1 | +5.00 | +2.50 | dropout: ? / ? | — | no number claimed (n=1); no number claimed |" in md
    assert "- no-dropout, seed 1: left out, not comparable (images differ)" in md
    assert "- no-norm: seed 0 +1.40 / +0.70, seed 1 +1.20 / +0.60, seed 2 +1.60 / +0.80" in md
    # seeds needed at the spread seen: one-gpu-half's top-1 sd 1.5 against 1.7 (t(5)·1.5/√6 = 1.57 < 1.7,
    # t(4)·1.5/√5 = 1.86 > 1.7); its top-5 sd 0.75 against 1.2 (t(3)·0.75/2 = 1.19)
    assert "- one-gpu-half: seeds needed: top-1 6, top-5 4 (n = 3 so far)" in md
    assert "- no-pca: seeds needed" not in md  # one seed: no spread yet
    # Fig. 3 across seeds: which tower came out colour-specific in each run
    assert ("| alexnet-2gpu | 3 | 2 of 3 | seed 0: b (0.30 / 0.60); seed 1: a (0.70 / 0.20); "
            "seed 2: none (0.40 / 0.45) |") in md
    assert "one-gpu-half |" not in md.split("## Fig. 3")[1].split("##")[0]  # one tower: no split to show
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 10_000


def test_verdicts_and_intervals():
    from replica.report import original_difference, seeds_needed, t_interval, verdict

    assert seeds_needed(0.2, 1.4) == 3 and seeds_needed(1.5, 1.7) == 6 and seeds_needed(None, 1.4) is None
    assert seeds_needed(0.5, None) is None and seeds_needed(100.0, 0.01) == 1001  # more than 1000 would not do

    assert verdict(1, None, None, 1.4) == "one seed: no interval"
    assert verdict(3, 0.9, 1.9, 1.4) == "reproduced"
    assert verdict(3, 1.5, 1.9, 1.4) == "reproduced"  # above the claim
    assert verdict(3, 0.1, 0.3, 0.4) == "smaller than claimed"
    assert verdict(3, -0.1, 0.3, 0.4) == "not distinguishable from seed noise"
    assert verdict(3, -0.5, -0.1, 0.4) == "reversed: the ablation is better"
    assert verdict(3, 0.1, 0.3, None) == "no number claimed"
    m, lo, hi, n = t_interval([1.0, 2.0])
    assert (m, n) == (1.5, 2) and abs(hi - 1.5 - 12.706204736 * 0.5 ** 0.5 / 2 ** 0.5) < 1e-6
    m, lo, hi, n = t_interval([1.0, 2.0, 3.0])  # sd 1; t(0.975, 2 df) = 4.3027 from the tables
    assert (m, n) == (2.0, 3) and abs(hi - 2.0 - 4.3027 / 3 ** 0.5) < 1e-4 and abs(2.0 - lo - (hi - 2.0)) < 1e-12
    # docs/spec.md §5: 148 − 145, 147 − 145, 145-half − 145-2010
    assert original_difference(("norm", False)) == (1.37, 1.15, "148 − 145")
    assert original_difference(("overlap", False)) == (0.40, 0.30, "147 − 145")
    assert original_difference(("variant", "one-gpu-half")) == (1.70, 1.23, "145-half − 145-2010")


def test_one_evidence_record_per_claim_and_the_legend_from_the_verdict_rules():
    """Each claim's record names a config that makes its change, a baseline recipe that exists, and
    original runs that are in the logs; the legend lists exactly the verdicts verdict() gives."""
    import itertools

    from replica.config import load_config
    from replica.report import CLAIMS, ORIGINAL, VERDICTS, verdict, verdict_legend

    for c in CLAIMS:
        assert getattr(load_config(c.config), c.key) == c.value != getattr(load_config(c.baseline), c.key), c.name
        assert c.baseline_run in ORIGINAL and (c.run is None or c.run in ORIGINAL)
    given = {verdict(n, lo, hi, claim) for n, (lo, hi), claim in itertools.product(
        (1, 3), ((-0.5, -0.1), (-0.1, 0.3), (0.1, 0.3), (0.9, 1.9)), (0.4, None))}
    assert given == {name for name, _ in VERDICTS}
    legend = verdict_legend()
    assert all(f"*{name}*" in legend for name in given) and legend.count("*") == 2 * len(VERDICTS)
