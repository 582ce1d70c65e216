"""What trying the repository as a new user would found: each defect with a test that
fails on the code before its fix, and the assertions that catch the bugs a review
planted where the suite had none."""
import json
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.utils import make_grid, save_image

from conftest import REPO, grid_tiles, narrow_unets
from mindiffusion import fid
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.figures import command as figures_command
from mindiffusion.figures import lesson
from mindiffusion.frechet import to_uint8
from mindiffusion.judge import command as judge_command
from mindiffusion.judge import model as judge_model
from mindiffusion.judge.scores import grid_images, rows_as_digits
import mindiffusion.train as trainer
from mindiffusion.unet import NaiveUnet
from test_lesson_flags import FakeClock
from test_long_runs import FLAGS, SMALL_MNIST, train

# an MNIST-shaped recipe of the training scripts, for a narrow NaiveUnet
MNIST_RECIPE = dict(
    dataset="MNIST", eps_model="NaiveUnet", eps_model_args=(1, 1, 8),
    betas=(1e-4, 0.02), n_T=4, image_size=(1, 32, 32),
    normalize=((0.5,), (1.0,)), n_classes=None, classes=None, p_uncond=None,
)


def tiny_checkpoint(path, channels=1, n_classes=None, **recipe):
    """A weights-only checkpoint of a narrow untrained NaiveUnet, with the recipe
    MNIST_RECIPE changed by `recipe`."""
    torch.manual_seed(0)
    recipe = dict(MNIST_RECIPE, eps_model_args=(channels, channels, 8),
                  n_classes=n_classes, **recipe)
    model = DDPM(NaiveUnet(channels, channels, 8, n_classes), (1e-4, 0.02),
                 recipe["n_T"], n_classes=n_classes)
    torch.save({"model": model.state_dict(), "recipe": recipe, "averaged": False},
               path)
    return str(path)


def refused(main, argv, capsys) -> str:
    """The one sentence a command refuses argv with."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().split(": error: ", 1)[-1]


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sampling fails the test."""
    for cls in (DDPM, DDIM):
        monkeypatch.setattr(cls, "sample", lambda *args: pytest.fail("sampled"))


def make_grid_png(images, path, nrow, bits=8):
    """images (N, 1, S, S) in [0, 1] as make_grid and save_image write them; with
    bits 16, the same grid saved again as a 16-bit grey PNG."""
    save_image(make_grid(images, nrow=nrow), path)
    if bits == 16:
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path)


