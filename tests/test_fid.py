"""FID: the Fréchet distance against closed forms, and python -m mindiffusion.fid end
to end with a small stand-in for the Inception network (no weights are downloaded)."""

import errno
import json
import os
import struct

from PIL import Image
import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.utils import save_image

from mindiffusion import fid, frechet
from mindiffusion.ddim import DDIM
from mindiffusion.training.flags import UserError
import mindiffusion.train as trainer



def test_diagonal_covariances_give_the_closed_form():
    torch.manual_seed(0)
    a, b = torch.rand(64) + 0.1, torch.rand(64) + 0.1
    mu1, mu2 = torch.randn(64), torch.randn(64)
    # with diagonal covariances, (sigma1 sigma2)^(1/2) is diag(sqrt(a b))
    expected = ((a.double().sqrt() - b.double().sqrt()) ** 2).sum()
    expected += ((mu1.double() - mu2.double()) ** 2).sum()
    result = frechet.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert result == pytest.approx(float(expected), rel=1e-12)


def test_identical_inputs_are_at_distance_zero():
    torch.manual_seed(0)
    features = torch.randn(500, 64, dtype=torch.float64)
    mu, sigma = features.mean(0), torch.cov(features.T)
    assert abs(frechet.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * sigma.trace()


def test_singular_covariances_fewer_samples_than_features():
    torch.manual_seed(0)
    # rank-one covariances u u^T and v v^T: tr((sigma1 sigma2)^(1/2)) = |u . v|
    u, v = torch.randn(2, 2048, dtype=torch.float64)
    zero = torch.zeros(2048)
    expected = u.dot(u) + v.dot(v) - 2 * u.dot(v).abs()
    result = frechet.frechet_distance(zero, torch.outer(u, u), zero, torch.outer(v, v))
    assert result == pytest.approx(float(expected), rel=1e-9)
    # sample covariances of 50 samples in 200 dimensions, against the trace of the
    # root through the eigenvalues of the non-symmetric product sigma1 sigma2
    x = torch.randn(50, 200, dtype=torch.float64)
    y = 1.3 * torch.randn(50, 200, dtype=torch.float64) + 0.2
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    roots = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = (x.mean(0) - y.mean(0)).square().sum() + s1.trace() + s2.trace()
    expected -= 2 * roots
    result = frechet.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert result == pytest.approx(float(expected), rel=1e-7)


def test_images_go_in_as_save_image_rounds_them_with_three_channels(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    # exact halves, where rounding up or down shows
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 254.5]) / 255
    save_image(x[0], tmp_path / "one.png")
    written = torch.from_numpy(np.array(Image.open(tmp_path / "one.png")))
    pixels = frechet.to_uint8(x)
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 3, 8, 8)
    for channel in range(3):
        # save_image writes a gray image as three equal channels too
        assert torch.equal(pixels[0, channel], written[..., channel])


class StandIn(nn.Module):
    """A small feature extractor in the Inception's place, recording its inputs."""

    # the name the cache key gives the Inception
    name = fid.EXTRACTOR

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append((x.dtype, tuple(x.shape)))
        x = x.double()
        # 9 features: each channel's mean, spread and top-left pixel
        features = [x.mean((2, 3)), x.std((2, 3)), x[:, :, 0, 0]]
        return (torch.cat(features, 1).float(),)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar")
    run = dict(device="cpu", batch_size=2, n_T=3, fake_data=2, num_workers=0)
    trainer.train("cifar10", n_epoch=1, out=str(out), **run)
    return str(out / "ddpm_cifar.pth")


@pytest.fixture
def stand_in(monkeypatch):
    extractor = StandIn()
    monkeypatch.setattr(fid, "inception", lambda weights, device: extractor)
    return extractor


def fid_command(checkpoint, tmp_path, *flags, capsys):
    flags = ["--n", "5", "--batch-size", "2", "--device", "cpu", *flags]
    fid.main([checkpoint, *flags, "--cache-dir", str(tmp_path / "cache")])
    return capsys.readouterr()


