"""Long runs: step checkpoints and exact mid-epoch resume, stopping on a signal,
divergence that never reaches the disk, saves that fail, and --lr on resume."""

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import mindiffusion.train as trainer
from conftest import REPO
from mindiffusion.ddpm import DDPM
from mindiffusion.training import checkpoints, devices
from mindiffusion.training.recipes import RECIPES
from mindiffusion.training.steps import MAX_OVERFLOWS


SCRIPTS = ["mnist", "cifar10", "celeba"]
# each checkpoint's grids: ddpm_mnist.pth -> ddpm_sample_{}.png, ...
GRIDS = {recipe.checkpoint: recipe.grids for recipe in RECIPES.values()}
# MNIST with a narrow UNet: the loop is the script's own, the checkpoint 30 times
# smaller than DummyEpsModel's
SMALL_MNIST = ["--eps-model", "unet", "--n-feat", "8"]
# 4 steps of 2 fake images per epoch, on the CPU
FLAGS = "--device cpu --batch-size 2 --n-T 2 --fake-data 8 --num-workers 0 --seed 0"


def train(script, argv, capsys):
    """Run `script`'s command line; return its exit code, stderr's last line without
    the program's name, and stdout."""
    try:
        trainer.main([script, *argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    last = (err.strip().splitlines() or [""])[-1]
    return code, last.split(": error: ", 1)[-1], out


def record_rows(path):
    """The CSV's rows without their timings: epoch, step, loss and lr."""
    with open(path, newline="") as file:
        return [row[:4] for row in csv.reader(file)]


def same_files(a, b, lost=frozenset(), extra=frozenset()):
    """The grids, the record and the checkpoint of two runs are the same, but for
    the grids `lost` that b lacks and the grids `extra` that only b has."""
    assert sorted(set(os.listdir(a)) - lost) == sorted(set(os.listdir(b)) - extra)
    for name in set(os.listdir(b)) - extra:
        if name.endswith(".png"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    (log,) = a.glob("*_log.csv")
    assert record_rows(log) == record_rows(b / log.name)
    (path,) = a.glob("*.pth")
    one, other = (torch.load(d / path.name, weights_only=True) for d in (a, b))
    for part in ("model", "ema"):
        for name, value in (one[part] or {}).items():
            assert torch.equal(value, other[part][name]), (part, name)
    for p, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, other["optimizer"]["state"][p][key]), (p, key)


# each script, each stop signal: a scheduler's, SLURM's warning, a first Ctrl-C
@pytest.mark.parametrize(
    "script, signum",
    list(zip(SCRIPTS, [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])),
)
def test_a_signal_mid_epoch_saves_and_resume_is_bit_identical(
    script, signum, stand_in, tmp_path, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = [*FLAGS.split(), "--epochs", "2", "--ema", "0.5"]
    argv += SMALL_MNIST if script == "mnist" else []
    assert train(script, [*argv, "--out", str(straight)], capsys)[0] == 0
    # the signal comes during the second step of the first epoch
    stand_in["signal"] = (2, signum)
    code, line, _ = train(script, [*argv, "--out", str(stopped)], capsys)
    (path,) = stopped.glob("*.pth")
    assert code == 128 + signum
    assert line == (
        f"stopped by {signal.Signals(signum).name} after epoch 0, step 2: saved in "
        f"{path}; run the same command with --resume to go on"
    )
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 2)
    # after the save, the grid of the weights saved, named as the script names its
    # grids: ddpm_sample_{}.png, ddpm_sample_cifar{}.png, ddpm_sample_celeba{}.png
    stop_grid = GRIDS[path.name].format(0).replace(".png", "_step2.png")
    assert (stopped / stop_grid).exists()
    assert train(script, [*argv, "--out", str(stopped), "--resume"], capsys)[0] == 0
    same_files(straight, stopped, extra={stop_grid})


def test_a_second_signal_during_the_final_grid_skips_it(stand_in, tmp_path, capsys):
    argv = [*FLAGS.split(), "--epochs", "2", "--out", str(tmp_path)]
    stand_in["signal"] = (2, signal.SIGTERM)
    # the next grid is the final one
    stand_in["grid_signals"] = [signal.SIGINT]
    code, line, out = train("cifar10", argv, capsys)
    assert code == 128 + signal.SIGINT
    assert line.startswith("stopped by SIGINT during the final grid: the run is saved")
    assert not list(tmp_path.glob("*.png"))
    state = torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 2)


def test_a_kill_loses_only_the_steps_since_the_last_save(
    stand_in, tmp_path, monkeypatch, capsys
):
    """A kill -9 right after each save is a resume from that save: each one ends as
    the run that never stopped."""
    argv = [*FLAGS.split(), "--epochs", "2", "--save-every", "3", *SMALL_MNIST]
    straight = tmp_path / "straight"
    saves = []
    save = checkpoints.Checkpoint.save

    def save_and_keep(self, epoch, batches=0, rng=None):
        save(self, epoch, batches, rng)
        kept = tmp_path / f"kill{len(saves)}"
        shutil.copytree(os.path.dirname(self.path), kept)
        saves.append((kept, epoch, batches))

    monkeypatch.setattr(checkpoints.Checkpoint, "save", save_and_keep)
    assert train("mnist", [*argv, "--out", str(straight)], capsys)[0] == 0
    monkeypatch.setattr(checkpoints.Checkpoint, "save", save)
    # steps 3 and 6 of 8, and the two epoch ends
    assert [(e, b) for _, e, b in saves] == [(0, 3), (1, 0), (1, 2), (2, 0)]
    for kept, epoch, batches in saves[:-1]:
        # what the killed run had written: the checkpoint and its grids so far; an
        # epoch's end is saved before its grid, and a kill then loses that picture
        lost = f"ddpm_sample_{epoch - 1}.png"
        lost = {lost} if batches == 0 and not (kept / lost).exists() else set()
        resumed = train("mnist", [*argv, "--out", str(kept), "--resume"], capsys)
        assert resumed[0] == 0
        same_files(straight, kept, lost)


def test_divergence_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, capsys):
    flags = "--device cpu --batch-size 2 --n-T 2 --fake-data 4 --num-workers 0"
    out = tmp_path / "out"
    argv = [*flags.split(), "--out", str(out)]
    assert train("cifar10", [*argv, "--epochs", "1"], capsys)[0] == 0
    before = (out / "ddpm_cifar.pth").read_bytes()
    grids = sorted(os.listdir(out))
    code, line, _ = train(
        "cifar10",
        [*argv, "--epochs", "2", "--resume", "--lr", "1e30"],
        capsys,
    )
    assert code == 2
    assert line.startswith("training diverged at epoch 1, step 2:")
    assert line.endswith(
        "so the weights were not updated and the last checkpoint is kept; try a lower "
        "--lr or --grad-clip 1.0, then --resume"
    )
    assert (out / "ddpm_cifar.pth").read_bytes() == before
    assert sorted(os.listdir(out)) == grids
    assert len(record_rows(out / "ddpm_cifar_log.csv")) == 1 + 1


