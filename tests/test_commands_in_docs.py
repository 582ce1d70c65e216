"""The commands the pages and the scripts' docstrings give: each one line that bash
and PowerShell run alike; and each of the repository's commands on every page takes
its flags, checked against the parser of the door it names (a notes' script, or the
trainer and the other `python -m mindiffusion...` commands), so that a renamed flag
fails here rather than in a lesson."""
import argparse
import ast
import importlib
import re
import runpy
import shlex
import sys

import pytest

from conftest import REPO

# what only one shell reads: a line continued, a variable, a substitution, a pipe or
# a chain, a variable set before a command, and the commands PowerShell lacks
SHELL_ONLY = re.compile(r"\\$|\$|\||&&|;|`|^\s*\w+=\S*|^\s*(timeout|export|sudo)\b")
# the blocks of commands: plain, bash or PowerShell; not Python, CSV or output text
SHELLS = ("", "bash", "sh", "console", "powershell")
# every page that gives commands, and the scripts, whose docstrings give theirs
PAGES = ["README.md", "contents/README.md"] + sorted(
    f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")
)
SCRIPTS = ["train_mnist.py", "train_cifar10.py", "train_celeba.py"]


def fenced_lines(text: str) -> list[str]:
    """Each line of the shell blocks of Markdown text, comments dropped; a block
    that starts with #! is a file's text, such as a SLURM batch file, not lines to
    paste."""
    lines, language, block = [], None, []
    for line in text.splitlines():
        fence = re.match(r"\s*```(\w*)", line)
        if fence and language is None:
            language, block = fence.group(1), []
        elif fence:
            if language in SHELLS and not (block and block[0].startswith("#!")):
                lines += [kept for kept in map(command_of, block) if kept]
            language = None
        else:
            block.append(line)
    return lines


def command_of(line: str) -> str:
    """A line of a block without its comment: empty for a comment line."""
    return "" if line.lstrip().startswith("#") else line.split(" #")[0].strip()


def docstring_lines(name: str) -> list[str]:
    """The commands a script's docstring gives, in backquotes or on lines of their
    own: each from `python` to the quote or the line's end."""
    doc = ast.get_docstring(ast.parse((REPO / name).read_text()))
    commands = re.findall(r"(?:^|`)\s*(python [^`\n]*)", doc, re.M)
    return [command.strip() for command in commands]


COMMANDS = [
    *((name, line) for name in PAGES
      for line in fenced_lines((REPO / name).read_text())),
    *((name, line) for name in SCRIPTS for line in docstring_lines(name)),
]


@pytest.mark.parametrize("name, line", COMMANDS)
def test_each_command_is_one_line_for_any_shell(name, line):
    assert not SHELL_ONLY.search(line), (name, line)


def test_a_planted_continuation_or_prefix_is_caught():
    page = (REPO / "docs/guidance.md").read_text()
    assert not any(SHELL_ONLY.search(line) for line in fenced_lines(page))
    # a flag moved to a line of its own, as a bash user would write it
    planted = page.replace(" --guide-w 0\n", " \\\n    --guide-w 0\n", 1)
    assert planted != page
    assert any(SHELL_ONLY.search(line) for line in fenced_lines(planted))
    assert SHELL_ONLY.search("CELEBA_PATH=faces python train_celeba.py")
    assert SHELL_ONLY.search("timeout 300 python -m mindiffusion.train mnist")
    assert not SHELL_ONLY.search(".venv\\Scripts\\Activate.ps1")
    # a SLURM batch file is a file's text, not lines to paste
    assert fenced_lines("```bash\n#!/bin/bash\nX=$(date)\n```\n") == []


class Parsed(Exception):
    """A dry parse's end: the flags were read, and nothing was done with them."""


def dry_parse(monkeypatch, words: list[str]) -> None:
    """Parse a command line of the repository's as its command would, and stop."""
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if words[:2] == ["python", "-m"]:
        module = importlib.import_module(words[2])
        if not hasattr(module, "main"):
            module = importlib.import_module(f"{words[2]}.command")
        main, argv = module.main, words[3:]
    else:
        # a notes' script: its own parser, under `if __name__ == "__main__":`
        def main(argv):
            monkeypatch.setattr(sys, "argv", [words[1], *argv])
            runpy.run_path(str(REPO / words[1]), run_name="__main__")

        argv = words[2:]
    with pytest.raises(Parsed):
        main(argv)


OURS = [
    (name, line) for name, line in COMMANDS
    if name in PAGES and line.startswith(("python -m mindiffusion", "python train_"))
]


@pytest.mark.parametrize("name, line", OURS)
def test_each_of_our_commands_takes_its_flags(name, line, monkeypatch):
    dry_parse(monkeypatch, shlex.split(line))


def test_a_renamed_flag_fails_the_dry_parse(monkeypatch):
    trainer = ["python", "-m", "mindiffusion.train", "mnist"]
    dry_parse(monkeypatch, [*trainer, "--laptop", "--cond"])
    with pytest.raises(SystemExit):
        dry_parse(monkeypatch, [*trainer, "--lap-top"])
    # each door its own parser: the trainer's flags are not the script's
    dry_parse(monkeypatch, ["python", "train_mnist.py", "--epochs", "1"])
    with pytest.raises(SystemExit):
        dry_parse(monkeypatch, ["python", "train_mnist.py", "--laptop"])


def test_the_docs_give_commands_to_check():
    assert len(OURS) >= 12