def test_the_command_end_to_end(checkpoint, stand_in, tmp_path, capsys, monkeypatch):
    # each call of the noise model, by how many batches the stand-in had seen then
    calls = []
    load_ddpm = fid.load_ddpm

    def counted(*args):
        ddpm, recipe = load_ddpm(*args)
        ddpm.eps_model.register_forward_pre_hook(
            lambda module, inputs: calls.append(len(stand_in.seen))
        )
        return ddpm, recipe

    monkeypatch.setattr(fid, "load_ddpm", counted)
    printed = fid_command(
        checkpoint, tmp_path, "--fake-data", "4", "--seed", "0", "--steps", "1,3",
        "--eta", "1", "--json", str(tmp_path / "fid.json"), capsys=capsys,
    )
    lines = printed.out.strip().splitlines()
    # the training set in 2 batches, then 5 samples in batches of 2, 2 and 1 for
    # each of the two step counts
    assert [shape[0] for _, shape in stand_in.seen] == [2, 2] + [2, 2, 1] * 2
    # each entry sampled in its own steps: 1 model call a batch, then 3
    assert [calls.count(k) for k in range(2, 8)] == [1, 1, 1, 3, 3, 3]
    assert all(
        dtype == torch.uint8 and shape[1:] == (3, 32, 32)
        for dtype, shape in stand_in.seen
    )
    assert lines[-4:-1] == [
        " steps  FID",
        f"     1  {float(lines[-3].split()[1]):.2f}",
        f"     3  {float(lines[-2].split()[1]):.2f}",
    ]
    figures = json.loads((tmp_path / "fid.json").read_text())
    assert [r["steps"] for r in figures["results"]] == [1, 3]
    assert figures["eta"] == 1.0
    assert lines[-1] == (
        f"FID: {figures['results'][-1]['fid']:.4f} (n=5, sampler=ddim, steps=3, "
        f"eta=1.0)"
    )
    assert "warning: --n 5 is below the papers' 50,000" in printed.err

    # the second run takes the training set's statistics from the cache, and the
    # same seed gives the same FID
    stand_in.seen.clear()
    again = fid_command(
        checkpoint, tmp_path, "--fake-data", "4", "--seed", "0", "--steps", "1,3",
        "--eta", "1", capsys=capsys,
    )
    assert "reference statistics from the cache" in again.out
    assert [shape[0] for _, shape in stand_in.seen] == [2, 2, 1] * 2
    assert again.out.strip().splitlines()[-1] == lines[-1]
    # another reference, here 6 images instead of 4, is computed anew
    stand_in.seen.clear()
    other = fid_command(checkpoint, tmp_path, "--fake-data", "6", capsys=capsys)
    assert "from the cache" not in other.out
    assert [shape[0] for _, shape in stand_in.seen][:3] == [2, 2, 2]


