"""The two doors: each script is the notes' plain code, loading only `ddpm` and
`unet` of the package, and the trainer with no feature flag trains number for number
as the script: the same weights, bit for bit, and the same grid bytes."""
import subprocess
import sys

import pytest
import torch
from torchvision.datasets import FakeData

import train_celeba
import train_cifar10
import train_mnist
from conftest import REPO, write_digits, write_faces
from mindiffusion import export, sample, train
from mindiffusion.ddpm import DDPM
from mindiffusion.training import cli, recipes
from mindiffusion.unet import NaiveUnet

SCRIPTS = {
    "mnist": train_mnist.train_mnist,
    "cifar10": train_cifar10.train_cifar10,
    "celeba": train_celeba.train_celeba,
}


@pytest.mark.parametrize("script", ["train_mnist", "train_cifar10", "train_celeba"])
def test_a_script_loads_only_the_ddpm_and_the_unet(script):
    code = (
        f"import sys; import {script}; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.startswith('mindiffusion'))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
        check=True,
    ).stdout.split()
    assert "mindiffusion.ddpm" in loaded
    assert set(loaded) <= {"mindiffusion", "mindiffusion.ddpm", "mindiffusion.unet"}


def test_a_setting_the_trainer_does_not_have_is_refused():
    with pytest.raises(TypeError, match="no such setting of a run: n_epochs"):
        train.train("mnist", n_epochs=1)


@pytest.mark.parametrize("dataset", list(SCRIPTS))
def test_the_recipes_are_the_scripts_defaults(dataset):
    defaults = SCRIPTS[dataset].__defaults__
    names = SCRIPTS[dataset].__code__.co_varnames[: len(defaults)]
    script = dict(zip(names, defaults))
    settings = cli.settings_of(dataset)
    for name in ("device", "batch_size", "lr", "n_T", "data_root", "out", "n_epoch"):
        assert settings[name] == script[name], name


def narrow(in_channels, out_channels, n_feat=128, n_classes=None):
    return NaiveUnet(in_channels, out_channels, 8, n_classes)


class SmallCIFAR10(FakeData):
    """Twelve random 32x32 images in place of CIFAR-10, as its loader returns them."""

    def __init__(self, root, train=True, download=False, transform=None):
        super().__init__(12, (3, 32, 32), 10, transform, random_offset=3)


def both_doors(dataset, tmp_path, monkeypatch):
    """Train 2 epochs with the script and with the trainer, seeded alike; return
    each one's weights and grid bytes."""
    if dataset == "mnist":
        # the notes' DummyEpsModel, 17M weights: a few digits, and a one-step grid
        write_digits(tmp_path / "data", 4)
        root = str(tmp_path / "data")
    elif dataset == "celeba":
        write_faces(tmp_path / "faces", 10)
        root = str(tmp_path / "faces")
    else:
        monkeypatch.setattr(train_cifar10, "CIFAR10", SmallCIFAR10)
        monkeypatch.setattr(recipes, "CIFAR10", SmallCIFAR10)
        root = str(tmp_path)
    monkeypatch.setattr(train_cifar10, "NaiveUnet", narrow)
    monkeypatch.setattr(train_celeba, "NaiveUnet", narrow)
    run = dict(n_epoch=2, device="cpu", batch_size=8, n_T=3, data_root=root)
    if dataset == "mnist":
        run.update(batch_size=2, n_T=1)
    (tmp_path / "script").mkdir()
    torch.manual_seed(0)
    SCRIPTS[dataset](**run, out=str(tmp_path / "script"))
    width = {} if dataset == "mnist" else {"n_feat": 8}
    train.train(dataset, **run, **width, seed=0, num_workers=0,
                out=str(tmp_path / "trainer"))
    recipe = recipes.RECIPES[dataset]
    results = []
    for door in ("script", "trainer"):
        saved = torch.load(tmp_path / door / recipe.checkpoint, weights_only=True)
        weights = saved.get("model", saved)
        grids = [
            (tmp_path / door / recipe.grids.format(i)).read_bytes() for i in (0, 1)
        ]
        results.append((weights, grids))
    return results


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba"])
def test_the_trainer_with_no_flag_trains_as_the_script(dataset, tmp_path, monkeypatch):
    (script, script_grids), (trainer, trainer_grids) = both_doors(
        dataset, tmp_path, monkeypatch
    )
    assert script.keys() == trainer.keys()
    for name in script:
        assert torch.equal(script[name], trainer[name]), name
    assert script_grids == trainer_grids
    # the run trained: the weights moved from where the same seed starts them
    torch.manual_seed(0)
    start = (train_mnist.DummyEpsModel(1) if dataset == "mnist" else narrow(3, 3))
    first = next(iter(start.state_dict()))
    assert not torch.equal(script[f"eps_model.{first}"], start.state_dict()[first])


@pytest.mark.parametrize(
    "name, eps_model, n_T",
    [("ddpm_mnist.pth", train_mnist.DummyEpsModel(1), 7), ("ddpm_cifar.pth", None, 5)],
)
def test_a_script_s_weights_sample_and_refuse_a_resume(
    name, eps_model, n_T, tmp_path, capsys
):
    # the notes' torch.save(ddpm.state_dict(), ...)
    ddpm = DDPM(eps_model or narrow(3, 3), (1e-4, 0.02), n_T)
    torch.save(ddpm.state_dict(), tmp_path / name)
    loaded, recipe = sample.load_ddpm(str(tmp_path / name), "ddpm", None, 0.0, False)
    assert loaded.n_T == n_T
    for key, value in ddpm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    size = (1, 28, 28) if eps_model else (3, 32, 32)
    assert tuple(recipe["image_size"]) == size
    dataset = "mnist" if eps_model else "cifar10"
    with pytest.raises(SystemExit):
        train.main([dataset, "--resume", "--out", str(tmp_path), "--device", "cpu",
                    "--fake-data", "2"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f"--resume: {tmp_path / name} holds the weights alone, as a notes' script "
        f"saves them, and cannot be resumed: train with the trainer, whose "
        f"checkpoint can"
    )
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / name), str(tmp_path / "small.pth")])
    assert capsys.readouterr().err.endswith(
        "holds the weights alone, as a notes' script saves them: it is as small as an "
        "export, and mindiffusion.sample reads it\n"
    )
