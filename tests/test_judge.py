"""The digit judge: its figures against arithmetic done apart from it, the grids it
reads back, the junk it refuses, its shipped weights, the command on the shipped
model, a judge trained from MNIST's files, and fid's --features digits."""
import json
import math
import os

import pytest
import torch
from torchvision.utils import make_grid, save_image

from conftest import REPO
from mindiffusion import fid, frechet
from mindiffusion.judge import command, model, scores
from mindiffusion.sample import load_ddpm
from mindiffusion.training.data import denormalize
from test_loaders import write_idx

SHIPPED_MODEL = REPO / "contents" / "mnist_laptop_cond.pth"


def one_hot(label: int, sure: float) -> list[float]:
    """Eleven probabilities: `sure` on label, the rest spread evenly."""
    return [sure if k == label else (1 - sure) / 10 for k in range(11)]


def test_the_digit_score_is_the_inception_score_worked_by_hand():
    rows = [one_hot(3, 0.9), one_hot(7, 0.6), one_hot(model.JUNK, 0.8)]
    # by hand: junk counts as no digit in particular, a tenth to each digit
    q = [[row[k] + row[10] / 10 for k in range(10)] for row in rows]
    marginal = [sum(column) / 3 for column in zip(*q)]
    kl = [sum(p * math.log(p / m) for p, m in zip(row, marginal)) for row in q]
    expected = math.exp(sum(kl) / 3)
    assert scores.digit_score(torch.tensor(rows)) == pytest.approx(expected, rel=1e-6)


def test_the_digit_score_runs_from_one_to_ten():
    def score(labels):
        return scores.digit_score(torch.eye(11)[labels])

    assert score(list(range(10))) == pytest.approx(10)
    assert score([4] * 10) == pytest.approx(1)
    assert score([model.JUNK] * 10) == pytest.approx(1)
    # half junk, half ten sure digits: exp(log(10) / 2)
    assert score(list(range(10)) + [model.JUNK] * 10) == pytest.approx(10**0.5)


def test_figures_count_sure_digits_and_those_drawn_as_asked():
    probs = torch.tensor([
        one_hot(3, 0.95),
        # not sure enough
        one_hot(4, 0.85),
        one_hot(model.JUNK, 0.99),
        one_hot(3, 0.92),
        one_hot(8, 0.9),
    ])
    result = scores.figures(probs, asked=torch.tensor([3, 4, 5, 5, 8]))
    assert (result["samples"], result["digits"], result["distinct"]) == (5, 3, 2)
    assert result["as_asked"] == 2


def test_the_frechet_distance_of_feature_moments_is_that_of_two_gaussians():
    def moments(mean, spread):
        """The moments of the 2d points mean +- spread_k e_k: mean `mean`, and a
        diagonal covariance of 2 spread_k^2 / (2d - 1), unbiased."""
        steps = torch.diag(spread)
        features = torch.cat([mean + steps, mean - steps]).double()
        m = frechet.Moments()
        m.add(features)
        return m.statistics()

    d = 3
    m1, a1 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.5, 2.0])
    m2, a2 = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([3.0, 0.5, 1.0])
    # two Gaussians of diagonal covariances s^2: |m1 - m2|^2 + |s1 - s2|^2
    s1, s2 = (a * math.sqrt(2 / (2 * d - 1)) for a in (a1, a2))
    expected = float((m1 - m2).square().sum() + (s1 - s2).square().sum())
    (mu1, sigma1), (mu2, sigma2) = moments(m1, a1), moments(m2, a2)
    got = frechet.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("side", [28, 32])
def test_a_grid_is_read_back_cell_by_cell(tmp_path, side):
    g = torch.Generator().manual_seed(0)
    # 10 images, 4 to a row: the last row is short, and its two empty cells are
    # black, as a black sample is: the grid's shape says 12 cells
    images = torch.rand(10, 1, side, side, generator=g)
    path = tmp_path / "grid.png"
    save_image(make_grid(images, nrow=4), path)
    read, rows = scores.grid_images(str(path))
    assert rows == 3
    assert read.shape == (12, 1, side, side)
    # 8 bits a pixel
    assert (read[:10] - images).abs().max() <= 0.5 / 255 + 1e-6
    assert read[10:].max() == 0


def test_the_shipped_weights_load_safely_and_fit_in_a_megabyte():
    path = REPO / "contents" / "mnist_judge.pth"
    assert path.stat().st_size <= 1_000_000
    state = torch.load(path, weights_only=True)
    model.DigitJudge().load_state_dict(state["model"])


def test_static_and_blank_images_are_junk_not_digits():
    g = torch.Generator().manual_seed(1)
    static = torch.rand(32, 1, 28, 28, generator=g)
    blanks = torch.linspace(0, 1, 8).view(8, 1, 1, 1).expand(8, 1, 32, 32)
    for images in (static, blanks):
        probs, _ = model.read(model.load_judge(), images)
        result = scores.figures(probs, None)
        assert result["digits"] == 0
        assert (probs.argmax(1) == model.JUNK).float().mean() >= 0.9


