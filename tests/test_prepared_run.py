"""The trainer's run, in depth: where an epoch's end saves and stops, what a resume
refuses or says, the lock on --out, and the flags each dataset's run takes up."""

import multiprocessing
import os
import signal

import pytest
import torch

from conftest import cheap_ddpm, narrow_unets
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli, files, signals
from mindiffusion.training.grids import ZeroEps
from mindiffusion.training.flags import UserError
from mindiffusion.training.steps import Guard
from test_long_runs import FLAGS, SMALL_MNIST, same_files, train
import mindiffusion.train as trainer

MNIST = [*FLAGS.split(), *SMALL_MNIST]


def test_a_signal_on_an_epoch_s_last_step_draws_its_grid_and_resumes_exactly(
    stand_in, tmp_path, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = [*MNIST, "--epochs", "2", "--ema", "0.5"]
    assert (
        train("mnist", [*argv, "--out", str(straight)], capsys)[0] == 0
    )
    # the fourth step ends epoch 0
    stand_in["signal"] = (4, signal.SIGTERM)
    code, line, out = train(
        "mnist", [*argv, "--out", str(stopped)], capsys
    )
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: noted; the run stops after this grid" in out
    assert line.startswith("stopped by SIGTERM after epoch 0: saved in")
    assert (stopped / "ddpm_sample_0.png").exists()
    state = torch.load(stopped / "ddpm_mnist.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (1, 0)
    resumed = train(
        "mnist", [*argv, "--out", str(stopped), "--resume"], capsys
    )
    assert resumed[0] == 0
    same_files(straight, stopped)


def test_the_last_epoch_s_grid_is_drawn_when_a_signal_ends_it(
    stand_in, tmp_path, capsys
):
    stand_in["signal"] = (4, signal.SIGTERM)
    argv = [*MNIST, "--epochs", "1", "--out", str(tmp_path)]
    code, line, _ = train("mnist", argv, capsys)
    # the last epoch is saved: a finished run
    assert code == 0
    assert (tmp_path / "ddpm_sample_0.png").exists()
    state = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (1, 0)


def test_a_signal_during_a_grid_is_noted_at_once_and_the_run_stops_after_it(
    stand_in, tmp_path, capsys
):
    stand_in["grid_signals"] = [signal.SIGTERM]
    argv = [*MNIST, "--epochs", "2", "--out", str(tmp_path)]
    code, line, out = train("mnist", argv, capsys)
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM: noted; the run stops after this grid" in out
    assert line.startswith("stopped by SIGTERM after epoch 0: saved in")
    assert (tmp_path / "ddpm_sample_0.png").exists()
    assert not (tmp_path / "ddpm_sample_1.png").exists()


def test_a_resume_mid_epoch_with_another_batch_size_is_one_sentence(
    stand_in, tmp_path, capsys
):
    argv = [*MNIST, "--epochs", "2", "--out", str(tmp_path)]
    stand_in["signal"] = (2, signal.SIGTERM)
    assert train("mnist", argv, capsys)[0] == 128 + signal.SIGTERM
    code, line, _ = train(
        "mnist", [*argv, "--resume", "--batch-size", "4"], capsys
    )
    assert code == 2
    assert line == (
        f"--resume: {tmp_path}/ddpm_mnist.pth stopped in the middle of an epoch at "
        f"--batch-size 2 (this run: 4): resume with --batch-size 2, or change it at "
        f"an epoch's end"
    )
    # at an epoch's end the batch size may change
    assert train("mnist", [*argv, "--resume"], capsys)[0] == 0
    more = [*argv, "--resume", "--batch-size", "4", "--epochs", "3"]
    assert train("mnist", more, capsys)[0] == 0


def test_settings_a_resume_changes_are_said(stand_in, tmp_path, capsys):
    argv = [*MNIST, "--out", str(tmp_path), "--ema", "0.5"]
    assert train("mnist", [*argv, "--epochs", "1"], capsys)[0] == 0
    changed = [*argv, "--epochs", "2", "--resume", "--ema", "0.9", "--amp", "bf16"]
    code, _, out = train("mnist", [*changed, "--seed", "7"], capsys)
    assert code == 0
    assert (
        "--ema: the checkpoint averaged with decay 0.5; this run goes on with 0.9"
        in out
    )
    assert ("--amp: the checkpoint trained with no --amp; this run goes on with "
            "--amp bf16") in out
    assert (
        "--seed: a resume goes on from the checkpoint's random state (--seed 0)" in out
    )


def test_a_record_without_its_checkpoint_is_no_dead_end(stand_in, tmp_path, capsys):
    argv = [*MNIST, "--epochs", "1", "--out", str(tmp_path)]
    assert train("mnist", argv, capsys)[0] == 0
    os.remove(tmp_path / "ddpm_mnist.pth")
    code, line, _ = train("mnist", argv, capsys)
    assert code == 2
    assert line == (
        f"{tmp_path}/ddpm_mnist_log.csv is left from a run whose checkpoint is gone, "
        f"so it cannot be resumed: move it away, or choose another --out"
    )


def test_a_new_run_never_overwrites_grids_already_there(stand_in, tmp_path, capsys):
    (tmp_path / "ddpm_sample_0.png").write_bytes(b"an earlier run's grid")
    argv = [*MNIST, "--epochs", "1", "--out", str(tmp_path)]
    code, line, _ = train("mnist", argv, capsys)
    assert code == 2
    assert line.startswith(f"{tmp_path}/ddpm_sample_0.png and the other grids in")
    assert (tmp_path / "ddpm_sample_0.png").read_bytes() == b"an earlier run's grid"


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    lock = files.hold_lock(str(tmp_path / "ddpm_mnist.pth"))
    try:
        argv = [*MNIST, "--epochs", "1", "--n-T", "1", "--out", str(tmp_path)]
        code, line, _ = train("mnist", argv, capsys)
    finally:
        files.release(lock)
    assert code == 2
    assert line == (
        f"{tmp_path / 'ddpm_mnist.pth'} is in use by another run (process "
        f"{os.getpid()}): wait for it to end, or choose another --out"
    )
    assert not (tmp_path / "ddpm_mnist.pth").exists()
    assert not (tmp_path / "ddpm_mnist.pth.lock").exists()


def test_a_lock_is_released_for_the_next_run(stand_in, tmp_path, capsys):
    argv = [*MNIST, "--epochs", "1", "--out", str(tmp_path)]
    assert train("mnist", argv, capsys)[0] == 0
    assert not (tmp_path / "ddpm_mnist.pth.lock").exists()
    resumed = train(
        "mnist", [*argv, "--epochs", "2", "--resume"], capsys
    )
    assert resumed[0] == 0


def test_the_guard_stops_on_a_finite_loss_with_an_infinite_gradient():
    ddpm = DDPM(torch.nn.Conv2d(1, 1, 3, padding=1), (1e-4, 0.02), 2)
    optim = torch.optim.Adam(ddpm.parameters())
    guard = Guard(optim, scaled=False)
    weight = ddpm.eps_model.weight
    # sqrt(w - w) is 0, and its derivative 1 / (2 sqrt(0)) infinite
    loss = (weight - weight.detach()).sqrt().sum()
    loss.backward()
    with pytest.raises(UserError, match="the loss is 0.0 and the gradient norm inf"):
        guard.check(loss, 0, 1)


SCRIPTS = [
    ("mnist", SMALL_MNIST, "ddpm_sample_{}.png"),
    ("cifar10", [], "ddpm_sample_cifar{}.png"),
    ("celeba", [], "ddpm_sample_celeba{:03d}.png"),
]


@pytest.mark.parametrize("script, flags, grid", SCRIPTS)
def test_a_second_signal_during_a_grid_stops_at_once_with_the_epoch_saved(
    script, flags, grid, stand_in, tmp_path, capsys
):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    argv = [*FLAGS.split(), *flags, "--epochs", "2"]
    assert train(script, [*argv, "--out", str(straight)], capsys)[0] == 0
    stand_in["grid_signals"] = [signal.SIGTERM, signal.SIGTERM]
    code, line, _ = train(script, [*argv, "--out", str(stopped)], capsys)
    assert code == 128 + signal.SIGTERM
    assert line.startswith("stopped by SIGTERM during the grid of epoch 0: the epoch")
    # stopped twice: no final grid either
    assert not list(stopped.glob("*.png"))
    (path,) = stopped.glob("*.pth")
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batches"]) == (1, 0)
    # the epoch's training is kept exactly, with the random state the grid would
    # have left; only the picture being drawn is lost
    resumed = train(script, [*argv, "--out", str(stopped), "--resume"], capsys)
    assert resumed[0] == 0
    same_files(straight, stopped, {grid.format(0)})


@pytest.fixture
def cheap(monkeypatch):
    """A cheap loss and sampler, and CIFAR-10's and CelebA's NaiveUnet at width 8."""
    cheap_ddpm(monkeypatch)
    narrow_unets(monkeypatch)


@pytest.mark.parametrize("script, flags, grid", SCRIPTS)
def test_each_script_keeps_the_grid_every_rhythm(
    script, flags, grid, cheap, tmp_path, capsys
):
    argv = [*FLAGS.split(), *flags, "--fake-data", "2", "--n-T", "1", "--epochs", "3"]
    argv += ["--grid-every", "2", "--out", str(tmp_path)]
    assert train(script, argv, capsys)[0] == 0
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    # after epoch 2, and after the last, 3 (files count epochs from 0)
    assert drawn == sorted(grid.format(i) for i in (1, 2))


@pytest.mark.parametrize("script, flags, grid", SCRIPTS)
def test_each_dataset_s_run_clips_under_grad_clip(
    script, flags, grid, cheap, tmp_path, capsys, monkeypatch
):
    clips = []
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, norm: clips.append(norm)
    )
    argv = [*FLAGS.split(), *flags, "--fake-data", "2", "--n-T", "1", "--epochs", "1"]
    argv += ["--grad-clip", "0.5", "--out", str(tmp_path)]
    assert train(script, argv, capsys)[0] == 0
    # one step of 2 images
    assert clips == [0.5]


def test_eps_model_unet_without_n_feat_is_128_wide(cheap, tmp_path, capsys):
    argv = [*FLAGS.split(), "--eps-model", "unet", "--fake-data", "2", "--n-T", "1"]
    argv += ["--epochs", "1", "--out", str(tmp_path)]
    assert train("mnist", argv, capsys)[0] == 0
    recipe = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)["recipe"]
    assert recipe["eps_model"] == "NaiveUnet"
    assert tuple(recipe["eps_model_args"]) == (1, 1, 128)


