"""python -m mindiffusion.figures: each figure is written at its size, and its data
are the DDPM's own equations: the forward noising, the schedules' closed forms,
Algorithm 2's walk from x_T to x_0, and the record's losses."""
import csv
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageSequence
from torchvision.datasets import MNIST
from torchvision.transforms.functional import to_tensor

from mindiffusion.figures import command as figures_command
from mindiffusion.figures import lesson as figures
from mindiffusion.training.data import SHIPPED_DIGITS, denormalize
from mindiffusion.ddim import DDIM
from mindiffusion.judge.model import load_judge, read
from mindiffusion.judge.scores import figures as judge_figures
from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet

N_T = 20
RECIPE = dict(
    dataset="MNIST", eps_model="NaiveUnet", eps_model_args=(1, 1, 8),
    betas=(1e-4, 0.02), n_T=N_T, image_size=(1, 32, 32),
    normalize=((0.5,), (1.0,)), n_classes=None, classes=None, p_uncond=None,
)


def tiny_ddpm():
    torch.manual_seed(0)
    return DDPM(NaiveUnet(1, 1, 8), RECIPE["betas"], N_T).eval()


@pytest.fixture
def checkpoint(tmp_path):
    """A weights-only checkpoint of an untrained narrow UNet, with its record."""
    path = tmp_path / "tiny.pth"
    model = tiny_ddpm().state_dict()
    torch.save({"model": model, "recipe": RECIPE, "averaged": False}, path)
    with open(tmp_path / "tiny_log.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["epoch", "step", "loss", "lr", "images_per_s", "seconds"])
        writer.writerows([[0, 63, 0.2, 1e-3, 100, 30], [1, 126, 0.05, 1e-3, 100, 30]])
    return path


def test_the_walks_take_the_lessons_timesteps():
    assert figures.timesteps(1000) == [0, 50, 100, 250, 500, 750, 1000]
    assert figures.timesteps(20) == [0, 1, 2, 5, 10, 15, 20]


def test_forward_noising_is_sqrtab_x_plus_sqrtmab_eps_with_the_seeded_eps():
    ddpm = tiny_ddpm()
    x0 = torch.rand(3, 1, 32, 32) - 0.5
    x_t, eps = figures.forward_noising(x0, ddpm, [0, 5, 20], seed=7)
    # the figure's noise: a generator of its own, seeded with --seed
    seeded = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(eps, seeded)
    betas = torch.linspace(1e-4, 0.02, N_T + 1, dtype=torch.float64)
    alphabar = torch.cumprod(1 - betas, 0).float()
    for row, t in zip(x_t, [0, 5, 20]):
        expected = alphabar[t].sqrt() * x0 + (1 - alphabar[t]).sqrt() * seeded
        torch.testing.assert_close(row, expected)


def test_the_schedule_curves_are_the_closed_forms():
    curves = figures.schedule_curves((1e-4, 0.02), 1000)
    t = torch.arange(1001, dtype=torch.float64)
    # beta_t = beta1 + (beta2 - beta1) t / T, and alphabar_t its running product
    beta = 1e-4 + (0.02 - 1e-4) * t / 1000
    alphabar = torch.cumprod(1 - beta, 0)
    expected = dict(beta_t=beta, alphabar_t=alphabar, sqrtab=alphabar.sqrt(),
                    sqrtmab=(1 - alphabar).sqrt())
    for name, curve in expected.items():
        torch.testing.assert_close(curves[name].double(), curve, rtol=1e-5, atol=1e-6)


def test_the_reverse_walk_goes_from_x_T_to_the_samples():
    ddpm = tiny_ddpm()
    ts = figures.timesteps(N_T)
    torch.manual_seed(3)
    with torch.no_grad():
        walk = figures.reverse_walk(ddpm, 2, (1, 32, 32), "cpu", ts, None)
    torch.manual_seed(3)
    x_T = torch.randn(2, 1, 32, 32)
    torch.manual_seed(3)
    with torch.no_grad():
        x_0 = ddpm.sample(2, (1, 32, 32), "cpu")
    assert walk.shape == (len(ts), 2, 1, 32, 32)
    assert torch.equal(walk[0], x_T)
    assert torch.equal(walk[-1], x_0)


def test_the_loss_curve_reads_the_record(checkpoint):
    epochs, losses = figures.loss_curve(str(checkpoint.with_name("tiny_log.csv")))
    assert (epochs, losses) == ([0, 1], [0.2, 0.05])


def test_the_command_writes_ten_figures_of_their_sizes(checkpoint, tmp_path, capsys):
    out = tmp_path / "figures"
    argv = [str(checkpoint), "--out", str(out), "--device", "cpu", "--seed", "1"]
    figures_command.main(argv)
    # (width, height) in pixels: 1.4 inches an image at 100 dpi, 7 timesteps by 6
    # images and a title; the schedules 10x4 inches, the loss 6x4
    sizes = {
        "forward_noising.png": (980, 900),
        "reverse_walk.png": (980, 900),
        # 7 timesteps by 3 images, each as x_t and as the model's x_0
        "walk_and_x0.png": (980, 900),
        "schedules.png": (1000, 400),
        "loss_per_t.png": (1000, 400),
        "loss_curve.png": (600, 400),
        # a 4x4 grid of 32x32 images, 2 pixels apart, under the label of t: 138
        # pixels wide, enlarged 4 times to reach 512
        "reverse_walk.gif": (4 * 138, 4 * (138 + figures.LABEL)),
        # the deterministic walk's: 9 frames of 4 pairs; n_T 20 walked in 10 and
        # 20 steps, 6 images; 6 images up to x_T and back: each at least 512 wide
        "interpolation.png": (1260, 620),
        "consistency.png": (512, 900),
        "inversion.png": (512, 900),
    }
    for name, size in sizes.items():
        assert Image.open(out / name).size == size, name
    # the same seed draws the same figures; no file is replaced
    figures_command.main(argv)
    for name in sizes:
        stem, extension = os.path.splitext(name)
        again = out / f"{stem}_2{extension}"
        assert again.read_bytes() == (out / name).read_bytes(), name
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("text", [
    "a,b\n1,2\n",
    # a record's header with no epoch under it: an empty plot, were it taken
    "epoch,step,loss,lr,images_per_s,seconds\n",
    "\x00\x89PNG garbage, not a CSV\n",
])
def test_a_record_that_is_not_one_is_one_sentence(checkpoint, tmp_path, capsys, text):
    bad = tmp_path / "bad.csv"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        figures_command.main([str(checkpoint), "--record", str(bad), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "is not a run's record" in err and "\n" not in err


def test_offline_data_root_says_what_figures_can_do_instead(
    tmp_path, capsys, no_network
):
    # a CIFAR-10 model: no CIFAR-10 ships with the repository
    path = tmp_path / "cifar.pth"
    recipe = dict(RECIPE, dataset="CIFAR10", eps_model_args=(3, 3, 8),
                  image_size=(3, 32, 32), normalize=((0.5,) * 3, (0.5,) * 3))
    model = DDPM(NaiveUnet(3, 3, 8), RECIPE["betas"], N_T).state_dict()
    torch.save({"model": model, "recipe": recipe, "averaged": False}, path)
    (tmp_path / "none").mkdir()
    with pytest.raises(SystemExit):
        figures_command.main([str(path), "--data-root", str(tmp_path / "none"),
                              "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "leave --data-root out to noise the model's own samples" in err
    # figures has no such flag
    assert "--fake-data" not in err


def images_noised(monkeypatch) -> list:
    """While monkeypatch lasts, each x0 the figures command hands forward_noising."""
    noised = []
    noising = figures_command.forward_noising

    def keep(x0, *args):
        noised.append(x0)
        return noising(x0, *args)

    monkeypatch.setattr(figures_command, "forward_noising", keep)
    return noised


def test_an_mnist_model_s_figures_noise_the_shipped_digits_when_given_them(
    checkpoint, tmp_path, monkeypatch, capsys, no_network
):
    noised = images_noised(monkeypatch)
    figures_command.main([str(checkpoint), "--data-root", SHIPPED_DIGITS,
                          "--device", "cpu", "--out", str(tmp_path / "out")])
    assert f"MNIST: the 5,000 digits that ship in {SHIPPED_DIGITS}" in (
        capsys.readouterr().out
    )
    # the first six training digits, padded to 32x32 and normalised as trained
    digits = MNIST(SHIPPED_DIGITS, train=True)
    expected = torch.stack([
        nn.functional.pad(to_tensor(digits[k][0]), (2, 2, 2, 2)) - 0.5
        for k in range(figures.N_IMAGES)
    ])
    torch.testing.assert_close(noised[0], expected)


def test_a_read_only_out_is_refused_before_any_sampling(
    checkpoint, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "read_only"
    out.mkdir()
    monkeypatch.setattr(
        figures_command, "cannot_write_in",
        lambda folder: "Read-only file system" if folder == str(out) else None,
    )
    monkeypatch.setattr(DDPM, "sample", lambda *args, **kwargs: pytest.fail("sampled"))
    with pytest.raises(SystemExit) as exit_info:
        figures_command.main([str(checkpoint), "--out", str(out), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"error: --out {out} cannot be written in (Read-only file system): choose "
        f"another --out\n"
    )


def test_without_data_the_images_noised_are_ddim_samples_with_posterior_noise(
    checkpoint, tmp_path, monkeypatch
):
    noised = images_noised(monkeypatch)
    figures_command.main([str(checkpoint), "--out", str(tmp_path), "--device", "cpu",
                          "--seed", "3"])
    # eta 1: a young model's deterministic walk can end in static; x_0 kept within
    # MNIST's range, as every DDIM of the commands keeps it by default
    ddpm = tiny_ddpm()
    ddim = DDIM(ddpm.eps_model, RECIPE["betas"], N_T, eta=1.0, n_steps=N_T,
                x0_range=(-0.5, 0.5)).eval()
    torch.manual_seed(3)
    expected = ddim.sample(figures.N_IMAGES, RECIPE["image_size"], "cpu")
    assert torch.allclose(noised[0], expected, atol=1e-6)


def gif_frames(path) -> list:
    """The frames of a GIF, as 8-bit grey arrays, and their durations in ms."""
    with Image.open(path) as gif:
        frames = []
        for frame in ImageSequence.Iterator(gif):
            frames.append((np.array(frame.convert("L")), frame.info["duration"]))
    return frames


def test_the_gif_walks_from_x_T_to_the_sampler_s_output(tmp_path):
    ddpm = tiny_ddpm()
    ts = figures.walk_steps(N_T, figures.GIF_FRAMES)[::-1]
    torch.manual_seed(5)
    with torch.no_grad():
        walk = figures.reverse_walk(ddpm, 16, (1, 32, 32), "cpu", ts, None)
    path = tmp_path / "walk.gif"
    figures.write_gif(denormalize(walk, RECIPE["normalize"]), ts, path)
    # x_T and the samples of the same seed, made apart from the walk
    torch.manual_seed(5)
    x_T = torch.randn(16, 1, 32, 32)
    torch.manual_seed(5)
    with torch.no_grad():
        x_0 = ddpm.sample(16, (1, 32, 32), "cpu")
    frames = gif_frames(path)
    # a frame at every step of this short walk, from t = N_T down to 0
    assert len(frames) == N_T + 1 == len(ts)
    for (pixels, _), x, t in ((frames[0], x_T, N_T), (frames[-1], x_0, 0)):
        expected = figures.gif_frame(denormalize(x, RECIPE["normalize"]), t)
        assert np.array_equal(pixels, np.array(expected))
    # the last frame is held
    durations = [duration for _, duration in frames]
    assert durations[-1] == figures.HOLD_MS > durations[0] == figures.FRAME_MS


@pytest.mark.parametrize("side, scale", [(32, 4), (128, 1)])
def test_a_gif_frame_is_its_grid_in_square_blocks_at_least_512_wide(
    tmp_path, side, scale
):
    # 16 grey images of side x side, each pixel's level a known function of where
    # it is; grid cell (row, col) starts 2 + 34 * row, 2 + 34 * col at side 32
    n, pad = 16, 2
    k = torch.arange(n).view(n, 1, 1, 1)
    i = torch.arange(side).view(1, 1, side, 1)
    j = torch.arange(side).view(1, 1, 1, side)
    images = ((k * 13 + i * 3 + j * 7) % 256).float() / 255
    path = tmp_path / "frame.gif"
    figures.write_gif(images[None], [0], path)
    (pixels, _), = gif_frames(path)
    grid = 4 * side + 5 * pad
    assert pixels.shape == (scale * (grid + figures.LABEL), scale * grid)
    assert scale * grid >= figures.WIDTH > (scale - 1) * grid
    # every pixel of the 1x frame is a scale x scale block of one level
    small = pixels[::scale, ::scale]
    assert np.array_equal(pixels, np.kron(small, np.ones((scale, scale), np.uint8)))
    # and the 1x frame holds image r * 4 + c at row r, column c, under the label
    for index in range(n):
        row, col = divmod(index, 4)
        top = figures.LABEL + pad + row * (side + pad)
        left = pad + col * (side + pad)
        cell = small[top:top + side, left:left + side]
        assert np.array_equal(cell, (images[index, 0] * 255).round().byte().numpy())


def test_a_gif_of_static_fits_in_three_megabytes(tmp_path):
    # static compresses worst: each frame of the walk's full length all noise, in
    # colour, at CIFAR-10's 32 pixels (the shipped model's walk, grey and forming
    # digits, takes 1.7 MB; CelebA's 128-pixel static, not enlarged, 7.6 MB)
    g = torch.Generator().manual_seed(0)
    states = torch.rand(figures.GIF_FRAMES + 1, figures.GIF_IMAGES, 3, 32, 32,
                        generator=g)
    path = tmp_path / "static.gif"
    figures.write_gif(states, figures.walk_steps(1000, figures.GIF_FRAMES)[::-1], path)
    assert path.stat().st_size <= 3_000_000
    assert len(gif_frames(path)) == figures.GIF_FRAMES + 1


class Identity(torch.nn.Module):
    """A noise model that returns its input x_t as the noise."""

    def forward(self, x, t, c=None):
        return x


def test_the_loss_per_timestep_is_the_training_loss_at_each_t():
    ddpm = DDPM(Identity(), RECIPE["betas"], 1000)
    a = 0.5
    x0 = torch.full((6, 1, 32, 32), a)
    ts = [1, 100, 500, 1000]
    losses = figures.loss_per_timestep(ddpm, x0, None, ts, seed=0)
    # eps_theta = x_t = sqrtab a + sqrtmab eps, so eps - eps_theta is
    # (1 - sqrtmab) eps - sqrtab a, of mean square (1 - sqrtmab)^2 + alphabar a^2
    for t, loss in zip(ts, losses):
        sqrtab, sqrtmab = ddpm.sqrtab[t].item(), ddpm.sqrtmab[t].item()
        expected = (1 - sqrtmab) ** 2 + sqrtab**2 * a**2
        # 6 images x 16 draws x 1024 pixels of noise: within a few parts in 1000
        assert loss.item() == pytest.approx(expected, rel=0.02, abs=1e-3), t


def test_the_model_s_x_0_from_each_x_t_is_the_closed_form():
    # a model whose eps is its input: x_0 = (x_t - sqrtmab x_t) / sqrtab
    ddpm = DDPM(Identity(), RECIPE["betas"], 1000)
    states = torch.randn(3, 2, 1, 8, 8)
    ts = [1000, 250, 0]
    guesses = figures.predicted_x0(ddpm, states, ts, None)
    for state, guess, t in zip(states, guesses, ts):
        sqrtab, sqrtmab = ddpm.sqrtab[t], ddpm.sqrtmab[t]
        expected = state if t == 0 else (state - sqrtmab * state) / sqrtab
        torch.testing.assert_close(guess, expected)


def test_the_guidance_sweep_has_a_row_for_each_weight_with_the_judge_s_share(
    tmp_path, monkeypatch
):
    path = tmp_path / "cond.pth"
    recipe = dict(RECIPE, n_classes=10, classes=[f"{k} - digit" for k in range(10)])
    torch.manual_seed(0)
    model = DDPM(NaiveUnet(1, 1, 8, 10), RECIPE["betas"], N_T, n_classes=10)
    torch.save({"model": model.state_dict(), "recipe": recipe, "averaged": False},
               path)
    grids = {}
    plot_grid = figures_command.plot_grid

    def kept(images, columns, title, out, rows=None, captions=None):
        grids[os.path.basename(out)] = (images, rows)
        plot_grid(images, columns, title, out, rows, captions)

    monkeypatch.setattr(figures_command, "plot_grid", kept)
    figures_command.main([str(path), "--out", str(tmp_path / "f"), "--device", "cpu"])
    images, rows = grids["guidance_sweep.png"]
    # a column for each sample, a row for each weight, in order
    assert images.shape[:2] == (figures.SWEEP_SAMPLES, len(figures.SWEEP_WEIGHTS))
    assert [row.split("\n")[0] for row in rows] == [
        f"w = {w}" for w in figures.SWEEP_WEIGHTS
    ]
    judge = load_judge()
    for k, row in enumerate(rows):
        probs, _ = read(judge, images[:, k])
        share = judge_figures(probs, torch.zeros(len(probs)))
        assert row.endswith(f"{share['as_asked'] / share['samples']:.2f} as asked")
    assert Image.open(tmp_path / "f" / "guidance_sweep.png").size[0] >= 512
    # x_t and the model's x_0, two rows for each of the first images
    images, rows = grids["walk_and_x0.png"]
    assert rows == ["x_t (0)", "x_0", "x_t (1)", "x_0", "x_t (2)", "x_0"]
    assert images.shape[1] == 6
