"""The README stays a short page a newcomer reads top to bottom, and the docs/ pages it leads to stay reachable:
no relative link points at a file that is not there, and every docs page is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 220
README_HEAD_LINES = 30

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans: what renders as Markdown, not as code."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def relative_links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, the file or directory it points to, its #anchor or "") for each relative link."""
    found = []
    for link in links(page):
        if EXTERNAL.match(link):
            continue
        target, _, anchor = link.partition("#")
        found.append((link, (page.parent / target).resolve() if target else page.resolve(), anchor))
    return found


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: link text for links, lower case, punctuation dropped (but - and _), spaces
    to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M)}


def test_there_are_docs_pages():
    assert DOCS, "docs/*.md is empty"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move details to a docs/ page and link it")


@pytest.mark.parametrize("command", ["make demo", "make test"])
def test_readme_starts_with_the_two_commands(command):
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:README_HEAD_LINES])
    assert command in head, f"README.md's first {README_HEAD_LINES} lines do not mention `{command}`"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_to_files_that_exist(page):
    broken = [link for link, target, _ in relative_links(page) if not target.exists()]
    assert not broken, f"{_rel(page)}: links to missing files: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_anchors_into_markdown_pages_name_a_heading(page):
    broken = [link for link, target, anchor in relative_links(page)
              if anchor and target.suffix == ".md" and target.is_file() and anchor not in anchors(target)]
    assert not broken, f"{_rel(page)}: links to headings that do not exist: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {target for _, target, _ in relative_links(README)}
    missing = [_rel(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link these docs pages: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_each_docs_page_has_one_title(page):
    titles = re.findall(r"^# .*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    assert len(titles) == 1, f"{_rel(page)}: one `# ` title per page, found {titles}"


def test_the_link_reader_sees_what_renders_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](x.md) ![img](pic.png \"title\") [b](y.md#part) [c](https://example.org) [d](#top)\n"
                    "`[not](code.md)` [e](mailto:someone@example.org)\n"
                    "```bash\n[no](fenced.md)\n```\n"
                    "[ref]: ../z.md\n", encoding="utf-8")
    assert links(page) == ["x.md", "pic.png", "y.md#part", "https://example.org", "#top",
                           "mailto:someone@example.org", "../z.md"]
    assert [(link, anchor) for link, _, anchor in relative_links(page)] == [
        ("x.md", ""), ("pic.png", ""), ("y.md#part", "part"), ("#top", "top"), ("../z.md", "")]
    assert github_anchor("What was verified here, and what only on paper") == \
        "what-was-verified-here-and-what-only-on-paper"
    assert github_anchor("Serving: `embedforge serve` and `embedforge embed`") == \
        "serving-embedforge-serve-and-embedforge-embed"
    assert github_anchor("What `make demo` leaves behind") == "what-make-demo-leaves-behind"
    assert github_anchor("Losses: `--loss weighted-mse | in-batch`") == "losses---loss-weighted-mse--in-batch"
