"""`replica demo --tiny`: the whole loop in seconds, every artifact it names exists, and a rerun reuses."""
import re
from pathlib import Path

from replica.cli import main


def test_tiny_demo_runs_and_reruns_reusing_everything(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 0
    text = capsys.readouterr().out
    for f in ("synth/synth.json", "store/meta.json", "store/mean.npy", "store/pca.json", "store/mean.png",
              "run/config.yaml", "run/metrics.jsonl", "run/last.pt", "run/eval.json",
              "run/report.md", "run/curves.png", "run/filters.png"):
        assert (out / f).exists(), f
    assert "1-view" in text and "10-view" in text and "[4/4]" in text
    # the closing summary: every file it names exists, why the kernels look like noise, what to run next
    tail = text[text.index("done in"):]
    named = [w for w in tail.split() if w.startswith(str(out)) and "{" not in w]
    assert len(named) >= 8 and all(Path(w.rstrip(",")).exists() for w in named), named
    assert "too short to show it" in tail and "random start" in tail and "Next:" in tail
    assert "(float32; " in tail and "native bf16" in tail  # the precision and the machine the time was taken on
    for cmd in ("replica report", "replica filters", "replica predict", "replica prepare", "replica train"):
        assert cmd in tail, cmd
    assert "(bf16 autocast off: --fp32 given)" in text
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 0
    again = capsys.readouterr().out
    assert "(reused, " in again and "finished earlier, reused" in again


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


def test_a_demo_stopped_in_training_says_how_to_resume_and_evaluates_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the demo's training: saved, exit 1, no evaluation of a half-trained net; rerun resumes."""
    import replica.train as train_mod
    from runs_helpers import StopAfter

    out = tmp_path / "demo"
    monkeypatch.setattr(train_mod, "_Stop", lambda: StopAfter(2))  # before the second step
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 1
    text = capsys.readouterr().out
    assert f"run `replica demo --out {out} --fp32` again to resume it" in text
    assert (out / "run" / "last.pt").exists() and not (out / "run" / "eval.json").exists() and "[4/4]" not in text
    monkeypatch.undo()
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 0
    again = capsys.readouterr().out
    assert "(resuming)" in again and "[4/4]" in again and (out / "run" / "eval.json").exists()
    assert not (out / "run" / "best.pt").exists()  # save_best=false: one 456 MB write per epoch, not two
