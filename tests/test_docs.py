"""The guide holds together: every relative link in README.md, docs/ and notes/ resolves, to a file
and, where it names one, to a heading of that file (GitHub's anchors); every chapter in docs/ is
linked from the README."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def guide_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "notes").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked out."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", lambda m: "`" + "x" * (len(m.group()) - 2) + "`", line))
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation other than '-' and '_'
    dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeated ones."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text, fenced = path.read_text(encoding="utf-8"), False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            base = anchor(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                links.append(target)
    return links


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and unquote(fragment).lower() not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    return broken


@pytest.mark.parametrize("path", guide_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)} has broken links: " + "; ".join(broken)


def test_every_chapter_is_linked_from_the_readme():
    readme = ROOT / "README.md"
    linked = {(ROOT / unquote(t.partition("#")[0])).resolve() for t in relative_links(readme)}
    chapters = sorted((ROOT / "docs").glob("*.md"))
    assert chapters, "docs/ holds no chapter"
    missing = [str(c.relative_to(ROOT)) for c in chapters if c.resolve() not in linked]
    assert not missing, "chapters the README does not link to: " + ", ".join(missing)


def test_the_checker_catches_what_it_should(tmp_path):
    (tmp_path / "a.md").write_text("# Hello, world: `x.py` (1)\n\n## Same\n\n## Same\n\n```\n# not a heading\n```\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md) [ok](a.md#hello-world-xpy-1) [ok](a.md#same-1) [ok](#here) [web](https://example.com/x)\n"
        "# Here\n"
        "[bad](missing.md) [bad](a.md#nope) [bad](a.md#not-a-heading) [bad](#there)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n")
    broken = broken_links(tmp_path / "b.md")
    assert [b.split()[0] for b in broken] == ["missing.md", "a.md#nope", "a.md#not-a-heading", "#there"]
