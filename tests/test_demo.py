"""`replica demo --tiny`: the whole loop in seconds, every artifact it names exists, and a rerun reuses."""
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
