"""README.md and docs/ link only to files and headings that exist, never outside the repo."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def markdown_files():
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [ROOT / "README.md", *docs, ROOT / "bench" / "results.md"]


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    text = FENCE.sub("", path.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def broken_links(path):
    """Every relative link in `path` whose file, or whose #heading, does not exist."""
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](there.md#a-heading) [c](gone.md#x) [d](there.md#nope)\n")
    assert broken_links(page) == ["gone.md#x", "there.md#nope"]


def test_no_reference_to_files_outside_the_repository():
    outside = re.compile(r"\b(DESIGN|PITFALLS)\.md\b")
    roots = ["README.md", "docs", "bench", "configs", "launch"]
    hits = []
    for name in roots:
        base = ROOT / name
        for path in [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file()):
            text_file = path.suffix in {".md", ".yaml", ".yml", ".sh", ".json"}
            if text_file and outside.search(path.read_text()):
                hits.append(str(path.relative_to(ROOT)))
    assert hits == []
