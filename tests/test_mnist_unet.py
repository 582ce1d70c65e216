"""train_mnist.py --eps-model unet: the notes' NaiveUnet on MNIST padded to 32x32, the
--laptop preset, and --grid-every; the default run stays the notes' own."""


from PIL import Image
import pytest
import torch
from torchvision import transforms

from conftest import cheap_ddpm, run_script
from mindiffusion import sample
from mindiffusion.training import cli
from mindiffusion.training.data import FakeImages
import mindiffusion.train as trainer
from mindiffusion.unet import NaiveUnet
from mindiffusion.training.recipes import LAPTOP
from mindiffusion.dummy import DummyEpsModel

RUN = dict(device="cpu", batch_size=2, n_T=2, fake_data=2, num_workers=0)


@pytest.fixture
def seen_batches(monkeypatch):
    batches = []
    cheap_ddpm(monkeypatch, on_forward=lambda ddpm, x: batches.append(x.clone()))
    return batches


def test_the_default_run_is_the_notes(seen_batches, tmp_path):
    ddpm = trainer.train("mnist", n_epoch=1, out=str(tmp_path), **RUN)
    assert type(ddpm.eps_model) is DummyEpsModel
    notes_tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.5,), (1.0,))]
    )
    images = [notes_tf(image) for image, _ in FakeImages(2, (1, 28, 28))]
    (batch,) = seen_batches
    assert batch.shape == (2, 1, 28, 28)
    assert all(any(torch.equal(x, image) for image in images) for x in batch)
    recipe = torch.load(tmp_path / "ddpm_mnist.pth", weights_only=True)["recipe"]
    assert (recipe["eps_model"], recipe["image_size"]) == ("DummyEpsModel", (1, 28, 28))


def test_the_unet_trains_on_padded_digits_and_rebuilds_for_sampling(
    tmp_path, monkeypatch
):
    seen = []
    forward = NaiveUnet.forward

    def recording_forward(self, x, t):
        seen.append(x.shape)
        return forward(self, x, t)

    monkeypatch.setattr(NaiveUnet, "forward", recording_forward)
    ddpm = trainer.train(
        "mnist", n_epoch=1, out=str(tmp_path), eps_model="unet", n_feat=8, **RUN
    )
    assert isinstance(ddpm.eps_model, NaiveUnet) and ddpm.eps_model.n_feat == 8
    assert seen[0] == (2, 1, 32, 32)
    # 16 tiles of 32x32, with make_grid's 2-pixel padding
    assert Image.open(tmp_path / "ddpm_sample_0.png").size == (4 * 34 + 2,) * 2
    rebuilt, recipe = sample.load_ddpm(
        str(tmp_path / "ddpm_mnist.pth"), "ddpm", None, 0.0, use_ema=False
    )
    assert isinstance(rebuilt.eps_model, NaiveUnet) and rebuilt.eps_model.n_feat == 8
    assert recipe["image_size"] == (1, 32, 32)
    for name, value in ddpm.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name


def test_padding_is_black_around_the_digit(seen_batches, tmp_path):
    trainer.train(
        "mnist", n_epoch=1, out=str(tmp_path), eps_model="unet", n_feat=8, **RUN
    )
    (batch,) = seen_batches
    # black is 0, which the notes' Normalize((0.5,), (1.0,)) makes -0.5
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[2:30, 2:30] = True
    assert torch.all(batch[..., ~inside] == -0.5)
    assert not torch.all(batch[..., inside] == -0.5)


@pytest.mark.parametrize(
    "flags, sentence",
    [
        (
            ["--eps-model", "unet", "--n-feat", "12"],
            "--n-feat 12: NaiveUnet's GroupNorm(8, ...) needs a multiple of 8",
        ),
        (["--n-feat", "16"], "--n-feat is NaiveUnet's width: add --eps-model unet"),
    ],
)
def test_a_width_groupnorm_cannot_take_is_one_sentence(flags, sentence, capsys):
    flags = [*flags, "--device", "cpu", "--fake-data", "2"]
    code, err = run_script("mnist", flags, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].split(": error: ", 1)[1] == sentence


def test_the_laptop_preset_sets_its_flags_and_given_flags_win(capsys):
    _, seen = cli.parse(["mnist", "--laptop", "--lr", "0.5"], "")
    assert {k: seen[k] for k in LAPTOP if k != "lr"} == {
        k: v for k, v in LAPTOP.items() if k != "lr"
    }
    assert seen["lr"] == 0.5 and "laptop" not in seen
    _, seen = cli.parse(["mnist"], "")
    assert (seen["eps_model"], seen["lr"]) == ("dummy", 2e-4)


def test_the_laptop_preset_s_grid_steps_give_way_to_flags_given(capsys):
    # the preset's 20 DDIM steps no longer fit 10 diffusion steps: they become 10
    _, seen = cli.parse(["mnist", "--laptop", "--n-T", "10"], "")
    assert (seen["n_T"], seen["grid_sampler"], seen["grid_steps"]) == (10, "ddim", 10)
    # DDPM's grids take no step count: the preset's is dropped
    _, seen = cli.parse(["mnist", "--laptop", "--grid-sampler", "ddpm"], "")
    assert (seen["grid_sampler"], seen["grid_steps"]) == ("ddpm", None)
    # a --grid-steps the user typed is still refused where it does not fit
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(["mnist", "--laptop", "--n-T", "10", "--grid-steps", "20"], "")
    assert exit_info.value.code == 2
    assert "--grid-steps 20 is more than --n-T 10" in capsys.readouterr().err


def test_grid_every_keeps_its_rhythm_across_resume(tmp_path, monkeypatch):
    cheap_ddpm(monkeypatch)
    run = dict(RUN, eps_model="unet", n_feat=8, grid_every=2)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    trainer.train("mnist", n_epoch=5, out=str(straight), **run)

    def grids(out):
        return sorted(p.name for p in out.glob("*.png"))

    # after epochs 2 and 4, and after the last, 5 (files count epochs from 0)
    assert grids(straight) == [f"ddpm_sample_{i}.png" for i in (1, 3, 4)]
    trainer.train("mnist", n_epoch=3, out=str(halves), **run)
    assert grids(halves) == [f"ddpm_sample_{i}.png" for i in (1, 2)]
    trainer.train("mnist", n_epoch=5, out=str(halves), resume=True, **run)
    assert grids(halves) == [f"ddpm_sample_{i}.png" for i in (1, 2, 3, 4)]
