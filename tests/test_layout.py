"""The package's layout: the DDPM at the top imports nothing else of the package, the
run's machinery in training/ imports no command, no import circle anywhere (imports
inside functions included), no module too long to read, and no tracked file that
names what a clone of the repository lacks."""
import ast
import re
import subprocess
from pathlib import Path

from conftest import REPO

# the DDPM of the notes with its two noise models, and DDIM beside it
CORE = {"ddpm", "unet", "dummy", "ddim"}
# the subpackage of the trainer's machinery
MACHINERY = "training"
MAX_LINES = {"default": 350, "cli.py": 200}
# the four of the DDPM, seven commands (the trainer among them), and fid's frechet
MAX_TOP_MODULES = 12
# the machinery's modules, __init__ included: one whole idea each
MAX_MACHINERY_MODULES = 12


def module_names(package: Path) -> dict[str, Path]:
    """Each module of the package under `package`, by dotted name."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that the module `name` imports, wherever in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module, else the package
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        found |= {target for target in targets if target in modules}
    return found - {name}


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the modules along it, or None."""
    state = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def layout_problems(package: Path) -> list[str]:
    """What breaks the package's layout rules, one sentence each."""
    modules = module_names(package)
    top = package.name
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    core = {f"{top}.{name}" for name in CORE}
    machinery = f"{top}.{MACHINERY}"

    def kind(name: str) -> str:
        if name in core:
            return "core"
        if name == machinery or name.startswith(machinery + "."):
            return "machinery"
        return "package" if name == top else "command"

    problems = []
    if found := circle(graph):
        problems.append(f"import circle: {' -> '.join(found)}")
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if kind(name) == "core" and kind(target) != "core":
                problems.append(f"{name}, the DDPM, imports {target}")
            if kind(name) == "machinery" and kind(target) == "command":
                problems.append(f"{name}, the machinery, imports the command {target}")
    tops = [
        path.stem for path in package.iterdir()
        if path.name != "__init__.py" and path.name != MACHINERY
        and (path.suffix == ".py" or (path / "__init__.py").exists())
    ]
    if len(tops) > MAX_TOP_MODULES:
        problems.append(f"{len(tops)} modules at the top: {', '.join(sorted(tops))}")
    inside = [name for name in modules if kind(name) == "machinery"]
    if len(inside) > MAX_MACHINERY_MODULES:
        problems.append(f"{len(inside)} modules in {MACHINERY}/")
    for path in modules.values():
        limit = MAX_LINES.get(path.name, MAX_LINES["default"])
        if (lines := len(path.read_text().splitlines())) > limit:
            problems.append(f"{path.relative_to(package.parent)}: {lines} lines")
    return problems


def test_the_package_keeps_its_layout():
    assert layout_problems(REPO / "mindiffusion") == []


def scripts_imported(package: Path) -> list[str]:
    """Each import of a notes' script (train_*.py) by a module of the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            found += [f"{path.name}: {name}" for name in names
                      if name.split(".")[0] in SCRIPTS]
    return found


SCRIPTS = {"train_mnist", "train_cifar10", "train_celeba"}


def test_the_package_imports_no_script(tmp_path):
    assert scripts_imported(REPO / "mindiffusion") == []
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from train_mnist import DummyEpsModel\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    import train_celeba\n")
    assert scripts_imported(tmp_path / "pkg") == [
        "a.py: train_mnist", "b.py: train_celeba"
    ]


def test_the_ddpm_and_the_commands_are_where_the_readme_says():
    top = {path.stem for path in (REPO / "mindiffusion").iterdir()}
    assert CORE | {"sample", "fid", "figures", "export", "bench", MACHINERY} <= top


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


def test_a_circle_inside_a_function_is_found(tmp_path):
    package = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/ddpm.py": "",
        "pkg/training/__init__.py": "",
        "pkg/training/a.py": "from pkg.training import b\n",
        "pkg/training/b.py": "def f():\n    from pkg.training.c import g\n",
        "pkg/training/c.py": "from . import a\n",
    })
    assert layout_problems(package) == [
        "import circle: pkg.training.a -> pkg.training.b -> pkg.training.c -> "
        "pkg.training.a"
    ]


def test_imports_against_the_direction_are_found(tmp_path):
    package = write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/ddpm.py": "import pkg.training.run\n",
        "pkg/unet.py": "def f():\n    from pkg import sample\n",
        "pkg/sample.py": "",
        "pkg/training/__init__.py": "",
        "pkg/training/run.py": "from ..sample import draw\n",
    })
    assert layout_problems(package) == [
        "pkg.ddpm, the DDPM, imports pkg.training.run",
        "pkg.training.run, the machinery, imports the command pkg.sample",
        "pkg.unet, the DDPM, imports pkg.sample",
    ]


def test_long_modules_and_a_crowded_top_are_found(tmp_path):
    files = {f"pkg/command{i}.py": "" for i in range(MAX_TOP_MODULES + 1)}
    files["pkg/__init__.py"] = ""
    files["pkg/training/__init__.py"] = ""
    files["pkg/training/cli.py"] = "x = 1\n" * 201
    files.update({f"pkg/training/idea{i}.py": "" for i in range(MAX_MACHINERY_MODULES)})
    package = write(tmp_path, files)
    problems = layout_problems(package)
    assert problems[0].startswith(f"{MAX_TOP_MODULES + 1} modules at the top")
    assert problems[1:] == [
        f"{MAX_MACHINERY_MODULES + 2} modules in training/",
        "pkg/training/cli.py: 201 lines",
    ]


# what a clone lacks: the folder beside the repository that development used, and a
# development machine's own folder; written in pieces, so that this file is clean
SIBLING = (".." + "/shared").encode()
MACHINE = re.compile(rb"(?<![\w.])" + re.escape(("." + "gpu").encode()) + rb"\b")


def tracked_files(repo: Path) -> list[Path]:
    """The files git tracks in repo, or where it is no git checkout, every file but
    git's, Python's caches and the datasets."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True
        ).stdout.decode().split("\0")
        return [repo / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        skipped = {".git", "__pycache__", "data", ".pytest_cache"}
        return [
            path for path in repo.rglob("*")
            if path.is_file() and not skipped & set(path.relative_to(repo).parts)
        ]


def names_outside(repo: Path) -> list[str]:
    """FILE:LINE of each line of a tracked file that names what a clone lacks."""
    found = []
    for path in tracked_files(repo):
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if SIBLING in line or MACHINE.search(line):
                found.append(f"{path.relative_to(repo)}:{n}")
    return found


def test_no_tracked_file_names_what_a_clone_lacks():
    assert names_outside(REPO) == []


def test_the_check_finds_both_names_and_spares_lookalikes(tmp_path):
    (tmp_path / "README.md").write_text(
        "python judge.py " + ".." + "/shared/tools\n"
        "pytest.mark.cuda, GPU, my.gpus, cache.gpu_x\n"
        "--data-root " + "." + "gpu/mnist\n"
    )
    assert names_outside(tmp_path) == ["README.md:1", "README.md:3"]
