"""python -m mindiffusion.export, and the model the repository ships: a weights-only
checkpoint samples what the training checkpoint samples, and the shipped one loads
safely, rebuilds through its recipe and draws a row per digit."""
import pytest
import torch

from conftest import REPO, grid_tiles, narrow_unets
from mindiffusion import export, sample
import mindiffusion.train as trainer


SHIPPED = REPO / "contents" / "mnist_laptop_cond.pth"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real training checkpoints of a 3-step narrow MNIST UNet, with --cond:
    one with an --ema average, one without."""
    paths = {}
    with pytest.MonkeyPatch.context() as patch:
        narrow_unets(patch)
        for name, ema in (("ema", 0.9), ("plain", None)):
            out = tmp_path_factory.mktemp(name)
            trainer.train(
                "mnist", n_epoch=1, device="cpu", batch_size=4, n_T=3,
                fake_data=8, num_workers=0, seed=0, out=str(out), eps_model="unet",
                n_feat=8, cond=True, ema=ema, grid_every=5,
            )
            paths[name] = out / "ddpm_mnist.pth"
    return paths


def draw(path, sampler):
    """Samples of every class from the checkpoint at path, seeded."""
    ddpm, recipe = sample.load_ddpm(str(path), sampler, None, 0.0, True)
    torch.manual_seed(0)
    c = torch.arange(recipe["n_classes"]).repeat_interleave(2)
    with torch.no_grad():
        return ddpm.eval().sample(len(c), recipe["image_size"], "cpu", c, 2.0)


@pytest.mark.parametrize("averaged", ["ema", "plain"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_the_export_samples_the_same_images_bit_for_bit(
    trained, averaged, sampler, tmp_path, capsys
):
    small = tmp_path / "small.pth"
    export.main([str(trained[averaged]), str(small)])
    assert "wrote" in capsys.readouterr().out
    state = torch.load(small, weights_only=True)
    assert set(state) == {"model", "recipe", "averaged"}
    assert state["averaged"] == (averaged == "ema")
    assert small.stat().st_size < trained[averaged].stat().st_size / 2
    assert torch.equal(draw(small, sampler), draw(trained[averaged], sampler))


def test_the_export_never_replaces_a_file_and_cannot_be_resumed(
    trained, tmp_path, capsys
):
    small = tmp_path / "small.pth"
    small.write_bytes(b"mine")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(trained["ema"]), str(small)])
    assert exit_info.value.code == 2
    assert small.read_bytes() == b"mine"
    assert "already exists" in capsys.readouterr().err


def test_the_shipped_model_loads_safely_and_is_small():
    assert SHIPPED.stat().st_size <= 2 * 2**20
    state = torch.load(SHIPPED, weights_only=True)
    assert state["averaged"] is True
    recipe = state["recipe"]
    assert (recipe["eps_model"], recipe["n_classes"]) == ("NaiveUnet", 10)
    ddpm, _ = sample.load_ddpm(str(SHIPPED), "ddpm", None, 0.0, True)
    for name, value in ddpm.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_a_two_step_ddim_grid_of_the_shipped_model_has_a_row_per_digit(
    tmp_path, capsys
):
    out = tmp_path / "grid.png"
    sample.main([
        str(SHIPPED), "--class", "all", "--sampler", "ddim", "--steps", "2",
        "--n", "3", "--device", "cpu", "--seed", "0", "--out", str(out), "--native",
    ])
    # 10 rows of 3 digits, 32x32 each, padded by 2
    tiles = grid_tiles(out, 32)
    assert len(tiles) == 30
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}")
