"""`replica demo --tiny`: the whole loop in seconds, every artifact it names exists, and a rerun reuses."""
import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from replica.cli import main


@pytest.fixture(scope="module")
def fp32_demo(tmp_path_factory):
    """One tiny demo in float32 (the paper's net, 2 steps): (its folder, what it printed). The
    tests that change a demo folder copy it first."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"])
    assert code == 0, text.getvalue()[-3000:]
    return out, text.getvalue()


def test_tiny_demo_runs_and_reruns_reusing_everything(fp32_demo, capsys):
    out, text = fp32_demo
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


def test_demo_refuses_a_folder_left_by_another_recipe(fp32_demo, tmp_path, capsys, monkeypatch):
    import replica.train as train_mod
    from runs_helpers import StopAfter

    out = tmp_path / "demo"
    shutil.copytree(fp32_demo[0], out)
    cfg = out / "run" / "config.yaml"
    cfg.write_text(re.sub(r"(?m)^lr: .*$", "lr: 0.5", cfg.read_text()))
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 2
    err = capsys.readouterr().err
    assert "another demo recipe" in err and "lr" in err and "--out NEW_FOLDER" in err
    (out / "synth" / "synth.json").write_text('{"generator": 0}')
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu", "--fp32"]) == 2
    assert "--out NEW_FOLDER" in capsys.readouterr().err
    # a new folder is not refused: it is written, prepared and trained (stopped at its first step
    # here; test_a_demo_stopped_in_training... runs one to the end)
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(1))
    assert main(["demo", "--tiny", "--out", str(out / "other"), "--devices", "cpu", "--fp32"]) == 130  # a stop: SIGINT's 130
    text = capsys.readouterr().out
    assert "[1/4] dataset:" in text and "(written, " in text and "again to resume it" in text


def test_a_demo_stopped_in_training_says_how_to_resume_and_evaluates_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the demo's training: saved, exit 130, no evaluation of a half-trained net; rerun
    resumes. Without --fp32: bf16 autocast where the CPU has native bf16, as a user's first demo."""
    import replica.train as train_mod
    from replica.runtime import fast_bf16
    from runs_helpers import StopAfter

    out = tmp_path / "demo"
    monkeypatch.setattr(train_mod, "StopSignals", lambda: StopAfter(2))  # before the second step
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 130
    text = capsys.readouterr().out
    assert f"run `replica demo --out {out}` again to resume it" in text
    assert ("(bf16 autocast on)" if fast_bf16("cpu") else "(bf16 autocast off: no native bf16 on cpu)") in text
    assert (out / "run" / "last.pt").exists() and not (out / "run" / "eval.json").exists() and "[4/4]" not in text
    monkeypatch.undo()
    assert main(["demo", "--tiny", "--out", str(out), "--devices", "cpu"]) == 0
    again = capsys.readouterr().out
    assert "(resuming)" in again and "[4/4]" in again and (out / "run" / "eval.json").exists()
    assert not (out / "run" / "best.pt").exists()  # save_best=false: one 456 MB write per epoch, not two
