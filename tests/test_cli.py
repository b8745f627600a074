"""The command line as a user meets it, and the promise that CI runs the README's test command."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from replica.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [["replica", "--help"], [sys.executable, "-m", "replica", "--help"]])
def test_help_lists_subcommands(argv):
    if argv[0] == "replica":
        exe = Path(sys.executable).parent / "replica"
        if not exe.exists():
            pytest.skip("the console script is not installed in this environment (pip install -e .)")
        argv = [str(exe), "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "model" in out and "usage: replica" in out


def test_model_command_prints_the_table(capsys):
    assert main(["model", "--devices", "cpu", "--classes", "10", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 56,909,194" in out  # 60,965,224 less fc8 for 990 fewer classes
    for layer in ("conv1a", "conv1b", "conv3b", "fc6a", "fc8"):
        assert layer in out
    assert "256×13×13" in out  # conv3 reads both towers
    assert re.search(r"train step \(forward \+ backward, batch 2\): [0-9.]+ s", out)


def test_model_command_shows_a_narrow_net_as_such(capsys):
    assert main(["model", "--devices", "cpu", "--classes", "10", "--batch", "0", "--width", "0.0625"]) == 0
    out = capsys.readouterr().out
    assert "width=0.0625 (not the paper's net)" in out.splitlines()[0]
    assert "parameters: 227,314" in out and "16×13×13" in out  # conv3 still reads both towers (8 + 8)


def test_model_command_half_variant_count(capsys):
    assert main(["model", "--devices", "cpu", "--variant", "one-gpu-half", "--batch", "0"]) == 0
    assert "parameters: 59,798,312" in capsys.readouterr().out


def test_model_command_takes_a_config_and_overrides_as_train_does(capsys):
    """The same net from the flags, from key=value, and from a YAML config plus key=value."""
    heads = []
    for argv in (["--variant", "one-gpu-half", "--no-overlap", "--width", "0.125"],
                 ["variant=one-gpu-half", "overlap=false", "width=0.125"],
                 ["no-overlap", "variant=one-gpu-half", "width=0.125"]):  # configs/no-overlap.yaml
        assert main(["model", "--devices", "cpu", "--batch", "0", *argv]) == 0
        heads.append(capsys.readouterr().out.splitlines()[0])
    assert len(set(heads)) == 1 and "variant=one-gpu-half norm=True overlap=False" in heads[0] and "width=0.125" in heads[0]
    assert main(["model", "--batch", "0", "--preset", "paper-text", "preset=as-run"]) == 0  # key=value wins
    assert "preset=as-run" in capsys.readouterr().out
    for argv, said in ((["presett=as-run"], "did you mean 'preset'"), (["width=-1"], "width: expected a positive"),
                       (["a", "b"], "one CONFIG")):
        assert main(["model", "--batch", "0", *argv]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`replica model | head -1` where the reader has gone: exit 141 (SIGPIPE's code), no traceback.
    The pipe's reading end is closed before the command starts, so its first write fails."""
    import os

    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "replica", "model", "--devices", "cpu", "--width", "0.0625",
                            "--batch", "0"], stdout=w, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 141 and "Traceback" not in p.stderr, p.stderr


def test_user_mistakes_are_one_line_errors(capsys):
    assert main(["model", "--devices", "cuda:7", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("replica: error: device 'cuda:7' does not exist")
    assert "\n" not in err and "Traceback" not in err
    assert main(["model", "--devices", "cpu,cpu", "--variant", "one-gpu-half", "--batch", "0"]) == 2
    assert "one tower" in capsys.readouterr().err
    assert main(["train", "data=/nowhere", "epochs=1"]) == 2  # overrides with no CONFIG before them
    err = capsys.readouterr().err.strip()
    assert "'data=/nowhere' is an override: give it after the CONFIG" in err and "\n" not in err


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if line.strip()]
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_train_names_only_the_files_it_left(store, tmp_path, capsys):
    from runs_helpers import TINY_ARGS

    for best in ("true", "false"):
        out = tmp_path / best
        assert main(["train", str(ROOT / "configs" / "alexnet-2gpu.yaml"), f"data={store}", *TINY_ARGS,
                     f"save_best={best}", "--out", str(out)]) == 0
        line = capsys.readouterr().out.splitlines()[-1]
        named = line.split("(")[1].rstrip(")").split(", ")
        assert line.startswith(f"finished: {out} (") and all((out / n).exists() for n in named), line
        assert ("best.pt" in named) == (best == "true")


def test_papercuts_version_verbose_anywhere_and_help_for_every_option(capsys):
    from replica import __version__
    from replica.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and f"replica {__version__}" in capsys.readouterr().out
    p = build_parser()
    assert p.parse_args(["stats", "x", "-v"]).verbose and p.parse_args(["-v", "stats", "x"]).verbose
    bare = [f"{name} {a.option_strings or a.dest}" for name, sp in p._subparsers._group_actions[0].choices.items()
            for a in sp._actions if not a.help and a.dest != "help"]
    assert bare == []


def test_predict_takes_a_folder_and_a_flat_folder_says_labels_are_missing(store, tmp_path, capsys):
    from runs_helpers import tiny

    from replica.train import train

    run = tmp_path / "run"
    train(tiny(store, epochs=1, steps_per_epoch=1), run, progress=False)
    capsys.readouterr()
    val = store.parent / "synth" / "val"
    n = len(list(val.rglob("*.jpg")))
    assert main(["predict", str(run), str(val), "--devices", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == n  # every image in the folder and its subfolders
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2
    assert "a folder with no image files" in capsys.readouterr().err
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(val.rglob("*.jpg"))[:3]:
        (flat / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
    assert main(["prepare", str(flat), str(tmp_path / "st")]) == 2
    assert "3 image files but no labels" in capsys.readouterr().err


def test_an_export_prints_its_result_not_the_exporters_chatter(tmp_path):
    pytest.importorskip("onnxscript")
    sys.path.insert(0, str(ROOT / "tests"))
    from test_weights import caffe_blobs, caffemodel

    (tmp_path / "ok.caffemodel").write_bytes(caffemodel(caffe_blobs()))
    assert main(["import", str(tmp_path / "ok.caffemodel"), "--out", str(tmp_path / "run"), "--mean", "1,2,3"]) == 0
    r = subprocess.run([sys.executable, "-m", "replica", "export", str(tmp_path / "run"), "--onnx",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("wrote ") and lines[1].startswith("checked with onnxruntime")


def test_model_command_counts_the_kernels_of_a_step_beside_torchvisions(capsys):
    """replica model prints the ops one training step dispatches, for the configured form (the
    grouped one dispatches fewer) and precision, beside torchvision's AlexNet."""
    counts = {}
    for form in ("false", "true"):
        assert main(["model", "--devices", "cpu", "--width", "0.0625", "--classes", "10", "--batch", "2",
                     f"grouped={form}"]) == 0
        m = re.search(r"kernels per training step: (\d+) \(torchvision's AlexNet: (\d+)\).*: (towers|grouped form), "
                      r"float32, eager norms", capsys.readouterr().out)
        assert m, "no kernel count"
        counts[m.group(3)] = int(m.group(1)), int(m.group(2))
    assert counts["grouped form"][0] < 0.65 * counts["towers"][0]
    assert counts["grouped form"][1] == counts["towers"][1] > 50  # torchvision's, the same both times