def figures_printed(out: str) -> dict:
    """The command's shares, by the words that start their lines."""
    shares = {}
    for line in out.splitlines():
        words, _, rest = line.partition(": ")
        if rest[:1].isdigit():
            shares[words] = float(rest.split()[0])
    return shares


def test_the_shipped_model_draws_every_digit_it_is_asked_for(capsys, tmp_path):
    # DDIM's 20 steps with fresh noise at each (eta 1), x_0 kept within MNIST's
    # range, as the lab draws the shipped model first
    command.main([
        str(SHIPPED_MODEL), "--n", "4", "--eta", "1",
        "--data-root", str(tmp_path),
    ])
    shares = figures_printed(capsys.readouterr().out)
    assert shares["read as digits (at least 90% sure)"] >= 0.9
    assert shares["distinct digits"] == 10
    assert shares["drawn as the digit asked for"] >= 0.9


def test_a_digit_on_a_grey_speckled_background_is_still_its_digit():
    # a young model's digits sit on a background lifted and speckled, unlike
    # MNIST's black; a judge that took those for junk would sink every lesson grid
    ddim, recipe = load_ddpm(str(SHIPPED_MODEL), "ddim", 10, 1.0, True)
    asked = torch.arange(10).repeat_interleave(2)
    torch.manual_seed(0)
    x = ddim.eval().sample(20, recipe["image_size"], "cpu", asked, 2.0)
    digits = denormalize(x, recipe["normalize"])
    g = torch.Generator().manual_seed(0)
    speckled = digits * 0.88 + 0.12 + 0.06 * torch.randn(digits.shape, generator=g)
    judge = model.load_judge()
    for images in (digits, speckled.clamp(0, 1)):
        probs, _ = model.read(judge, images)
        assert scores.figures(probs, asked)["as_asked"] >= 18


def test_a_grid_that_is_not_one_is_one_sentence(tmp_path, capsys):
    path = tmp_path / "odd.png"
    save_image(torch.rand(1, 50, 50), path)
    with pytest.raises(SystemExit) as stop:
        command.main([str(path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a grid of 28x28 or 32x32" in err
    save_image(make_grid(torch.rand(16, 1, 28, 28), nrow=4), path)
    with pytest.raises(SystemExit):
        command.main([str(path), "--rows-are-classes"])
    assert "4 rows of images, not ten" in capsys.readouterr().err


def write_mnist(root, n_train: int, n_test: int) -> None:
    """MNIST's four IDX files under root, of random digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n).byte() % 10)


def test_a_judge_trained_from_mnist_files_loads_safely(tmp_path, capsys):
    write_mnist(tmp_path, 24, 8)
    out = tmp_path / "judge.pth"
    args = ["--train", "--data-root", str(tmp_path), "--epochs", "1",
            "--per-class", "1", "--out", str(out)]
    command.main(args)
    assert "on MNIST's 8 test digits" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    model.DigitJudge().load_state_dict(state["model"])
    before = out.read_bytes()
    # a second run leaves the first one's weights alone
    with pytest.raises(SystemExit):
        command.main(args)
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_the_command_gives_the_frechet_distance_where_mnist_is_there(tmp_path, capsys):
    write_mnist(tmp_path, 4, 20)
    grid = tmp_path / "grid.png"
    save_image(make_grid(torch.rand(40, 1, 28, 28), nrow=4), grid)
    command.main([str(grid), "--data-root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Frechet distance to MNIST's 20 test digits" in out
    (tmp_path / "none").mkdir()
    command.main([str(grid), "--data-root", str(tmp_path / "none")])
    assert "Frechet distance: left out, no MNIST in" in capsys.readouterr().out


def test_fid_takes_the_judges_features_with_no_download(tmp_path, monkeypatch):
    def no_inception(*args):
        raise AssertionError("--features digits loaded the Inception")

    monkeypatch.setattr(fid, "inception", no_inception)
    figures = tmp_path / "fid.json"
    fid.main([
        str(SHIPPED_MODEL), "--features", "digits", "--fake-data", "8", "--n", "8",
        "--steps", "2", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
        "--json", str(figures),
    ])
    result = json.loads(figures.read_text())
    assert result["extractor"].startswith("mindiffusion digit judge, 128 features")
    assert math.isfinite(result["results"][0]["fid"])
    assert os.listdir(tmp_path / "cache")


@pytest.mark.parametrize("argv, said", [
    (["grid.png", "--n", "4"], "--n is for sampling a checkpoint"),
    (["grid.png", "--epochs", "2"], "--epochs is for --train"),
    (["model.pth", "--out", "j.pth"], "--out is for --train"),
    (["--train", "--out", "j.pth", "--eta", "1"], "--eta is for sampling"),
    (["model.pth", "--sampler", "ddpm", "--steps", "5"], "--steps is DDIM's"),
    (["model.pth", "--rows-are-classes"], "--rows-are-classes is for a grid PNG"),
    (["--train"], "--train needs --out PTH"),
    ([], "give a grid PNG or a checkpoint to read, or --train"),
])
def test_a_flag_the_command_would_ignore_is_refused(argv, said, capsys):
    with pytest.raises(SystemExit) as stop:
        command.main(argv)
    assert stop.value.code == 2
    assert said in capsys.readouterr().err
