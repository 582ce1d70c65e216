"""The README's anchors into the code: each [`file:N`](path#LN) `code` names a line
N of path that holds that code, so that the notes-to-code table cannot drift; and the
README stays short, its links to docs/ and the pages' links all reaching a file."""
import re

from conftest import REPO

# [`ddpm.py:10`](mindiffusion/ddpm.py#L10) `def ddpm_schedules`
ANCHOR = re.compile(r"\[`([^`:]+):(\d+)`\]\(([^)#]+)#L(\d+)\) `([^`]+)`")


def test_each_anchor_points_at_its_code():
    anchors = ANCHOR.findall((REPO / "README.md").read_text())
    assert len(anchors) >= 14
    for name, shown, path, line, code in anchors:
        assert path.endswith(name) and shown == line, (path, shown, line)
        lines = (REPO / path).read_text().splitlines()
        assert code in lines[int(line) - 1], (path, line, code)


# a relative link of Markdown, [text](path) or ![alt](path), without its #anchor
LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)")
MAX_README_WORDS = 2500


def broken_links(page) -> list[str]:
    """The relative links of a Markdown page that name no file or folder."""
    return [
        target for target in LINK.findall(page.read_text())
        if not (page.parent / target).exists()
    ]


def test_the_readme_is_short_and_its_pages_exist():
    readme = REPO / "README.md"
    assert len(readme.read_text().split()) <= MAX_README_WORDS
    pages = [target for target in LINK.findall(readme.read_text())
             if target.startswith("docs/")]
    assert len(pages) >= 9
    for page in [readme, *(REPO / "docs").glob("*.md")]:
        assert broken_links(page) == [], page


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text("[a](there.md) [b](missing.md#part) [c](https://x.org) [d](#top)")
    assert broken_links(page) == ["missing.md"]
