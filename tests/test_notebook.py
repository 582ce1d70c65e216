"""The lesson notebook, docs/lesson.ipynb: kept without outputs, and every code cell
runs top to bottom with the quick settings that its first cell reads, offline, so
that the notebook cannot rot."""
import json

from conftest import REPO

NOTEBOOK = REPO / "docs" / "lesson.ipynb"


def code_cells() -> list[dict]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [cell for cell in cells if cell["cell_type"] == "code"]


def top_level() -> list[str]:
    """The repository's top-level entries, but Python's and pytest's caches."""
    return sorted(
        path.name for path in REPO.iterdir()
        if path.name not in ("__pycache__", ".pytest_cache")
    )


def test_the_notebook_is_kept_without_outputs():
    cells = code_cells()
    assert len(cells) >= 6
    for cell in cells:
        assert cell["outputs"] == [] and cell["execution_count"] is None


def test_every_code_cell_runs_with_the_quick_settings(monkeypatch, no_network):
    monkeypatch.setenv("LESSON_QUICK", "1")
    # figures are drawn, never shown on a screen
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # the notebook moves to the repository's root; the test's folder comes back
    monkeypatch.chdir(REPO / "docs")
    namespace = {"__name__": "__main__"}
    before = top_level()
    for number, cell in enumerate(code_cells()):
        # a notebook's shell (!) and magic (%) lines are not Python
        lines = [
            line for line in cell["source"] if not line.lstrip().startswith(("!", "%"))
        ]
        exec(compile("".join(lines), f"lesson.ipynb cell {number}", "exec"), namespace)
    # the quick run trained, sampled and judged, and left nothing in the repository
    assert namespace["QUICK"] is True and namespace["step"] >= 1
    assert top_level() == before
    assert namespace["samples"].shape == (40, 1, 32, 32)
