"""--cond from the command line: each script trains on its labels and draws a row per
class; the recipe and --resume; mindiffusion.sample --class and mindiffusion.fid on a
conditional checkpoint. The models are real NaiveUnets of width 8."""

from PIL import Image
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from conftest import grid_tiles, narrow_unets
from mindiffusion import sample
from mindiffusion.ddim import DDIM
from mindiffusion.ddpm import DDPM
from mindiffusion.training import steps
from mindiffusion.training.data import FakeImages
from mindiffusion.training.grids import ZeroEps
import mindiffusion.train as trainer


QUICK = ["--epochs", "1", "--n-T", "1", "--device", "cpu", "--num-workers", "0"]
# MNIST's own small UNet: digits padded to 32x32
TINY_MNIST = ["--eps-model", "unet", "--n-feat", "8"]
# the dataset, its flags, its fake images' size, the grid's tile and its rows of real
# images: at batches of 3, the last batch's 3 fill one row, as the scripts draw it
SCRIPTS = {
    "mnist": ("mnist", [*TINY_MNIST, "--fake-data", "6"], (1, 28, 28), 32, 0),
    "cifar10": ("cifar10", ["--fake-data", "6"], (3, 32, 32), 32, 1),
    "celeba": ("celeba", ["--fake-data", "3"], (3, 218, 178), 128, 1),
}
# 4 of each class, in the order of the labels
GRID_LABELS = [k for k in range(10) for _ in range(4)]


def command(train, argv, capsys):
    """Run `train`'s command line; return its exit code and what it wrote to stderr."""
    try:
        trainer.main([train, *argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


@pytest.fixture
def calls(monkeypatch):
    """Record the labels each training step and each grid gets; for CIFAR-10 and
    CelebA, their NaiveUnet is made 8 wide."""
    seen = {"labels": [], "samples": []}
    forward, ddpm_sample = DDPM.forward, DDPM.sample

    def recording_forward(self, x, c=None):
        seen["labels"].append(c)
        seen["p_uncond"] = self.p_uncond
        return forward(self, x, c)

    def recording_sample(self, n_sample, size, device, c=None, guide_w=0.0):
        # the walk of the sampler's draws before a grid is not the grid
        if not isinstance(self.eps_model, ZeroEps):
            seen["samples"].append((n_sample, c, guide_w))
        return ddpm_sample(self, n_sample, size, device, c, guide_w)

    monkeypatch.setattr(DDPM, "forward", recording_forward)
    monkeypatch.setattr(DDPM, "sample", recording_sample)
    narrow_unets(monkeypatch)
    return seen


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_trains_on_the_labels_and_draws_a_row_per_class(
    name, calls, tmp_path, capsys
):
    train, flags, size, tile, real_rows = SCRIPTS[name]
    out = tmp_path / "out"
    argv = [*QUICK, *flags, "--batch-size", "3", "--out", str(out), "--cond"]
    argv += ["--p-uncond", "0.25", "--guide-w", "3.5"]
    code, err = command(train, argv, capsys)
    assert code == 0, err

    # every image's own label, once in the epoch
    fake = FakeImages(int(flags[flags.index("--fake-data") + 1]), size)
    expected = sorted(int(fake[j][1]) for j in range(len(fake)))
    assert sorted(torch.cat(calls["labels"]).tolist()) == expected
    assert calls["p_uncond"] == 0.25
    # one grid: a row of 4 for each of the ten classes, with the weight asked for
    ((n_sample, c, guide_w),) = calls["samples"]
    assert (n_sample, c.tolist(), guide_w) == (40, GRID_LABELS, 3.5)
    (grid,) = out.glob("*.png")
    rows = 10 + real_rows
    assert Image.open(grid).size == (4 * (tile + 2) + 2, rows * (tile + 2) + 2)

    recipe = torch.load(next(out.glob("*.pth")))["recipe"]
    assert recipe["n_classes"] == 10 and recipe["p_uncond"] == 0.25
    assert recipe["classes"] == [str(k) for k in range(10)]


def test_an_image_folder_s_subfolders_are_the_classes(calls, tmp_path, capsys):
    root = tmp_path / "faces"
    for folder, count in (("smiling", 2), ("frowning", 1)):
        (root / folder).mkdir(parents=True)
        for j in range(count):
            image = Image.new("RGB", (12, 10), (40 * j, 90, 200))
            image.save(root / folder / f"{j}.png")
    argv = [*QUICK, "--data-root", str(root), "--out", str(tmp_path / "out"), "--cond"]
    code, err = command("celeba", argv, capsys)
    assert code == 0, err
    recipe = torch.load(tmp_path / "out" / "ddpm_celeba.pth")["recipe"]
    # ImageFolder sorts the subfolders: frowning is 0, smiling 1
    assert recipe["classes"] == ["frowning", "smiling"] and recipe["n_classes"] == 2
    assert sorted(torch.cat(calls["labels"]).tolist()) == [0, 1, 1]
    # the grid's rows are the two classes
    assert calls["samples"][0][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]

    # a folder of one class has nothing to condition on
    (root / "frowning" / "0.png").rename(root / "smiling" / "9.png")
    (root / "frowning").rmdir()
    argv[argv.index("--out") + 1] = str(tmp_path / "other")
    code, err = command("celeba", argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].endswith(
        f"error: --cond: {root} has one subfolder, so one class (smiling): put each "
        f"class's images in a subfolder of its own"
    )


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--p-uncond", "0.2"], "--p-uncond and --guide-w are --cond's: add --cond, "
         "or drop them"),
        (["--guide-w", "1"], "--p-uncond and --guide-w are --cond's: add --cond, or "
         "drop them"),
        (["--cond", "--p-uncond", "1"], "argument --p-uncond: must be between 0 and "
         "1, got 1.0"),
        (["--cond", "--guide-w", "-0.5"], "argument --guide-w: must be at least 0, "
         "plain conditional sampling, got -0.5"),
    ],
)
def test_bad_guidance_flags_are_one_sentence(flags, said, tmp_path, capsys):
    argv = [*QUICK, *TINY_MNIST, "--fake-data", "2", "--out", str(tmp_path), *flags]
    code, err = command("mnist", argv, capsys)
    assert code == 2
    assert err.splitlines()[-1].endswith(f"error: {said}")
    assert not any(tmp_path.iterdir())


