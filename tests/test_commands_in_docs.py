"""The commands the README and the lab sheet give a student: each one line that bash
and PowerShell run alike; and each of the repository's commands on every page takes
its flags, checked against the parser of the door it names (a notes' script, or the
trainer and the other `python -m mindiffusion...` commands), so that a renamed flag
fails here rather than in a lesson."""
import argparse
import importlib
import re
import runpy
import shlex
import sys

import pytest

from conftest import REPO

DOCS = ["README.md", "docs/lab.md"]
# what only one shell reads: a line continued, a variable, a pipe or a chain, and
# the commands a Windows student lacks
SHELL_ONLY = re.compile(r"\\$|\$|\||&&|;|`|^\s*\w+=|^\s*(timeout|export|sudo)\b")


def fenced_lines(name: str, joined: bool = False) -> list[str]:
    """Each line of the fenced code blocks of a Markdown file, comments dropped;
    `joined`, each line continued with a backslash joined to the next."""
    text = (REPO / name).read_text()
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        if joined:
            block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = [(name, line) for name in DOCS for line in fenced_lines(name)]
# every page that gives commands
PAGES = [*DOCS, "contents/README.md"] + sorted(
    f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")
    if f"docs/{page.name}" not in DOCS
)


@pytest.mark.parametrize("name, line", COMMANDS)
def test_each_command_is_one_line_for_any_shell(name, line):
    assert not SHELL_ONLY.search(line), (name, line)


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
    (name, line) for name in PAGES for line in fenced_lines(name, joined=True)
    if line.startswith(("python -m mindiffusion", "python train_"))
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
