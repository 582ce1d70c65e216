"""The commands the README and the lab sheet give a student: each one line that bash
and PowerShell run alike, and each of the repository's commands takes its flags, so
that a renamed flag fails here rather than in a lesson."""
import argparse
import importlib
import re
import shlex

import pytest

from conftest import REPO

DOCS = ["README.md", "docs/lab.md"]
# what only one shell reads: a line continued, a variable, a pipe or a chain, and
# the commands a Windows student lacks
SHELL_ONLY = re.compile(r"\\$|\$|\||&&|;|`|^\s*\w+=|^\s*(timeout|export|sudo)\b")


def fenced_lines(name: str) -> list[str]:
    """Each line of the fenced code blocks of a Markdown file, comments dropped."""
    text = (REPO / name).read_text()
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = [(name, line) for name in DOCS for line in fenced_lines(name)]


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
        script = importlib.import_module(words[1].removesuffix(".py"))
        presets = {"laptop": ("", script.LAPTOP)} if hasattr(script, "LAPTOP") else {}
        train = getattr(script, script.__name__)

        def main(argv):
            script.cli.main(train, "", argv, presets=presets)

        argv = words[2:]
    with pytest.raises(Parsed):
        main(argv)


OURS = [
    (name, line) for name, line in COMMANDS
    if line.startswith(("python -m mindiffusion", "python train_"))
]


@pytest.mark.parametrize("name, line", OURS)
def test_each_of_our_commands_takes_its_flags(name, line, monkeypatch):
    dry_parse(monkeypatch, shlex.split(line))


def test_a_renamed_flag_fails_the_dry_parse(monkeypatch):
    dry_parse(monkeypatch, ["python", "train_mnist.py", "--laptop", "--cond"])
    with pytest.raises(SystemExit):
        dry_parse(monkeypatch, ["python", "train_mnist.py", "--lap-top"])


def test_the_docs_give_commands_to_check():
    assert len(OURS) >= 12