# 1
def test_a_16_bit_grid_reads_as_its_8_bit_twin(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(8, 1, 28, 28)
    make_grid_png(images, tmp_path / "a.png", 4)
    make_grid_png(images, tmp_path / "b.png", 4, bits=16)
    assert Image.open(tmp_path / "b.png").mode.startswith("I")
    eight, _ = grid_images(str(tmp_path / "a.png"))
    sixteen, _ = grid_images(str(tmp_path / "b.png"))
    torch.testing.assert_close(sixteen, eight, atol=1e-6, rtol=0)


# 2
def test_black_samples_at_a_grid_s_end_are_still_samples(tmp_path, capsys):
    images = torch.rand(40, 1, 32, 32)
    # the last row's samples were NaN, saved black
    images[36:] = 0
    make_grid_png(images, tmp_path / "grid.png", 4)
    read, rows = grid_images(str(tmp_path / "grid.png"))
    assert (len(read), rows) == (40, 10)
    assert rows_as_digits(read, rows, "grid.png").tolist()[-4:] == [9, 9, 9, 9]
    judge_command.main([str(tmp_path / "grid.png"), "--rows-are-classes"])
    out = capsys.readouterr().out
    assert "the grid ends in 4 black cells, each read as a sample" in out
    assert "of 40)" in out


# 3
@pytest.mark.parametrize("side, n, nrow", [(28, 289, 17), (32, 225, 15)])
def test_a_512_pixel_grid_is_cut_at_the_side_its_padding_shows(side, n, nrow, tmp_path):
    torch.manual_seed(0)
    images = torch.rand(n, 1, side, side) * 0.9 + 0.1
    make_grid_png(images, tmp_path / "grid.png", nrow)
    assert Image.open(tmp_path / "grid.png").size == (512, 512)
    read, rows = grid_images(str(tmp_path / "grid.png"))
    assert read.shape == (n, 1, side, side) and rows == nrow
    # the cells are the images, in order, as the PNG rounded them
    torch.testing.assert_close(read, (images * 255 + 0.5).floor() / 255, atol=1e-6,
                               rtol=0)


# 4
@pytest.mark.parametrize("channels, n_classes, words", [
    (1, 2, "was trained on 2 classes, not the ten digits the judge reads"),
    (3, 2, "the judge reads MNIST digits, 1x28x28 or 1x32x32, not the 3x32x32"),
])
def test_the_judge_refuses_what_it_cannot_read_before_sampling(
    channels, n_classes, words, tmp_path, no_sampling, capsys
):
    path = tiny_checkpoint(tmp_path / "c.pth", channels, n_classes,
                           image_size=(channels, 32, 32), classes=["a", "b"])
    assert words in refused(judge_command.main, [path], capsys)


# 5
def test_the_judge_takes_a_short_model_s_n_t_unless_steps_is_given(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "short.pth")
    judge_command.main([path, "--n", "2", "--data-root", str(tmp_path)])
    assert "read as digits" in capsys.readouterr().out
    line = refused(judge_command.main, [path, "--steps", "20"], capsys)
    assert line == "--steps 20 is more than the model's n_T = 4"


# 6
def test_judge_train_checks_its_out_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(judge_command, "train", lambda *args: pytest.fail("trained"))
    out = tmp_path / "missing" / "judge.pth"
    line = refused(judge_command.main, ["--train", "--out", str(out)], capsys)
    assert line == f"--out {out}: its folder does not exist"


# 7
def test_fid_s_digit_features_refuse_a_checkpoint_of_colour_images(
    tmp_path, no_sampling, capsys
):
    path = tiny_checkpoint(tmp_path / "cifar.pth", 3, dataset="CIFAR10",
                           image_size=(3, 32, 32), normalize=((0.5,) * 3, (0.5,) * 3))
    argv = [path, "--features", "digits", "--cache-dir", str(tmp_path)]
    assert refused(fid.main, argv, capsys) == (
        f"--features digits: {path} has no MNIST digits"
    )


# 8
def test_fid_s_json_says_which_weights_it_sampled(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "plain.pth")
    record = tmp_path / "fid.json"
    fid.main([path, "--features", "digits", "--fake-data", "4", "--n", "2",
              "--steps", "1", "--device", "cpu", "--cache-dir", str(tmp_path),
              "--json", str(record)])
    assert json.loads(record.read_text())["ema"] is False


# 9
def test_figures_on_a_folder_of_too_few_images_is_one_sentence(tmp_path, capsys):
    folder = tmp_path / "faces" / "all"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (40, 40), (k * 60, 0, 0)).save(folder / f"{k}.png")
    path = tiny_checkpoint(tmp_path / "faces.pth", 3, dataset="ImageFolder",
                           image_size=(3, 32, 32), normalize=((0.5,) * 3, (0.5,) * 3))
    argv = [path, "--data-root", str(tmp_path / "faces"), "--device", "cpu",
            "--out", str(tmp_path / "figures")]
    assert refused(figures_command.main, argv, capsys) == (
        f"--data-root {tmp_path / 'faces'} holds 3 images, and the figures noise 6: "
        f"add images, or leave --data-root out to noise the model's own samples"
    )


# 10
def test_a_second_signal_on_an_epoch_s_last_step_skips_its_grid(
    stand_in, tmp_path, monkeypatch, capsys
):
    forward = DDPM.forward
    calls = []

    def twice_on_the_fourth(self, x, c=None):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return forward(self, x, c)

    monkeypatch.setattr(DDPM, "forward", twice_on_the_fourth)
    argv = [*FLAGS.split(), *SMALL_MNIST, "--epochs", "2", "--out", str(tmp_path)]
    code, line, out = train("mnist", argv, capsys)
    assert code == 128 + signal.SIGTERM
    assert line.startswith("stopped by SIGTERM after epoch 0: saved in")
    # the epoch saved, its grid and the final one skipped, and no third "noted"
    state = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (1, 0)
    assert not list(tmp_path.glob("*.png"))
    assert out.count("SIGTERM") == 2 and "this grid" not in out