def test_the_laptop_preset_applies_and_no_abbreviation_does(capsys):
    _, settings = cli.parse(["mnist", "--laptop"], "")
    assert (settings["eps_model"], settings["n_feat"], settings["ema"]) == (
        "unet", 16, 0.995
    )
    # a typo is an error that names it, never another flag
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["mnist", "--lap"], "")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --lap" in capsys.readouterr().err


def test_the_laptop_preset_takes_the_notes_model_when_asked():
    _, settings = cli.parse(["mnist", "--laptop", "--eps-model", "dummy"], "")
    assert (settings["eps_model"], settings["batch_size"], settings["lr"]) == (
        "dummy", 16, 3e-3
    )


def test_the_recipe_is_the_dataset_argparse_reads_wherever_it_stands():
    # "mnist" is a folder here, the dataset cifar10
    _, settings = cli.parse(["--out", "mnist", "cifar10"], "")
    assert (settings["dataset"], settings["out"]) == ("cifar10", "mnist")
    assert (settings["batch_size"], settings["lr"]) == (512, 1e-5)


def test_the_laptop_preset_is_mnist_s(capsys):
    code, line, _ = train("cifar10", ["--laptop"], capsys)
    assert (code, line) == (
        2, "--laptop is MNIST's lesson: python -m mindiffusion.train mnist --laptop"
    )


