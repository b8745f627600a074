"""`replica demo --tiny`: the whole loop in seconds, every artifact it names exists, and a rerun reuses."""
import re

from replica.cli import main


def test_tiny_demo_runs_and_reruns_reusing_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 0
    text = capsys.readouterr().out
    for f in ("synth/synth.json", "store/meta.json", "store/mean.npy", "store/pca.json", "store/mean.png",
              "run/config.yaml", "run/metrics.jsonl", "run/last.pt", "run/best.pt", "run/eval.json",
              "run/report.md", "run/curves.png", "run/filters.png"):
        assert (out / f).exists(), f
    assert "1-view" in text and "10-view" in text and "[4/4]" in text
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 0
    again = capsys.readouterr().out
    assert "(reused)" in again and "finished earlier, reused" in again


def test_demo_refuses_a_folder_left_by_another_recipe(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 0
    cfg = out / "run" / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^lr: .*$", "lr: 0.5", cfg.read_text()))
    capsys.readouterr()
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "another demo recipe" in err and "lr" in err and "--out NEW_FOLDER" in err
    (out / "synth" / "synth.json").write_text('{"generator": 0}')
    assert main(["demo", "--tiny", "--out", str(out / "other"), "--devices", "cpu"]) == 0  # a new folder works
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 2
    assert "--out NEW_FOLDER" in capsys.readouterr().err