# 11
def test_a_signal_during_a_grid_within_the_epoch_stops_right_after_it(
    stand_in, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(trainer, "time", FakeClock())
    # the first grid is the one within the epoch, after step 2
    stand_in["grid_signals"] = [signal.SIGINT]
    argv = [*FLAGS.split(), *SMALL_MNIST, "--epochs", "1", "--grid-minutes", "2",
            "--out", str(tmp_path)]
    code, line, out = train("mnist", argv, capsys)
    assert code == 128 + signal.SIGINT
    assert "the run stops after this grid, its step already saved" in out
    assert line.startswith("stopped by SIGINT after epoch 0, step 2: saved in")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "ddpm_sample_0_step2.png"
    ]
    state = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, 2)


# 12
def test_the_trainer_called_directly_makes_its_out_folder(stand_in, tmp_path):
    out = tmp_path / "runs" / "first"
    trainer.train(
        "mnist", n_epoch=1, device="cpu", batch_size=2, n_T=2, out=str(out),
        eps_model="unet", n_feat=8, fake_data=4, num_workers=0,
    )
    assert (out / "ddpm_mnist.pth").exists()
    assert not (out / "ddpm_mnist.pth.lock").exists()


# 13
@pytest.mark.parametrize("command_main, own, other", [
    (fid.main, "give --fake-data N", "figures"),
    (figures_command.main, "leave --data-root out", "fid"),
])
def test_fid_and_figures_each_name_their_own_flags(
    command_main, own, other, tmp_path, capsys
):
    path = tiny_checkpoint(tmp_path / "fake.pth", dataset="FakeImages")
    argv = [path, "--data-root", str(tmp_path), "--device", "cpu", "--cache-dir",
            str(tmp_path)] if command_main is fid.main else [
        path, "--data-root", str(tmp_path), "--device", "cpu", "--out",
        str(tmp_path / "figures")]
    line = refused(command_main, argv, capsys)
    assert own in line and other not in line


