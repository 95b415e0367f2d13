"""The docs stay honest: the files docs/extending.md and docs/architecture.md name exist, every relative
link in README.md and docs/ resolves (to a file, and to a heading when it names one), and the README
stays short enough to read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").rglob("*.md"))
README_LIMIT = 12_500  # bytes

# A repository path in backticks: `src/vlmprune/importance/builtin.py`, `tests/`, `configs/study/paper.yaml`.
REPO_PATH = re.compile(r"`((?:src|tests|docs|configs|benchmarks|scripts)/[^`\s]*)`")
# A markdown link or image: [text](target) / ![alt](target); the target ends at whitespace or ')'.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _named_paths(page: Path) -> list[str]:
    return sorted(set(REPO_PATH.findall(page.read_text())))


def _relative_links(page: Path) -> list[tuple[str, str]]:
    """(file, anchor) of every relative link; file is '' for a link within the page."""
    text = FENCE.sub("", page.read_text())  # code blocks hold commands, not links
    links = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:, ...
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to '-',
    repeats numbered."""
    anchors, counts = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


@pytest.mark.parametrize("name", ["extending.md", "architecture.md"])
def test_every_repository_path_the_page_names_exists(name):
    page = ROOT / "docs" / name
    named = _named_paths(page)
    assert named, f"docs/{name} names no repository path; has the pattern stopped matching?"
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"docs/{name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for file, anchor in _relative_links(page):
        target = page.parent / file if file else page
        if not target.exists():
            broken.append(f"{file} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{file}#{anchor} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)} has broken links: {broken}"


def test_readme_is_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT, f"README.md is {size:,} bytes; keep it under {README_LIMIT:,} and move detail to docs/"


def test_the_checks_catch_what_they_are_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page: `its` title\n\n## Part, one\n\n## Part, one\n\n"
                    "See `src/vlmprune/no_such_module.py` and [a page](no-such-page.md#part), "
                    "[the web](https://example.org), [here](#anchor).\n\n"
                    "```\n# not a heading\n[not a link](x.md)\n```\n")
    assert _named_paths(page) == ["src/vlmprune/no_such_module.py"]
    assert _relative_links(page) == [("no-such-page.md", "part"), ("", "anchor")]
    assert _anchors(page) == {"a-page-its-title", "part-one", "part-one-1"}