def test_the_loader_s_workers_end_with_the_run(stand_in, tmp_path, monkeypatch):
    """The workers ignore stop signals, which are the training process's: they end
    with the epoch's pass, also when a signal stops the run."""
    settings = dict(n_epoch=2, device="cpu", batch_size=2, n_T=2, fake_data=8)
    settings.update(num_workers=1, eps_model="unet", n_feat=8)
    trainer.train("mnist", out=str(tmp_path / "a"), **settings)
    assert multiprocessing.active_children() == []
    stand_in["signal"] = (2, signal.SIGTERM)
    with pytest.raises(signals.Stopped):
        trainer.train("mnist", out=str(tmp_path / "b"), **settings)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--grid-steps", "5"], "--grid-steps is DDIM's: add --grid-sampler ddim, "
         "or drop it"),
        (["--grid-sampler", "ddim", "--grid-steps", "5", "--n-T", "2"],
         "--grid-steps 5 is more than --n-T 2"),
        (["--no-ema-warmup"], "--no-ema-warmup is --ema's: add --ema DECAY, or drop "
         "it"),
    ],
)
def test_grid_and_warmup_flags_without_their_feature_are_one_sentence(
    argv, expected, capsys
):
    code, line, _ = train("cifar10", argv, capsys)
    assert (code, line) == (2, expected)


@pytest.mark.parametrize("script, argv, grid", SCRIPTS)
def test_each_script_hands_on_the_grid_sampler_and_the_warmup_flag(
    script, argv, grid, tmp_path, monkeypatch, capsys
):
    grids = []

    def ddim_sample(self, n_sample, size, device, c=None, guide_w=0.0):
        if not isinstance(self.eps_model, ZeroEps):
            grids.append((self.n_steps, self.eps_model))
        return torch.zeros(n_sample, *size)

    monkeypatch.setattr(DDIM, "sample", ddim_sample)
    cheap_ddpm(monkeypatch)
    narrow_unets(monkeypatch)
    argv = [*FLAGS.split(), *argv, "--epochs", "1", "--out", str(tmp_path)]
    argv += ["--ema", "0.5", "--grid-sampler", "ddim", "--grid-steps", "2"]
    assert train(script, [*argv, "--no-ema-warmup"], capsys)[0] == 0
    assert (tmp_path / grid.format(0)).exists()
    (path,) = tmp_path.glob("*.pth")
    state = torch.load(path, weights_only=True)
    assert state["settings"]["ema_warmup"] is False
    # one grid, of 2 DDIM steps, on the averaged copy's noise model
    ((n_steps, eps_model),) = grids
    assert n_steps == 2
    assert torch.equal(
        next(eps_model.parameters()),
        state["ema"][f"module.eps_model.{next(iter(eps_model.state_dict()))}"],
    )