# 14
def test_the_readme_s_notebook_call_runs_as_written(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    imports = re.findall(r"`(from \S+ import \S+)`", text)
    assert "from mindiffusion.train import train" in imports
    call = re.search(r'`(train\("cifar10",[^`]*\))`', text).group(1)
    narrow_unets(monkeypatch)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec("\n".join(imports), scope)
    ddpm = eval(" ".join(call.split()), scope)
    assert isinstance(ddpm, DDPM)
    assert (tmp_path / "runs" / "try" / "ddpm_cifar.pth").exists()


# planted: fid's samples must reach the extractor as pixels, Normalize undone
def test_fid_s_extractor_reads_the_samples_as_pixels():
    seen = []

    class Recording(nn.Module):
        def forward(self, images):
            seen.append(images.clone())
            return (torch.zeros(len(images), 4),)

    class Constant(nn.Module):
        """A DDPM whose every sample is 0, which MNIST's Normalize gives 0.5."""

        n_steps = n_T = 1
        eps_model = nn.Identity()

        def sample(self, n, size, device, c=None, guide_w=0.0):
            return torch.zeros(n, *size)

    fid.sample_statistics(Constant(), MNIST_RECIPE, Recording(), 3, 3, "cpu", "", 0.0)
    (images,) = seen
    assert torch.equal(images, to_uint8(torch.full((3, 1, 32, 32), 0.5)))
    assert images.unique().tolist() == [128]


# planted: a grid of ten rows labels each row with its own digit
def test_rows_are_labelled_row_by_row():
    images = torch.zeros(20, 1, 28, 28)
    assert rows_as_digits(images, 10, "g.png").tolist() == [
        d for d in range(10) for _ in range(2)
    ]


# planted: the judge reads a 32x32 image as its centre 28x28, not shrunk to it
def test_the_judge_reads_the_centre_of_a_padded_digit():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(judge_model.as_digits(x), x[:, :, 2:30, 2:30])


class ReadsT(nn.Module):
    """A noise model that answers with t itself: what it is told, shown."""

    def forward(self, x, t, c=None):
        return t.view(-1, 1, 1, 1).expand_as(x).clone()


# planted: the loss at each t is taken with the model told t / n_T
def test_the_loss_per_t_tells_the_model_t_over_n_t():
    ddpm = DDPM(ReadsT(), (1e-4, 0.02), 1000)
    x0 = torch.zeros(4, 1, 8, 8)
    ts = [10, 500, 1000]
    losses = lesson.loss_per_timestep(ddpm, x0, None, ts, seed=0)
    # eps ~ N(0, 1) against the constant s = t / n_T: mean square 1 + s^2
    for t, loss in zip(ts, losses):
        assert loss.item() == pytest.approx(1 + (t / 1000) ** 2, abs=0.1), t


# planted: the figures pass the forward process and the GIF their timesteps in order
def test_the_figures_pass_their_timesteps_in_the_walk_s_order(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / "tiny.pth", n_T=20)
    seen = {}
    plot_walk, write_gif = figures_command.plot_walk, figures_command.write_gif

    def kept_walk(images, ts, title, out, rows=None):
        seen.setdefault("walks", []).append((images, ts))
        plot_walk(images, ts, title, out, rows)

    def kept_gif(states, ts, out):
        seen["gif"] = (states, ts)
        write_gif(states, ts, out)

    monkeypatch.setattr(figures_command, "plot_walk", kept_walk)
    monkeypatch.setattr(figures_command, "write_gif", kept_gif)
    figures_command.main([path, "--out", str(tmp_path / "f"), "--device", "cpu"])
    (forward, forward_ts), (reverse, reverse_ts) = seen["walks"]
    # the forward process from t = 0, the images themselves, up to x_T's noise
    assert forward_ts == sorted(forward_ts) and forward_ts[0] == 0
    spread = [images.std().item() for images in forward]
    assert spread[0] < spread[-1]
    # the reverse walk and the GIF from x_T down to x_0
    assert reverse_ts == sorted(reverse_ts, reverse=True) and reverse_ts[-1] == 0
    states, gif_ts = seen["gif"]
    assert gif_ts == sorted(gif_ts, reverse=True) and gif_ts[0] == 20
    torch.testing.assert_close(states[-1, :len(reverse[-1])], reverse[-1])


# planted: under float16, the gradients are clipped after the scaler unscales them
def test_clipping_under_a_real_grad_scaler_clips_the_true_gradients(
    tmp_path, monkeypatch, capsys
):
    narrow_unets(monkeypatch)
    # a loss whose gradient is 10 in every weight
    monkeypatch.setattr(
        DDPM, "forward", lambda self, x, c: 10 * sum(p.sum() for p in self.parameters())
    )
    clip, norms = torch.nn.utils.clip_grad_norm_, []

    def seen(parameters, max_norm):
        parameters = list(parameters)
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in parameters]))
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", seen)
    argv = [*FLAGS.split(), "--epochs", "1", "--amp", "fp16", "--grad-clip", "1.0",
            "--out", str(tmp_path)]
    assert train("cifar10", argv, capsys)[0] == 0
    n_weights = sum(p.numel() for p in NaiveUnet(3, 3, 8).parameters())
    # the true norm, 10 sqrt(n): not 65536 times it, as the scaled gradients are
    assert [float(n) for n in norms] == pytest.approx([10 * n_weights**0.5] * 4)


# planted: MNIST's grid maps [-0.5, 0.5] to [0, 1], so a black sample is black
def test_a_black_sample_is_black_in_mnist_s_grid(tmp_path, monkeypatch):
    monkeypatch.setattr(
        DDPM, "sample",
        lambda self, n, size, device, c=None, guide_w=0.0: torch.full((n, *size), -0.5),
    )
    trainer.train(
        "mnist", n_epoch=1, device="cpu", batch_size=2, n_T=2, out=str(tmp_path),
        eps_model="unet", n_feat=8, fake_data=2, num_workers=0,
    )
    tiles = grid_tiles(tmp_path / "ddpm_sample_0.png", 32)
    assert len(tiles) == 16 and all(tile.max() == 0 for tile in tiles)
