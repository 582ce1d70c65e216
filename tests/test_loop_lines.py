"""What you read is what runs: in the trainer's loop, the notes' calls do only what
they say, with every flag on, and each file of the run comes from a line of the
loop's page (mindiffusion/train.py); the trainer called twice in one process starts
afresh each time and lets go of its folder when it returns."""
import os
import subprocess
import sys
import traceback

import pytest
import torch

from torch.utils.data import DataLoader

from conftest import REPO, narrow_unets
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import grids
from test_long_runs import FLAGS, SMALL_MNIST, train

# the trainer's page, whose lines each file of a run is traced to
LOOP = os.path.join("mindiffusion", "train.py")


# while a notes' call runs, the depth of such calls: any write then is refused
forbidden = []
# each write under the folder watched: the loop's line on the stack behind it
writes = {"folder": None, "lines": []}


def innermost_loop_line() -> str | None:
    """The line of the trainer's page that the stack passes through last."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.endswith(LOOP):
            return frame.line.strip()
    return None


def is_write(event: str, args: tuple) -> bool:
    if event in ("os.rename", "os.replace", "os.remove", "os.mkdir"):
        return True
    if event != "open":
        return False
    mode, flags = args[1], args[2]
    by_mode = isinstance(mode, str) and any(m in mode for m in "wax+")
    by_flags = isinstance(flags, int) and bool(
        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    )
    return by_mode or by_flags


def watch_writes(event: str, args: tuple) -> None:
    """An audit hook: refuse every write during a notes' call, and note the loop's
    line behind each write under the folder watched."""
    if not is_write(event, args):
        return
    if forbidden:
        raise PermissionError(f"{event} {args[0]} during a notes' call")
    path = args[1] if event in ("os.rename", "os.replace") else args[0]
    folder = writes["folder"]
    if folder and isinstance(path, str) and os.path.abspath(path).startswith(folder):
        writes["lines"].append((innermost_loop_line(), os.path.basename(path)))


sys.addaudithook(watch_writes)


def writing_refused(call):
    """`call`, during which every file write raises PermissionError."""

    def refused(*args, **kwargs):
        forbidden.append(call)
        try:
            return call(*args, **kwargs)
        finally:
            forbidden.pop()

    return refused


def batches_with_writing_refused(iterate):
    """DataLoader.__iter__, each of whose batches is made with writes refused."""

    def refused(self):
        batches = iterate(self)
        while True:
            forbidden.append(iterate)
            try:
                x, c = next(batches)
            except StopIteration:
                return
            finally:
                forbidden.pop()
            yield x, c

    return refused


def grids_drawn(monkeypatch) -> list:
    """While monkeypatch lasts, each grid's (sampler, number of samples, samples)."""
    drawn = []
    walk = grids.walk

    def kept(sampler, n_sample, *args):
        xh = walk(sampler, n_sample, *args)
        drawn.append((sampler, n_sample, xh))
        return xh

    monkeypatch.setattr(grids, "walk", kept)
    return drawn


SCRIPTS = [("mnist", SMALL_MNIST, 16), ("cifar10", [], 8),
           ("celeba", [], 8)]


