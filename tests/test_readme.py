"""The README's anchors into the code: each [`file:N`](path#LN) `code` names a line
N of path that holds that code, so that the notes-to-code table cannot drift."""
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