def test_offline_without_weights_is_one_sentence(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as error:
        fid.inception(None, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith(
        f"the Inception weights are not in {tmp_path / 'torch' / 'hub' / 'checkpoints'}"
        f" and could not be downloaded ("
    )
    assert message.endswith(
        f"fetch {fid.INCEPTION_URL} on a machine with a network and give it with "
        f"--inception-weights PATH"
    )


def test_a_conditional_checkpoint_draws_its_classes_in_equal_numbers(
    stand_in, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "mnist"
    trainer.train("mnist", n_epoch=1, device="cpu", batch_size=2, n_T=2,
                 fake_data=2, out=str(out), num_workers=0, eps_model="unet", n_feat=8,
                 cond=True)
    drawn = []
    sample = DDIM.sample

    def recording_sample(self, n_sample, size, device, c=None, guide_w=0.0):
        drawn.append((c.tolist(), guide_w))
        return sample(self, n_sample, size, device, c, guide_w)

    monkeypatch.setattr(DDIM, "sample", recording_sample)
    printed = fid_command(
        str(out / "ddpm_mnist.pth"), tmp_path, "--fake-data", "4", "--guide-w", "1.5",
        "--n", "20", "--batch-size", "8", capsys=capsys,
    )
    labels = [label for c, _ in drawn for label in c]
    # 20 samples of 10 classes: each class twice, in batches of 8, 8 and 4
    assert [len(c) for c, _ in drawn] == [8, 8, 4]
    assert sorted(labels) == sorted(list(range(10)) * 2)
    assert {w for _, w in drawn} == {1.5}
    assert printed.out.strip().splitlines()[-1].endswith(
        "(n=20, sampler=ddim, steps=2, eta=0.0, guide_w=1.5)"
    )


def test_guide_w_on_an_unconditional_checkpoint_is_one_sentence(
    checkpoint, stand_in, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        fid_command(checkpoint, tmp_path, "--fake-data", "4", "--guide-w", "1",
                    capsys=capsys)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"python -m mindiffusion.fid: error: --guide-w: {checkpoint} was trained "
        f"without --cond, so it has no classes to guide towards"
    )


def refused(argv, capsys):
    """fid.main's exit status and its last line on stderr, for a refused command."""
    with pytest.raises(SystemExit) as exit_info:
        fid.main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command reads its checkpoint, where all its work begins."""

    def load_ddpm(*args):
        raise AssertionError("the checkpoint was read")

    monkeypatch.setattr(fid, "load_ddpm", load_ddpm)


def test_an_existing_or_folderless_json_is_refused_before_any_work(
    tmp_path, no_work, capsys
):
    existing = tmp_path / "fid.json"
    existing.write_text("earlier figures")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    code, line = refused(["run.pth", "--json", str(existing), *cache], capsys)
    assert code == 2
    assert line == (
        f"python -m mindiffusion.fid: error: --json {existing} already exists: "
        f"choose another file"
    )
    assert existing.read_text() == "earlier figures"
    missing = tmp_path / "no" / "fid.json"
    code, line = refused(["run.pth", "--json", str(missing), *cache], capsys)
    assert code == 2
    assert line.endswith(f"error: --json {missing}: its folder does not exist")


def test_a_cache_dir_that_is_a_file_is_refused_before_any_work(
    tmp_path, no_work, capsys
):
    a_file = tmp_path / "cache"
    a_file.write_text("")
    code, line = refused(["run.pth", "--cache-dir", str(a_file)], capsys)
    assert code == 2
    assert line == (
        f"python -m mindiffusion.fid: error: --cache-dir {a_file} is a file: give a "
        f"folder"
    )


def test_other_weights_are_one_sentence_naming_the_file(tmp_path):
    weights = tmp_path / "resnet.pth"
    torch.save(nn.Linear(2, 2).state_dict(), weights)
    with pytest.raises(UserError) as error:
        fid.inception(str(weights), torch.device("cpu"))
    assert str(error.value) == (
        f"--inception-weights {weights} holds other weights than torch-fidelity's "
        f"Inception: give the file downloaded from {fid.INCEPTION_URL}"
    )


def fake_reference(extractor, cache):
    """The statistics of 4 random 8x8 images, in batches of 2, cached in `cache`."""
    dataset, name = fid.reference_dataset(dict(image_size=(3, 8, 8)), None, 4)
    device = torch.device("cpu")
    return fid.reference_statistics(dataset, name, extractor, 2, device, str(cache))


def test_an_unreadable_cache_is_computed_again_and_rewritten(tmp_path, capsys):
    extractor = StandIn()
    mu, sigma = fake_reference(extractor, tmp_path)
    (path,) = tmp_path.iterdir()
    # a copy cut short, as a full disk or a killed run would leave it
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    again = fake_reference(extractor, tmp_path)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"the cached reference statistics in {path} cannot be read: computing them "
        f"again"
    )
    assert len(extractor.seen) == 4
    assert torch.equal(again[0], mu) and torch.equal(again[1], sigma)
    # rewritten whole: the third time reads it
    fake_reference(extractor, tmp_path)
    assert "from the cache" in capsys.readouterr().out
    assert len(extractor.seen) == 4


def test_the_cache_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    extractor = StandIn()
    fake_reference(extractor, tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"an older, unreadable cache")

    def replace(source, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError) as error:
        fake_reference(extractor, tmp_path)
    assert str(error.value) == (
        f"the reference statistics' cache could not be written in {tmp_path} "
        f"(No space left on device)"
    )
    # the old file untouched, and no half-written one beside it
    assert list(tmp_path.iterdir()) == [path]
    assert path.read_bytes() == b"an older, unreadable cache"


def write_idx(path, array):
    """An IDX file as MNIST ships it: magic 0x08 (unsigned byte) and the dimensions."""
    header = struct.pack(">I", 0x0800 | array.dim())
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def test_mnist_at_28_and_at_32_pixels_do_not_share_statistics(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (4, 28, 28), dtype=torch.uint8, generator=g)
    for split, n in (("train", 4), ("t10k", 2)):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[:n])
        write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n).byte())
    extractor = StandIn()
    (tmp_path / "cache").mkdir()
    means = {}
    for side in (28, 32, 28, 32):
        # the recipes of train_mnist.py's DummyEpsModel and of its padded NaiveUnet
        recipe = dict(dataset="MNIST", image_size=(1, side, side))
        dataset, name = fid.reference_dataset(recipe, str(tmp_path), None)
        mu, _ = fid.reference_statistics(
            dataset, name, extractor, 2, torch.device("cpu"), str(tmp_path / "cache")
        )
        means.setdefault(side, []).append(mu)
    # each size computed once, in two batches of 2, then read from its own cache
    sizes = [shape[2:] for _, shape in extractor.seen]
    assert sizes == [(28, 28)] * 2 + [(32, 32)] * 2
    assert len(os.listdir(tmp_path / "cache")) == 2
    assert not torch.equal(means[28][0], means[32][0])
    for side in (28, 32):
        assert torch.equal(means[side][0], means[side][1])


def test_each_step_count_is_seeded_alone(checkpoint, stand_in, tmp_path, capsys):
    # --steps 1,3 draws its 3-step samples as --steps 3 alone does, with the same
    # --seed: each entry starts from the seed, not from where the last one ended
    def fid_of_3_steps(steps):
        fid_command(
            checkpoint, tmp_path, "--fake-data", "4", "--seed", "7", "--steps", steps,
            "--json", str(tmp_path / f"fid_{steps}.json"), capsys=capsys,
        )
        results = json.loads((tmp_path / f"fid_{steps}.json").read_text())["results"]
        return next(r["fid"] for r in results if r["steps"] == 3)

    assert fid_of_3_steps("1,3") == fid_of_3_steps("3")


@pytest.mark.parametrize(
    "flag", [["--steps", "5"], ["--eta", "1"], ["--raw-walk"], ["--unit-eps"]]
)
def test_ddim_s_flags_with_the_ddpm_sampler_are_refused_before_any_work(
    flag, tmp_path, no_work, capsys
):
    argv = ["run.pth", "--sampler", "ddpm", *flag, "--cache-dir", str(tmp_path)]
    code, line = refused(argv, capsys)
    assert code == 2
    assert line.endswith(
        "--steps, --eta, --raw-walk and --unit-eps are DDIM's: add --sampler ddim, "
        "or drop them"
    )
