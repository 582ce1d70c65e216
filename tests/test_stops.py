"""Stops and saves that keep what was saved and say what is true: a second Ctrl-C, a
signal as the last epoch ends, a reader of the output that went away, files left by
a kill -9, the umask, a dataset that changed under a resume, and a full disk."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import mindiffusion.train as trainer
from conftest import REPO
from mindiffusion import export
from mindiffusion.ddpm import DDPM
from mindiffusion.training import signals
from test_lesson_flags import FakeClock
from test_long_runs import FLAGS, GRIDS, SCRIPTS, SMALL_MNIST, train


# the checkpoint each script writes
CHECKPOINTS = {
    "mnist": "ddpm_mnist.pth",
    "cifar10": "ddpm_cifar.pth",
    "celeba": "ddpm_celeba.pth",
}


def flags_of(script, *more):
    return [*FLAGS.split(), *more] + (SMALL_MNIST if script == "mnist" else [])


def test_a_second_ctrl_c_still_saves_and_skips_the_grid(
    stand_in, tmp_path, monkeypatch, capsys
):
    forward, calls = DDPM.forward, []

    def two_ctrl_cs_in_step_2(self, x, c=None):
        calls.append(x)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return forward(self, x, c)

    monkeypatch.setattr(DDPM, "forward", two_ctrl_cs_in_step_2)
    argv = flags_of("cifar10", "--epochs", "2", "--out", str(tmp_path))
    code, line, out = train("cifar10", argv, capsys)
    assert code == 130
    path = tmp_path / "ddpm_cifar.pth"
    assert line == (
        f"stopped by SIGINT after epoch 0, step 2: saved in {path}; run the same "
        f"command with --resume to go on"
    )
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 2)
    # each signal said at once what happens next
    assert "SIGINT: noted; the run saves after the step under way, then stops" in out
    assert ("SIGINT again: the run still saves after the step under way, then "
            "stops without drawing a grid") in out
    assert not list(tmp_path.glob("*.png"))
    assert signal.getsignal(signal.SIGINT) is not signals.remember


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_on_the_last_step_is_a_finished_run(
    script, stand_in, tmp_path, capsys
):
    # 4 steps an epoch: the signal comes during the last step of the last epoch
    stand_in["signal"] = (4, signal.SIGTERM)
    argv = flags_of(script, "--epochs", "1", "--out", str(tmp_path))
    code, line, out = train(script, argv, capsys)
    assert code == 0
    (path,) = tmp_path.glob("*.pth")
    assert f"SIGTERM came as the last epoch ended: the run is finished, saved in " \
           f"{path}" in out
    assert "--resume" not in out + line
    assert torch.load(path, weights_only=True)["epoch"] == 1
    # the last epoch's grid is drawn
    assert len(list(tmp_path.glob("*.png"))) == 1


def test_a_second_signal_during_the_last_grid_leaves_a_finished_run(
    stand_in, tmp_path, capsys
):
    stand_in["grid_signals"] = [signal.SIGTERM, signal.SIGTERM]
    argv = flags_of("cifar10", "--epochs", "1", "--out", str(tmp_path))
    code, line, out = train("cifar10", argv, capsys)
    assert code == 0
    path = tmp_path / "ddpm_cifar.pth"
    assert (f"stopped by SIGTERM during the last grid: the run is finished, saved in "
            f"{path}, and only that grid is missing") in out
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob("*.png"))


def test_ctrl_c_after_the_reader_of_the_output_went_away_still_saves(tmp_path):
    """`python -m mindiffusion.train mnist ... 2>&1 | tee log`, then Ctrl-C: the
    terminal signals the whole group, and tee is gone before the run writes again."""
    argv = flags_of("mnist", "--epochs", "1", "--out", str(tmp_path))
    # 1,000 steps of 4 images, seconds in all: the signal comes while it trains
    argv[argv.index("--fake-data") + 1] = "4000"
    argv[argv.index("--batch-size") + 1] = "4"
    run = subprocess.Popen(
        [sys.executable, "-m", "mindiffusion.train", "mnist", *argv], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    seen = b""
    while b"loss:" not in seen:
        seen += run.stdout.read1(4096)
        assert run.poll() is None, seen.decode()
    run.send_signal(signal.SIGINT)
    # what is already in the pipe, and then the reader is gone
    run.stdout.close()
    assert run.wait(timeout=120) == 130
    state = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)
    assert state["epoch"] == 0 and 0 < state["batches"] < 1000
    # the grid of the weights saved, whose progress bar wrote to nowhere
    assert (tmp_path / f"ddpm_sample_0_step{state['batches']}.png").exists()


def test_a_stream_whose_reader_went_away_is_forgiven_only_once_a_stop_began(
    monkeypatch
):
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", buffering=1)
    os.close(read_end)
    safe = signals.StopSafeStream(stream)
    # no stop yet: a broken pipe is an error as ever
    with pytest.raises(BrokenPipeError):
        safe.write("line\n")
    monkeypatch.setattr(signals, "received", signal.SIGINT)
    assert safe.write("after the stop\n") == len("after the stop\n")
    safe.flush()
    # the descriptor now writes to nowhere, so later writes, and the one at exit, pass
    stream.write("and later\n")
    stream.flush()
    stream.close()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_a_checkpoint_and_an_export_are_written_as_the_umask_allows(
    umask, stand_in, tmp_path, capsys
):
    previous = os.umask(umask)
    try:
        argv = flags_of("cifar10", "--epochs", "1", "--out", str(tmp_path))
        assert train("cifar10", argv, capsys)[0] == 0
        export.main([str(tmp_path / "ddpm_cifar.pth"), str(tmp_path / "small.pth")])
    finally:
        os.umask(previous)
    for name in "ddpm_cifar.pth", "small.pth", "ddpm_cifar_log.csv":
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_kill_between_write_and_rename_leaves_no_temporary_file_for_long(
    script, stand_in, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    # what a kill -9 mid-save leaves: the full temporary file, never renamed
    stale = out / f"{CHECKPOINTS[script]}.k3x_9a1b.tmp"
    stale.write_bytes(b"half a checkpoint")
    # another checkpoint's temporary file is not this run's to remove
    other = out / "other.pth.abcd1234.tmp"
    other.write_bytes(b"another run's")
    argv = flags_of(script, "--epochs", "1", "--out", str(out))
    code, _, said = train(script, argv, capsys)
    assert code == 0
    assert not stale.exists() and other.exists()
    assert f"removed {stale}, the temporary file of a save that a kill interrupted" \
        in said


@pytest.mark.parametrize("images", [6, 12])
def test_a_resume_mid_epoch_on_another_dataset_size_is_refused(
    images, stand_in, tmp_path, capsys
):
    stand_in["signal"] = (2, signal.SIGTERM)
    argv = flags_of("cifar10", "--epochs", "1", "--out", str(tmp_path))
    assert train("cifar10", argv, capsys)[0] == 128 + signal.SIGTERM
    resumed = [*argv, "--resume", "--fake-data", str(images)]
    code, line, _ = train("cifar10", resumed, capsys)
    assert code == 2
    assert line == (
        f"--resume: {tmp_path / 'ddpm_cifar.pth'} stopped in the middle of an epoch "
        f"of 8 images, and the dataset now holds {images}: resume on the same "
        f"images, or from a save at an epoch's end"
    )


def test_a_resume_at_an_epoch_s_end_says_the_dataset_changed(
    stand_in, tmp_path, capsys
):
    argv = flags_of("cifar10", "--out", str(tmp_path))
    assert train("cifar10", [*argv, "--epochs", "1"], capsys)[0] == 0
    resumed = [*argv, "--epochs", "2", "--resume", "--fake-data", "12"]
    code, _, said = train("cifar10", resumed, capsys)
    assert code == 0
    assert "the dataset: the checkpoint trained on 8 images; this run trains on 12" \
        in said


def full_disk_for_pngs(monkeypatch):
    """While monkeypatch lasts, a PNG's last step, the rename onto its name, finds
    the disk full."""
    real_replace = os.replace

    def full_disk_for_a_png(source, target):
        if str(target).endswith(".png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk_for_a_png)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_while_a_grid_is_written_is_one_sentence_and_no_partial_png(
    script, stand_in, tmp_path, monkeypatch, capsys
):
    full_disk_for_pngs(monkeypatch)
    argv = flags_of(script, "--epochs", "2", "--out", str(tmp_path))
    code, line, _ = train(script, argv, capsys)
    assert code == 2
    path = tmp_path / CHECKPOINTS[script]
    grid = tmp_path / GRIDS[path.name].format(0)
    assert line == (
        f"the grid {grid} could not be written (No space left on device); the "
        f"weights are saved in {path}: make room or give another --out, then --resume"
    )
    # nor a temporary file of it
    assert not list(tmp_path.glob("*.png*"))
    assert torch.load(path, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("grid", ["after a stop", "within the epoch"])
def test_a_full_disk_at_a_grid_the_run_draws_itself_is_one_sentence(
    grid, stand_in, tmp_path, monkeypatch, capsys
):
    """The grid after a stop signal, and --grid-minutes' grid: each step saved, and
    the grid one sentence, with no part of it left."""
    full_disk_for_pngs(monkeypatch)
    argv = flags_of("mnist", "--epochs", "1", "--out", str(tmp_path))
    if grid == "after a stop":
        stand_in["signal"] = (2, signal.SIGTERM)
    else:
        monkeypatch.setattr(trainer, "time", FakeClock())
        argv += ["--grid-minutes", "2"]
    code, line, _ = train("mnist", argv, capsys)
    assert code == 2
    path = tmp_path / "ddpm_mnist.pth"
    assert line == (
        f"the grid {tmp_path / 'ddpm_sample_0_step2.png'} could not be written (No "
        f"space left on device); the weights are saved in {path}: make room or give "
        f"another --out, then --resume"
    )
    assert not list(tmp_path.glob("*.png*"))
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 2)


def test_a_full_disk_while_the_record_is_written_keeps_its_rows(
    stand_in, tmp_path, monkeypatch, capsys
):
    argv = flags_of("cifar10", "--out", str(tmp_path))
    assert train("cifar10", [*argv, "--epochs", "1"], capsys)[0] == 0
    record = tmp_path / "ddpm_cifar_log.csv"
    before = record.read_bytes()
    real_replace = os.replace

    def full_disk(source, target):
        if str(target) == str(record):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_disk)
    code, line, _ = train("cifar10", [*argv, "--epochs", "2", "--resume"], capsys)
    assert code == 2
    assert line.startswith(
        f"the record {record} could not be written (No space left on device): its "
        f"rows so far and the previous checkpoint are kept"
    )
    assert record.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("seed", [["--seed", "5"], []])
def test_a_resume_mid_epoch_sees_the_rest_of_the_epoch_s_order(
    seed, stand_in, tmp_path, monkeypatch, capsys
):
    # with a seed other than the default and with none, the order of the epoch's
    # images comes back from the checkpoint: after the resume, the images not yet
    # seen, each once
    forward, seen = DDPM.forward, []

    def seeing(self, x, c=None):
        seen.extend(tuple(image.flatten()[:4].tolist()) for image in x)
        return forward(self, x, c)

    monkeypatch.setattr(DDPM, "forward", seeing)
    argv = FLAGS.replace(" --seed 0", "").split()
    argv += [*seed, "--epochs", "1", "--out", str(tmp_path)]
    stand_in["signal"] = (2, signal.SIGTERM)
    assert train("cifar10", argv, capsys)[0] == 128 + signal.SIGTERM
    before = list(seen)
    seen.clear()
    assert train("cifar10", [*argv, "--resume"], capsys)[0] == 0
    assert len(before) == len(seen) == 4
    assert len(set(before + seen)) == 8
