"""python -m mindiffusion.sample: each script's checkpoint rebuilds its model, the
grid is de-normalised as the script normalised, --progress keeps x_T to x_0, and
nothing is overwritten."""

from PIL import Image
import pytest
import torch
from torchvision import transforms

from conftest import cheap_ddpm, grid_tiles
from mindiffusion import sample
from mindiffusion.ddpm import DDPM
from mindiffusion.training.data import FakeImages
import mindiffusion.train as trainer
from mindiffusion.unet import NaiveUnet


# script, the sizes its FakeImages draws, and the transform before its Normalize
SCRIPTS = {
    "mnist": ("mnist", (1, 28, 28), transforms.ToTensor()),
    "cifar10": ("cifar10", (3, 32, 32), transforms.ToTensor()),
    "celeba": (
        "celeba",
        (3, 218, 178),
        transforms.Compose([transforms.Resize((128, 128)), transforms.ToTensor()]),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One checkpoint per script, trained --ema on 2 fake images with a stand-in loss;
    with the batches training saw and the size each grid was drawn at."""
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        seen = {"batches": [], "sizes": []}
        cheap_ddpm(
            patch,
            on_forward=lambda ddpm, x: seen["batches"].append(x.clone()),
            on_sample=lambda ddpm, size: seen["sizes"].append(tuple(size)),
        )
        for name, (train, _, _) in SCRIPTS.items():
            out = tmp_path_factory.mktemp(name)
            seen["batches"], seen["sizes"] = [], []
            ddpm = trainer.train(train,
                n_epoch=1,
                device="cpu",
                batch_size=2,
                n_T=3,
                fake_data=2,
                out=str(out),
                num_workers=0,
                ema=0.5,
            )
            (path,) = out.glob("*.pth")
            runs[name] = dict(path=path, ddpm=ddpm, **seen)
    return runs


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_recipe_rebuilds_the_scripts_model(name, checkpoints):
    run = checkpoints[name]
    state = torch.load(run["path"], weights_only=True)
    recipe = state["recipe"]
    ddpm, _ = sample.load_ddpm(str(run["path"]), "ddpm", 50, 0.0, use_ema=False)
    assert type(ddpm.eps_model) is type(run["ddpm"].eps_model)
    assert ddpm.n_T == run["ddpm"].n_T == 3
    for key, value in state["model"].items():
        assert torch.equal(ddpm.state_dict()[key], value), key
    # the recipe's betas and n_T give the saved schedules, not just load over them
    fresh = DDPM(ddpm.eps_model, recipe["betas"], recipe["n_T"])
    for key in ("sqrtab", "sqrtmab", "oneover_sqrta"):
        assert torch.equal(fresh.state_dict()[key], state["model"][key])
    assert run["sizes"] == [tuple(recipe["image_size"])]


@pytest.mark.parametrize("name", SCRIPTS)
def test_denormalize_undoes_the_scripts_transform(name, checkpoints):
    _, image_size, to_tensor = SCRIPTS[name]
    recipe = torch.load(checkpoints[name]["path"], weights_only=True)["recipe"]
    raw = [to_tensor(image) for image, _ in FakeImages(2, image_size=image_size)]
    (batch,) = checkpoints[name]["batches"]
    pixels = sample.denormalize(batch, recipe["normalize"])
    for image in pixels:
        assert any(torch.allclose(image, r, atol=1e-6) for r in raw)


def test_the_ema_weights_are_used_unless_no_ema(checkpoints, tmp_path):
    state = torch.load(checkpoints["cifar10"]["path"], weights_only=True)
    state["ema"] = {
        name: value + 1 if value.is_floating_point() else value
        for name, value in state["ema"].items()
    }
    path = str(tmp_path / "ema.pth")
    torch.save(state, path)
    averaged, _ = sample.load_ddpm(path, "ddim", 2, 0.0, use_ema=True)
    trained, _ = sample.load_ddpm(path, "ddim", 2, 0.0, use_ema=False)
    for name, value in trained.state_dict().items():
        assert torch.equal(value, state["model"][name])
        assert torch.equal(averaged.state_dict()[name], state["ema"][f"module.{name}"])


def test_a_grid_and_strips_from_x_T_to_x_0(checkpoints, tmp_path, capsys):
    out = tmp_path / "grid.png"
    flags = "--n 3 --sampler ddim --steps 3 --progress 3 --device cpu --seed 0 --native"
    sample.main(
        [str(checkpoints["cifar10"]["path"]), *flags.split(), "--out", str(out)]
    )
    # 3 images in rows of 2, each 32 pixels with make_grid's 2-pixel padding
    assert Image.open(out).size == (70, 70)
    grid = grid_tiles(out, 32)
    # 3 snapshots of the 4 states of a 3-step walk: x_T, the state after 2 steps, x_0
    # x_T is the noise the sampler starts from with --seed 0
    torch.manual_seed(0)
    x_T = sample.denormalize(torch.randn(3, 3, 32, 32), ((0.5,) * 3, (0.5,) * 3))
    # save_image's rounding to 8 bits
    x_T = x_T.mul(255).add(0.5).clamp(0, 255).byte()
    for j in range(3):
        strip = tmp_path / f"grid_progress{j}.png"
        assert Image.open(strip).size == (3 * 34 + 2, 36)
        first, middle, last = grid_tiles(strip, 32)
        assert torch.equal(first, x_T[j])
        assert torch.equal(last, grid[j])
        assert not torch.equal(middle, first) and not torch.equal(middle, last)


def test_the_default_name_never_replaces_a_file(checkpoints, capsys):
    path = checkpoints["mnist"]["path"]
    argv = [str(path), *"--n 1 --sampler ddim --steps 1 --device cpu".split()]
    sample.main(argv)
    sample.main(argv)
    written = sorted(p.name for p in path.parent.glob("ddpm_mnist_ddim*.png"))
    assert written == ["ddpm_mnist_ddim.png", "ddpm_mnist_ddim_2.png"]
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv + ["--out", str(path.parent / "ddpm_mnist_ddim.png")])
    assert exit_info.value.code == 2
    first = path.parent / "ddpm_mnist_ddim.png"
    assert capsys.readouterr().err.endswith(
        f"error: {first} already exists: choose another --out\n"
    )


def sample_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([*argv, "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1].split("error: ", 1)[1]


def test_bad_checkpoints_and_settings_are_one_sentence(checkpoints, tmp_path, capsys):
    good = str(checkpoints["cifar10"]["path"])
    missing = str(tmp_path / "missing.pth")
    assert sample_error([missing], capsys) == f"there is no checkpoint at {missing}"

    old = tmp_path / "old.pth"
    state = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "recipe"}, old)
    assert sample_error([str(old)], capsys) == (
        f"{old} has no recipe for its model: it was saved before checkpoints kept "
        f"one, or by another program"
    )
    assert sample_error([good, "--sampler", "ddim", "--steps", "4"], capsys) == (
        "--steps 4 is more than the model's n_T = 3"
    )
    assert sample_error([good, "--sampler", "ddim", "--eta", "2"], capsys) == (
        "argument --eta: must be between 0 and 1, got 2.0"
    )
    nowhere = str(tmp_path / "no" / "grid.png")
    assert sample_error([good, "--out", nowhere], capsys) == (
        f"--out {nowhere}: its folder does not exist"
    )
    assert sample_error([good, "--progress", "5"], capsys) == (
        "--progress 5 is more than the 4 states of a 3-step walk"
    )


def test_a_checkpoint_that_is_not_one_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save(torch.zeros(3), path)
    assert sample_error([str(path)], capsys) == f"{path} is not a readable checkpoint"


@pytest.mark.parametrize("flags", [["--steps", "1"], ["--eta", "0.9"]])
def test_ddim_flags_with_the_ddpm_sampler_are_refused(flags, checkpoints, capsys):
    path = str(checkpoints["cifar10"]["path"])
    assert sample_error([path, "--sampler", "ddpm", *flags], capsys) == (
        "--steps and --eta are DDIM's: add --sampler ddim, or drop them"
    )


def test_ddim_defaults_to_50_steps_or_n_T_when_the_model_has_fewer(checkpoints):
    path = str(checkpoints["cifar10"]["path"])
    small, _ = sample.load_ddpm(path, "ddim", None, 0.0, use_ema=False)
    assert small.n_T == small.n_steps == 3
    state = torch.load(path, weights_only=True)
    state["recipe"]["n_T"] = 200
    eps_model = NaiveUnet(*state["recipe"]["eps_model_args"])
    state["model"].update(DDPM(eps_model, (1e-4, 0.02), 200).state_dict())
    path_200 = path.replace(".pth", "_200.pth")
    torch.save(state, path_200)
    large, _ = sample.load_ddpm(path_200, "ddim", None, 0.0, use_ema=False)
    assert large.n_steps == 50


@pytest.mark.parametrize("name", ["grid", "grid.pth"])
def test_an_out_that_is_no_image_is_refused_before_sampling(
    name, checkpoints, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(DDPM, "sample", lambda *args: pytest.fail("sampled"))
    out = tmp_path / name
    path = str(checkpoints["cifar10"]["path"])
    assert sample_error([path, "--out", str(out)], capsys) == (
        f"--out {out}: a grid is written as a PNG, whose exact pixels the judge "
        f"reads: give it a .png name"
    )