def test_resume_refuses_a_change_of_cond_or_p_uncond(tmp_path, capsys):
    base = [*QUICK, *TINY_MNIST, "--fake-data", "2", "--batch-size", "2"]
    with_cond, without = tmp_path / "with", tmp_path / "without"
    for out, flags in ((with_cond, ["--cond"]), (without, [])):
        assert command("mnist", [*base, *flags, "--out", str(out)], capsys)[0] == 0
    before = (with_cond / "ddpm_mnist.pth").read_bytes()
    more = ["--epochs", "2", "--resume"]
    for out, flags, said in [
        (with_cond, [], "was trained with --cond: resume with --cond"),
        (without, ["--cond"], "was trained without --cond: resume without --cond"),
        (with_cond, ["--cond", "--p-uncond", "0.3"],
         "was trained with --p-uncond 0.1 (this run: 0.3): resume with the "
         "checkpoint's settings"),
    ]:
        code, err = command("mnist", [*base, *more, *flags, "--out", str(out)],
                               capsys)
        assert code == 2
        (line,) = err.strip().splitlines()
        assert f"--resume: {out / 'ddpm_mnist.pth'} {said}" in line
    assert (with_cond / "ddpm_mnist.pth").read_bytes() == before


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A conditional and an unconditional MNIST checkpoint of a width-8 NaiveUnet,
    trained with --ema 0.5; the conditional one's classes renamed zero..nine, as an
    image folder's may be, and the average it trained kept as "average"."""
    paths, averages = {}, []

    class KeptAverage(AveragedModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            averages.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(steps, "AveragedModel", KeptAverage)
        for cond in (True, False):
            out = tmp_path_factory.mktemp(f"cond{cond}")
            # two steps: the average starts as a copy of the first step's weights
            trainer.train("mnist", n_epoch=1, device="cpu", batch_size=2, n_T=3,
                         fake_data=4, out=str(out), num_workers=0, eps_model="unet",
                         n_feat=8, ema=0.5, cond=cond)
            paths[cond] = out / "ddpm_mnist.pth"
    paths["average"] = averages[0].module
    state = torch.load(paths[True])
    names = "zero one two three four five six seven eight nine".split()
    state["recipe"]["classes"] = names
    torch.save(state, paths[True])
    return paths


def test_sample_rebuilds_the_trained_average_with_its_classes(conditional):
    averaged, _ = sample.load_ddpm(str(conditional[True]), "ddpm", None, 0.0, True)
    trained, _ = sample.load_ddpm(str(conditional[True]), "ddpm", None, 0.0, False)
    x, t = torch.randn(4, 1, 32, 32), torch.rand(4, 1)
    # three classes and the null class
    c = torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        expected = conditional["average"].eps_model(x, t, c)
        assert torch.equal(averaged.eps_model(x, t, c), expected)
        # the raw weights predict otherwise: the test tells the two apart
        assert not torch.equal(trained.eps_model(x, t, c), expected)


def sample_command(checkpoint, tmp_path, flags):
    """Draw a grid with mindiffusion.sample, at its native size; return its path."""
    out = tmp_path / f"grid{len(list(tmp_path.iterdir()))}.png"
    sample.main([str(checkpoint), "--device", "cpu", "--out", str(out), "--native",
                 *flags])
    return out


@pytest.mark.parametrize("sampler", [DDPM, DDIM])
def test_sample_draws_the_classes_asked_for_by_number_or_name(
    sampler, conditional, tmp_path, monkeypatch, capsys
):
    seen = []
    original = sampler.sample

    def recording_sample(self, n_sample, size, device, c=None, guide_w=0.0):
        seen.append((n_sample, c.tolist(), guide_w))
        return original(self, n_sample, size, device, c, guide_w)

    monkeypatch.setattr(sampler, "sample", recording_sample)
    flags = ["--sampler", sampler.__name__.lower()]
    classes = ["--class", "3", "--class", "seven", "--n", "2"]
    out = sample_command(conditional[True], tmp_path, [*flags, *classes])
    # a row of 2 for each class, at the scripts' weight 2
    assert seen[-1] == (4, [3, 3, 7, 7], 2.0)
    assert len(grid_tiles(out, 32)) == 4
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)

    every_class = ["--class", "all", "--n", "1", "--guide-w", "0"]
    out = sample_command(conditional[True], tmp_path, [*flags, *every_class])
    assert seen[-1] == (10, list(range(10)), 0.0)
    assert Image.open(out).size == (1 * 34 + 2, 10 * 34 + 2)


@pytest.mark.parametrize(
    "trained_with_cond, flags, said",
    [
        (False, ["--class", "1"], "--class: {ckpt} was trained without --cond, so it "
         "has no classes to choose from"),
        (True, ["--class", "10"], "--class 10: the model has 10 classes, numbered 0 "
         "to 9"),
        (True, ["--class", "eleven"], "--class eleven: the model has no such class; "
         "its classes are zero, one, two, three, four, five, six, seven, eight, nine "
         "(or their numbers 0 to 9, or all)"),
        (True, ["--class", "all", "--class", "2"], "--class all already takes every "
         "class: give it alone"),
        (True, ["--guide-w", "1"], "--guide-w guides towards a class: add --class"),
    ],
)
def test_sample_refuses_classes_it_cannot_draw_in_one_sentence(
    trained_with_cond, flags, said, conditional, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(DDPM, "sample", lambda *args: pytest.fail("sampled"))
    checkpoint = conditional[trained_with_cond]
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(checkpoint), "--device", "cpu", "--out",
                     str(tmp_path / "grid.png"), *flags])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "python -m mindiffusion.sample: error: " + said.format(
        ckpt=checkpoint
    )
    assert not any(tmp_path.iterdir())