def test_lr_given_on_resume_applies_and_is_announced(stand_in, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*FLAGS.split(), "--out", str(out)]
    assert train("cifar10", [*argv, "--epochs", "1"], capsys)[0] == 0
    code, _, printed = train(
        "cifar10", [*argv, "--epochs", "2", "--resume", "--lr", "0.5"], capsys
    )
    assert code == 0
    assert "--lr: the checkpoint trained at 1e-05; this run goes on at 0.5\n" in printed
    state = torch.load(out / "ddpm_cifar.pth", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.5


def test_a_save_that_fails_after_writing_is_one_sentence(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [*FLAGS.split(), "--fake-data", "2", "--n-T", "1", "--out", str(out)]
    assert train("cifar10", [*argv, "--epochs", "1"], capsys)[0] == 0
    before = (out / "ddpm_cifar.pth").read_bytes()

    def disk_full(fd):
        # room for the record's few rows, but not for the checkpoint: as the file
        # system says when the data written so far does not fit
        if os.fstat(fd).st_size > 2**16:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    code, line, _ = train("cifar10", [*argv, "--epochs", "2", "--resume"], capsys)
    assert code == 2
    assert line == (
        f"the checkpoint could not be saved in {out} (No "
        f"space left on device): the previous one there is kept; make room or give "
        f"another --out, then --resume"
    )
    assert (out / "ddpm_cifar.pth").read_bytes() == before
    assert not (out / "ddpm_cifar.pth.tmp").exists()


def test_grad_clip_bounds_the_norm_and_without_it_nothing_changes(
    stand_in, tmp_path, monkeypatch, capsys
):
    clip_grad_norm, clips, norms = torch.nn.utils.clip_grad_norm_, [], []

    def counted_clip(parameters, max_norm):
        parameters = list(parameters)
        clips.append(max_norm)
        clip_grad_norm(parameters, max_norm)
        grads = [p.grad for p in parameters if p.grad is not None]
        norms.append(torch.nn.utils.get_total_norm(grads).item())

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted_clip)
    argv = [*FLAGS.split(), "--epochs", "1"]
    assert train("cifar10", [*argv, "--out", str(tmp_path / "a")], capsys)[0] == 0
    # not even a pass over the gradients
    assert clips == []
    argv += ["--grad-clip", "0.01", "--out", str(tmp_path / "b")]
    assert train("cifar10", argv, capsys)[0] == 0
    # each of the 4 steps, clipped to the total norm asked for
    assert clips == [0.01] * 4
    assert norms == pytest.approx([0.01] * 4, rel=1e-4)


def test_fp16_scales_the_loss_and_its_scaler_survives_resume(
    stand_in, tmp_path, capsys
):
    argv = [*FLAGS.split(), "--amp", "fp16", "--epochs", "2"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert train("cifar10", [*argv, "--out", str(straight)], capsys)[0] == 0
    stand_in["signal"] = (2, signal.SIGTERM)
    code = train("cifar10", [*argv, "--out", str(halves)], capsys)[0]
    assert code == 128 + signal.SIGTERM
    code = train("cifar10", [*argv, "--out", str(halves), "--resume"], capsys)[0]
    assert code == 0
    same_files(straight, halves, extra={"ddpm_sample_cifar0_step2.png"})
    a, b = (
        torch.load(d / "ddpm_cifar.pth", weights_only=True) for d in (straight, halves)
    )
    # 8 steps without an overflow, counted towards growing the scale
    assert a["scaler"]["scale"] == 2.0**16 and a["scaler"]["_growth_tracker"] == 8
    assert a["scaler"] == b["scaler"]


def test_an_fp16_overflow_skips_the_step_and_is_not_divergence(
    stand_in, tmp_path, monkeypatch, capsys
):
    grad_scaler = torch.amp.GradScaler
    monkeypatch.setattr(
        torch.amp, "GradScaler",
        lambda *args, **kwargs: grad_scaler(*args, init_scale=3e38, **kwargs),
    )
    # every gradient is 10, so 10 times the scale overflows float32 (3.4e38) until
    # the scale, halved at each overflow, is 3e38 / 2**4
    monkeypatch.setattr(
        DDPM, "forward", lambda self, x, c: 10 * sum(p.sum() for p in self.parameters())
    )
    out = tmp_path / "out"
    argv = [*FLAGS.split(), "--amp", "fp16", "--epochs", "1", "--out", str(out)]
    # 8 steps, of which the first 4 are skipped
    assert train("cifar10", [*argv, "--fake-data", "16"], capsys)[0] == 0
    state = torch.load(out / "ddpm_cifar.pth", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == 8 - 4
    assert state["scaler"]["scale"] == pytest.approx(3e38 / 2**4)


@pytest.mark.parametrize(
    "capability, dtype", [((6, 1), None), ((7, 0), torch.float16),
                          ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                          ((9, 0), torch.bfloat16)]
)
def test_amp_auto_picks_by_the_gpus_compute_capability(
    capability, dtype, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Some GPU")
    gpu = torch.device("cuda", 0)
    assert devices.autocast_dtype("auto", gpu) is dtype
    assert devices.autocast_dtype("fp16", gpu) is torch.float16
    assert devices.autocast_dtype("bf16", gpu) is torch.bfloat16
    assert devices.autocast_dtype(None, gpu) is None
    said = capsys.readouterr().out
    assert said == ("" if dtype else "--amp: this GPU (Some GPU) has no native "
                    "bfloat16, so training stays in float32\n")


class InfiniteGradient(torch.autograd.Function):
    """The identity, whose gradient is infinite whatever comes back to it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def overflowing(self, x, c):
    """A finite loss of 1 whose gradients overflow at any loss scale."""
    return InfiniteGradient.apply(sum(p.sum() for p in self.parameters())) * 0 + 1


def test_fp16_overflowing_step_after_step_is_divergence(
    stand_in, tmp_path, monkeypatch, capsys
):

    monkeypatch.setattr(DDPM, "forward", overflowing)
    out = tmp_path / "out"
    argv = [*FLAGS.split(), "--amp", "fp16", "--epochs", "1", "--out", str(out)]
    code, line, _ = train("cifar10", [*argv, "--fake-data", "80"], capsys)
    assert code == 2
    assert line.startswith(
        f"training diverged at epoch 0, step {MAX_OVERFLOWS}: the loss is "
    )
    assert f"for {MAX_OVERFLOWS} float16 steps in a row, so" in line
    assert not out.joinpath("ddpm_cifar.pth").exists()


def test_fp16_overflows_between_finite_steps_are_never_divergence(
    stand_in, tmp_path, monkeypatch, capsys
):
    # every other step overflows, for more than twice MAX_OVERFLOWS steps
    steps = []

    def every_other(self, x, c):
        steps.append(len(steps))
        if len(steps) % 2:
            return overflowing(self, x, c)
        return sum(p.sum() for p in self.parameters()) * 0 + 1

    monkeypatch.setattr(DDPM, "forward", every_other)
    out = tmp_path / "out"
    n = 2 * MAX_OVERFLOWS + 4
    argv = [*FLAGS.split(), "--amp", "fp16", "--epochs", "1", "--out", str(out)]
    assert train("cifar10", [*argv, "--fake-data", str(2 * n)], capsys)[0] == 0
    assert len(steps) == n
    state = torch.load(out / "ddpm_cifar.pth", weights_only=True)
    assert int(state["optimizer"]["state"][0]["step"]) == n // 2


@pytest.mark.parametrize("script", SCRIPTS)
def test_fp16_with_a_loss_that_is_not_finite_stops_at_once(
    script, stand_in, tmp_path, monkeypatch, capsys
):
    # the loss itself diverged: no loss scale can help
    monkeypatch.setattr(
        DDPM, "forward",
        lambda self, x, c: sum(p.sum() for p in self.parameters()) * float("nan"),
    )
    out = tmp_path / "out"
    argv = [*FLAGS.split(), "--amp", "fp16", "--epochs", "3", "--out", str(out)]
    code, line, _ = train(script, argv + SMALL_MNIST * (script == "mnist"), capsys)
    assert code == 2
    assert line.startswith("training diverged at epoch 0, step 1: the loss is nan")
    assert "float16 steps in a row" not in line
    assert list(out.iterdir()) == []


def test_a_sigterm_to_every_process_of_the_job_still_saves(tmp_path):
    """A scheduler, like `timeout`, signals the DataLoader's workers too: the run
    still stops after its step and saves, with no traceback."""
    argv = [sys.executable, "-m", "mindiffusion.train", "mnist", *FLAGS.split(),
            *SMALL_MNIST, "--fake-data", "100000", "--num-workers", "1",
            "--out", str(tmp_path)]
    # a process group of its own, as a job has
    run = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    # the worker starts with the epoch; a few steps later, it is surely running
    # the device and precision first, then the epoch
    assert run.stdout.readline() == "training on cpu in float32\n"
    assert run.stdout.readline().startswith("Epoch 0")
    time.sleep(1)
    os.killpg(run.pid, signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "stopped by SIGTERM after epoch 0" in err.splitlines()[-1]
    assert (tmp_path / "ddpm_mnist.pth").exists()
