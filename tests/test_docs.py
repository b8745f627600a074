"""The docs resolve inside the repository: every relative link, its anchor, and every file they cite."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITED = re.compile(r"(?<![\w./-])((?:replica|tests|tools|docs|configs)/[\w./-]*\w\.(?:py|md|yaml|sh|png|cfg))")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set:
    return {slug(line.lstrip("#")) for line in md.read_text().splitlines() if line.startswith("#")}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []


def test_every_cited_file_exists():
    missing = sorted({f"{doc.name}: {p}" for doc in DOCS for p in CITED.findall(doc.read_text())
                      if not (ROOT / p).exists() and not p.startswith("docs/gpu-runs/")})
    assert missing == []


def test_the_checks_can_fail():
    assert slug("## Caffe's trained AlexNet: filters") == "caffes-trained-alexnet-filters"
    assert CITED.findall("see `tests/test_analysis.py` and replica/model.py.") == ["tests/test_analysis.py",
                                                                                 "replica/model.py"]


def test_every_test_the_docs_name_exists():
    """A test named in the docs (`test_x`, `tests/f.py::test_x`, `test_x[param]`) is a test of the suite."""
    defined = {m for f in (ROOT / "tests").glob("*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    named = {(doc.name, n) for doc in DOCS for n in re.findall(r"(?<![\w/])(test_\w+)(?=[`\[:])", doc.read_text())}
    assert sorted(f"{d}: {n}" for d, n in named if n not in defined) == []
