"""The docs cannot drift: docs/results.md and the README's tables equal what bench/results/*.json hold, every
anchor the code points at exists, and the README stays a short user's guide. Fast; no ComfyUI needed."""
import re
from pathlib import Path

import pytest

from tools import results_doc

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
README_MAX_WORDS = 2000
# Anchors of docs/results.md that code comments point at (a default's evidence lives there, not in comments).
RESULTS_ANCHORS = ("patience", "retry-above", "relative-floor", "start-tolerance", "tolerance-floor",
                   "refine-passes", "max-model-calls-per-step", "solver", "substeps", "auto-dtype", "momentum",
                   "decoder-defaults", "preciseinv-defaults", "rf-defaults", "shooting-runs", "cfg-pp",
                   "sampler-table", "exact-trained", "watermark", "tolerance", "max-iterations", "cfg-pp-label",
                   "cfg-pp-shooting-runs", "optimizer", "lr", "rf-sde", "p-value-plugin", "wrong-keys")
DOC_LINK = re.compile(r"docs/(\w+\.md)#([\w-]+)")
MARKER = re.compile(r"(?<!`)<!-- [\w.]+\.json:[^>]*-->")


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = path.read_text()
    headings = {github_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return headings | set(re.findall(r'<a id="([\w-]+)"></a>', text))


@pytest.mark.parametrize("document", results_doc.DOCUMENTS, ids=lambda p: p.name)
def test_generated_tables_match_results(document):
    text = document.read_text()
    assert results_doc.regenerate(text) == text, (
        f"{document.name}: a generated table differs from bench/results; run python tools/results_doc.py")


@pytest.mark.parametrize("document", results_doc.DOCUMENTS, ids=lambda p: p.name)
def test_marked_figures_match_results(document):
    text = document.read_text()
    assert results_doc.figure_errors(text, document.name) == []
    parsed = {m.group(0)[m.group(0).index("<!--"):] for m in results_doc.FIGURE.finditer(text)}
    unparsed = [m for m in MARKER.findall(text) if m not in parsed]
    assert unparsed == [], f"markers with no number right before them: {unparsed}"


def test_results_doc_has_every_anchor():
    missing = set(RESULTS_ANCHORS) - anchors(RESULTS_DOC)
    assert not missing, f"docs/results.md lacks anchors {sorted(missing)}"


def test_every_docs_link_in_the_repository_resolves():
    """Each `docs/<file>.md#anchor` written in code or docs names an existing file and anchor."""
    broken = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".md") or any(p.startswith(".") for p in path.relative_to(ROOT).parts):
            continue
        for name, anchor in DOC_LINK.findall(path.read_text(errors="replace")):
            target = ROOT / "docs" / name
            if not target.exists() or anchor not in anchors(target):
                broken.append(f"{path.relative_to(ROOT)}: docs/{name}#{anchor}")
    for path in (ROOT / "docs").glob("*.md"):     # relative links between the docs
        for name, anchor in re.findall(r"\]\((\w+\.md)#([\w-]+)\)", path.read_text()):
            target = path.parent / name
            if not target.exists() or anchor not in anchors(target):
                broken.append(f"{path.relative_to(ROOT)}: {name}#{anchor}")
    assert broken == []


def test_readme_is_a_short_guide():
    words = len(README.read_text().split())       # what `wc -w` counts, code blocks included
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS})"


def test_readme_local_links_exist():
    targets = re.findall(r"\]\(((?!https?:)[^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert targets and missing == []
