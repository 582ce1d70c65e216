"""The 5,000 real MNIST digits that ship with the repository: torchvision reads them
as they are, and the commands that fall back to them do so only where --data-root
has no MNIST of its own."""
import collections

import pytest
from torchvision.datasets import MNIST

from mindiffusion.judge import command as judge_command
from mindiffusion.training.recipes import LAPTOP
from mindiffusion.training.data import (
    MNIST_FILES,
    SHIPPED_DIGITS,
    has_mnist,
    mnist_root,
)


@pytest.mark.parametrize("train, each", [(True, 400), (False, 100)])
def test_the_shipped_digits_load_with_torchvision_as_they_are(train, each):
    digits = MNIST(SHIPPED_DIGITS, train=train)
    counts = collections.Counter(int(label) for label in digits.targets)
    assert counts == {digit: each for digit in range(10)}
    image, _ = digits[0]
    assert image.size == (28, 28)


def fake_mnist(root):
    """A folder where torchvision's MNIST files stand, as a download leaves them."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).write_bytes(b"")
    return root


def test_the_fallback_is_taken_only_where_there_is_no_mnist(tmp_path):
    assert has_mnist(SHIPPED_DIGITS)
    assert mnist_root(str(tmp_path / "empty")) == SHIPPED_DIGITS
    full = fake_mnist(tmp_path / "full")
    assert mnist_root(str(full)) == str(full)
    # a download cut short leaves some files only
    (full / "MNIST" / "raw" / MNIST_FILES[-1]).unlink()
    assert mnist_root(str(full)) == SHIPPED_DIGITS


def test_judge_train_learns_from_the_shipped_digits_without_mnist(
    tmp_path, monkeypatch
):
    roots = []
    monkeypatch.setattr(judge_command, "train", lambda root, *args: roots.append(root))
    out = str(tmp_path / "judge.pth")
    # by default ./data, here without MNIST: the shipped digits
    monkeypatch.chdir(tmp_path)
    judge_command.main(["--train", "--out", out])
    # a --data-root given is taken as it is, MNIST there or to be downloaded there
    full = fake_mnist(tmp_path / "full")
    judge_command.main(["--train", "--out", out, "--data-root", str(full)])
    empty = tmp_path / "empty"
    empty.mkdir()
    judge_command.main(["--train", "--out", out, "--data-root", str(empty)])
    assert roots == [SHIPPED_DIGITS, str(full), str(empty)]


def test_laptop_reads_mnist_where_it_is_else_the_shipped_digits():
    assert LAPTOP["data_root"] == mnist_root("./data")