@pytest.mark.parametrize("script, flags, n_grid", SCRIPTS)
def test_the_notes_calls_write_nothing_and_the_loop_s_lines_write_it_all(
    script, flags, n_grid, tmp_path, monkeypatch, capsys
):
    narrow_unets(monkeypatch)
    drawn = grids_drawn(monkeypatch)
    for cls, name in [(DDPM, "forward"), (DDPM, "sample"), (DDIM, "sample"),
                      (torch.optim.Adam, "step")]:
        monkeypatch.setattr(cls, name, writing_refused(getattr(cls, name)))
    monkeypatch.setattr(
        DataLoader, "__iter__", batches_with_writing_refused(DataLoader.__iter__)
    )
    out = tmp_path / "out"
    monkeypatch.setitem(writes, "folder", str(out))
    monkeypatch.setitem(writes, "lines", [])
    argv = [*FLAGS.split(), *flags, "--epochs", "2", "--out", str(out), "--cond"]
    argv += ["--ema", "0.9", "--grid-sampler", "ddim", "--grid-steps", "2"]
    assert train(script, [*argv, "--save-every", "1"], capsys)[0] == 0
    # under --cond, a row of 4 for each of the ten classes, as many as asked
    assert [(n, len(xh)) for _, n, xh in drawn] == [(40, 40), (40, 40)]
    # the folder, the lock, the checkpoint, the record and the grids, each from a
    # line of the loop's page that says it: no notes' line writes
    lines = {line for line, _ in writes["lines"]}
    assert lines == {
        "output_folder(args.out)",
        "stack.callback(release, hold_lock(path))",
        "checkpoint.save(i, batches)",
        "checkpoint.save(i + 1, rng=rng)",
        "grids.write(os.path.join(args.out, recipe.grids.format(i)), grid,",
        "with contextlib.ExitStack() as stack:",
    }
    written = {name for _, name in writes["lines"]}
    assert {path.name for path in out.iterdir()} <= written
    assert len([name for name in written if name.endswith(".png")]) == 2


@pytest.mark.parametrize("script, flags, n_grid", SCRIPTS)
def test_the_grid_is_n_samples_of_the_model(
    script, flags, n_grid, tmp_path, monkeypatch, capsys
):
    narrow_unets(monkeypatch)
    drawn = grids_drawn(monkeypatch)
    out = tmp_path / "out"
    argv = [*FLAGS.split(), *flags, "--epochs", "1", "--out", str(out)]
    assert train(script, argv, capsys)[0] == 0
    ((sampler, n_sample, xh),) = drawn
    # without flags, the grid's sampler is the model itself, asked for the notes'
    # number of samples, and what it returns is that model's own sample
    assert n_sample == n_grid and len(xh) == n_grid
    assert type(sampler).__name__ == "DDPM"
    (path,) = out.glob("*.pth")
    state = torch.load(path, weights_only=True)
    assert all(
        torch.equal(value, state["model"][name])
        for name, value in sampler.state_dict().items()
    )


TWICE = """
import subprocess, sys
from mindiffusion.train import train


def resume_from_another_process(out, *flags):
    argv = [sys.executable, "-m", "mindiffusion.train", "mnist", "--device", "cpu",
            "--batch-size", "2", "--n-T", "2", "--fake-data", "8", "--eps-model",
            "unet", "--n-feat", "8", "--num-workers", "0", "--epochs", "2",
            "--resume", "--out", out, *flags]
    done = subprocess.run(argv, capture_output=True, text=True)
    print("resumed", done.returncode, done.stderr.splitlines()[-1], flush=True)

for k, flags in enumerate([dict(ema=0.5), dict()]):
    out = {tmp!r} + f"/call{{k}}"
    train("mnist", n_epoch=1, device="cpu", batch_size=2, n_T=2, out=out,
          eps_model="unet", n_feat=8, fake_data=8, num_workers=1, **flags)
    print("called", k, flush=True)
    resume_from_another_process(out, *(["--ema", "0.5"] if flags else []))
"""


def test_the_trainer_called_twice_starts_afresh_and_lets_go_each_time(tmp_path):
    code = TWICE.format(tmp=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    # each call's folder resumed by another process, which the lock lets in
    calls = [line for line in out if line.startswith(("called", "resumed"))]
    assert [line.split()[:2] for line in calls] == [
        ["called", "0"], ["resumed", "0"], ["called", "1"], ["resumed", "0"]
    ], calls
    # the second call kept none of the first's flags: no --ema average
    first, second = (
        torch.load(tmp_path / f"call{k}" / "ddpm_mnist.pth", weights_only=True)
        for k in (0, 1)
    )
    assert first["ema"] is not None and second["ema"] is None
