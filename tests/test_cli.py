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


def test_user_mistakes_are_one_line_errors(capsys):
    assert main(["model", "--devices", "cuda:7", "--batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("replica: error: device 'cuda:7' does not exist")
    assert "\n" not in err and "Traceback" not in err
    assert main(["model", "--devices", "cpu,cpu", "--variant", "one-gpu-half", "--batch", "0"]) == 2
    assert "one tower" in capsys.readouterr().err


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
