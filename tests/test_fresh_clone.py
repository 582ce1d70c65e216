"""What a new user meets on a fresh clone, each defect found that way held by a
check that failed before its fix: an unreadable image mid-epoch, refusals that came
late or said the wrong thing, tracebacks for Ctrl-C and for odd files, a colour
grid read as digits, a grid too small for a projector, flags that took infinity."""
import ast
import errno
import multiprocessing
import os
import re
import runpy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image
from torchvision.datasets import ImageFolder

from conftest import REPO, narrow_unets, run_script, write_faces
import mindiffusion.train as trainer
from mindiffusion import fid, sample
from mindiffusion.ddpm import DDPM
from mindiffusion.figures import command as figures_command
from mindiffusion.figures import lesson
from mindiffusion.judge import command as judge_command
from mindiffusion.judge.scores import grid_images
from mindiffusion.training import cli, devices, files, grids
from mindiffusion.training.data import data_range, explain_image_folder
from mindiffusion.training.flags import UserError
from mindiffusion.training.recipes import LAPTOP, RECIPES
from mindiffusion.unet import NaiveUnet
from test_figures import RECIPE, tiny_ddpm

SHIPPED_MODEL = REPO / "contents" / "mnist_laptop_cond.pth"


@pytest.fixture
def tiny(tmp_path):
    """A checkpoint of an untrained MNIST NaiveUnet, 8 wide, n_T 20."""
    path = tmp_path / "tiny.pth"
    state = {"model": tiny_ddpm().state_dict(), "recipe": RECIPE, "averaged": False}
    torch.save(state, path)
    return path


def refusal(main, argv, capsys) -> str:
    """The one sentence a command ends with: exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1].split("error: ", 1)[1]


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_saves_the_steps_then_names_it(
    workers, tmp_path, monkeypatch, capsys
):
    narrow_unets(monkeypatch)
    faces = tmp_path / "faces"
    write_faces(faces, 4)
    bad = faces / "img_align_celeba" / "000003.jpg"
    good = bad.read_bytes()
    bad.write_text("a text saved as .jpg")
    out = tmp_path / "run"
    argv = ["--data-root", str(faces), "--device", "cpu", "--batch-size", "1",
            "--n-T", "2", "--epochs", "1", "--seed", "1", "--out", str(out),
            "--num-workers", str(workers)]
    code, err = run_script("celeba", argv, capsys)
    checkpoint = out / "ddpm_celeba.pth"
    assert code == 2 and "Traceback" not in err
    # no loader worker outlives the run: one, deaf to SIGTERM, would hang the exit
    assert multiprocessing.active_children() == []
    assert err.strip().splitlines()[-1].endswith(
        f"{bad} is not an image that can be read: replace it with one that can, "
        f"then go on with --resume (saved in {checkpoint})"
    )
    # the steps before the file, saved mid-epoch
    state = torch.load(checkpoint, weights_only=True)
    assert state["epoch"] == 0 and 0 < state["batches"] < 4
    # the file replaced, the epoch goes on from there to its 4 steps
    bad.write_bytes(good)
    trainer.main(["celeba", *argv, "--resume"])
    rows = (out / "ddpm_celeba_log.csv").read_text().splitlines()
    assert rows[-1].split(",")[:2] == ["0", "4"]


def test_an_empty_subfolder_beside_the_images_is_named(tmp_path):
    write_faces(tmp_path / "faces", 2)
    empty = tmp_path / "faces" / ".ipynb_checkpoints"
    empty.mkdir()
    with pytest.raises(UserError) as error:
        with explain_image_folder(str(tmp_path / "faces")):
            ImageFolder(str(tmp_path / "faces"))
    assert str(error.value) == (
        f"{empty} holds no images, and ImageFolder takes each subfolder of "
        f"{tmp_path / 'faces'} for a class: remove it, or move it out of "
        f"{tmp_path / 'faces'}"
    )


def test_fid_refuses_a_json_it_cannot_write_before_sampling(
    tiny, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "read-only"
    folder.mkdir()
    make = files.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir == str(folder):
            raise OSError(errno.EROFS, "Read-only file system")
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(fid, "load_ddpm", lambda *args: pytest.fail("sampled"))
    argv = [str(tiny), "--json", str(folder / "fid.json"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu"]
    assert refusal(fid.main, argv, capsys) == (
        f"--json {folder / 'fid.json'}: its folder cannot be written in "
        f"(Read-only file system)"
    )


def test_figures_of_a_short_walk_count_its_steps_and_share_one_suffix(
    tmp_path, capsys
):
    # n_T 5: below the consistency figure's first step count, 10
    recipe = dict(RECIPE, n_T=5)
    torch.manual_seed(0)
    ddpm = DDPM(NaiveUnet(1, 1, 8), recipe["betas"], 5)
    checkpoint = tmp_path / "short.pth"
    torch.save({"model": ddpm.state_dict(), "recipe": recipe}, checkpoint)
    out = tmp_path / "figures"
    out.mkdir()
    # a file of an earlier run: this run's files all take the next suffix
    (out / "reverse_walk.png").write_bytes(b"an earlier run's")
    figures_command.main([str(checkpoint), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    written = sorted(os.listdir(out))
    expected = [
        figures_command.suffixed(name, "_2") for name in figures_command.NAMES
        if name not in ("loss_curve.png", "guidance_sweep.png")
    ]
    assert written == sorted([*expected, "reverse_walk.png"])
    # the consistency figure in the one count that fits, 5
    assert Image.open(out / "consistency_2.png").size[0] >= 512
    # the reverse walk's bar counts the walk's 5 calls, not the x_0 guesses after
    counts = re.findall(r"reverse walk: +\d+%\|[^|]*\| *(\d+)/(\d+)", err)
    assert counts and counts[-1] == ("5", "5")
    assert all(int(n) <= int(total) for n, total in counts)


# runpy warns that it runs a module already imported, as here it means to
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize(
    "module", ["mindiffusion.sample", "mindiffusion.fid", "mindiffusion.judge",
               "mindiffusion.figures"],
)
def test_ctrl_c_in_a_command_ends_in_one_line(module, tiny, tmp_path, monkeypatch,
                                              capsys):
    def interrupted(name):
        raise KeyboardInterrupt

    for owner in (devices, judge_command, figures_command):
        monkeypatch.setattr(owner, "resolve_device", interrupted)
    argv = [str(tiny), "--device", "cpu"]
    if module.endswith("fid"):
        argv += ["--cache-dir", str(tmp_path / "cache")]
    if module.endswith("figures"):
        argv += ["--out", str(tmp_path / "figures")]
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert err.strip() == f"python -m {module}: interrupted by Ctrl-C"


@pytest.mark.parametrize("kind", ["empty", "folder"])
def test_judge_weights_that_are_an_empty_file_or_a_folder_are_one_sentence(
    kind, tiny, tmp_path, capsys
):
    weights = tmp_path / "judge.pth"
    if kind == "empty":
        weights.write_bytes(b"")
        said = f"{weights} holds no weights of the digit judge"
    else:
        weights.mkdir()
        said = f"{weights} is a folder: give the judge's weights, a .pth file"
    assert refusal(judge_command.main, [str(tiny), "--weights", str(weights)],
                   capsys) == said


def test_judge_refuses_a_colour_grid(tmp_path, capsys):
    # a CIFAR-10-like grid of 32x32 cells: grey padding, coloured images
    grid = torch.zeros(3, 2 + 2 * 34, 2 + 2 * 34)
    grid[0, 2:34, 2:34] = 1.0
    path = tmp_path / "cifar.png"
    Image.fromarray((grid * 255).byte().permute(1, 2, 0).numpy()).save(path)
    assert refusal(judge_command.main, [str(path)], capsys) == (
        f"{path} is in colour, such as CIFAR-10's or CelebA's grids: the judge reads "
        f"MNIST digits"
    )


def test_a_grid_for_the_judge_is_a_png_and_a_missing_one_names_the_newest(
    tiny, tmp_path, capsys
):
    jpg = tmp_path / "g.jpg"
    refused = refusal(sample.main, [str(tiny), "--out", str(jpg), "--device", "cpu"],
                      capsys)
    assert refused == (f"--out {jpg}: a grid is written as a PNG, whose exact pixels "
                       f"the judge reads: give it a .png name")
    Image.new("RGB", (8, 8)).save(jpg)
    assert refusal(judge_command.main, [str(jpg)], capsys) == (
        f"{jpg} is a .jpg image: the judge reads grids as PNG, whose pixels are "
        f"exact, as `sample` writes them"
    )
    missing = tmp_path / "ddpm_sample_10.png"
    assert refusal(judge_command.main, [str(missing)], capsys) == (
        f"{missing} does not exist"
    )
    older, newer = tmp_path / "ddpm_sample_2.png", tmp_path / "ddpm_sample_3.png"
    for age, path in enumerate((newer, older)):
        Image.new("L", (34, 34)).save(path)
        os.utime(path, (1000 - age, 1000 - age))
    assert refusal(judge_command.main, [str(missing)], capsys) == (
        f"{missing} does not exist: the newest grid there is {newer}"
    )


@pytest.mark.parametrize("n, native", [(1, False), (16, False), (16, True)])
def test_sample_s_grid_is_enlarged_in_blocks_and_the_judge_reads_it(
    n, native, tiny, tmp_path, capsys
):
    path = tmp_path / "grid.png"
    argv = [str(tiny), "--sampler", "ddim", "--steps", "2", "--n", str(n),
            "--seed", "0", "--device", "cpu", "--out", str(path)]
    sample.main([*argv, *(["--native"] if native else [])])
    pixels = torch.from_numpy(np.array(Image.open(path).convert("L")))
    # 32x32 digits, 2 pixels apart and around: n = 16 is 4 a row
    side = 2 + (4 if n == 16 else 1) * 34
    k = 1 if native else -(-512 // side)
    assert pixels.shape == (side * k, side * k)
    # each pixel of the native grid a k x k block of equal pixels
    native_grid = pixels[::k, ::k]
    blocks = native_grid.repeat_interleave(k, 0).repeat_interleave(k, 1)
    assert torch.equal(blocks, pixels)
    # read back at the native size, one cell per sample, the lone one too
    images, rows = grid_images(str(path))
    assert len(images) == n and images.shape[1:] == (1, 32, 32)
    assert torch.equal((images * 255).round().byte()[0, 0], native_grid[2:34, 2:34])
    # a black grid is blocks at any size: read at one of whole cells, its own where
    # no larger one is (4 x 4 cells of 32 enlarged 4 times are also 3 x 3 of 28)
    if n == 1 or native:
        Image.new("L", (side * k, side * k)).save(path)
        assert len(grid_images(str(path))[0]) == n


def test_infinity_is_refused_where_nan_and_negatives_are(tiny, capsys):
    said = refusal(sample.main, [str(tiny), "--class", "3", "--guide-w", "inf"],
                   capsys)
    assert said == "argument --guide-w: must be at least 0, plain conditional " \
                   "sampling, got inf"
    said = refusal(judge_command.main, [str(tiny), "--guide-w", "inf"], capsys)
    assert said.startswith("argument --guide-w: must be at least 0")
    with pytest.raises(SystemExit):
        cli.parse(["mnist", "--lr", "inf"], "")


def test_a_record_saved_with_a_byte_order_mark_reads_and_resumes(tmp_path):
    path = tmp_path / "ddpm_mnist_log.csv"
    header = ",".join(files.FIELDS)
    rows = ["0,10,0.5,0.001,100.0,1.0", "1,20,0.25,0.001,100.0,1.0"]
    # Excel's "CSV UTF-8": a byte-order mark before the header
    path.write_bytes(("\ufeff" + "\r\n".join([header, *rows]) + "\r\n").encode())
    record = files.Record(str(path))
    assert [row["epoch"] for row in record.rows()] == ["0", "1"]
    # a resume at epoch 1 keeps the rows before it
    record.resume(None, 1)
    assert [row["epoch"] for row in record.rows()] == ["0"]
    path.write_bytes(("\ufeff" + "\r\n".join([header, *rows])).encode())
    assert lesson.loss_curve(str(path)) == ([0, 1], [0.5, 0.25])


def test_a_record_of_other_columns_is_one_sentence(tmp_path):
    path = tmp_path / "ddpm_mnist_log.csv"
    path.write_text("name,score\na,1\n")
    with pytest.raises(UserError) as error:
        files.Record(str(path)).rows()
    assert str(error.value) == (
        f"{path} is not the record this trainer writes (its columns: name, score): "
        f"move it away, or give another --out"
    )


def test_a_data_root_given_and_wrong_is_refused(tiny, tmp_path, capsys):
    typo = str(tmp_path / "typo")
    argv = ["--train", "--data-root", typo, "--out", str(tmp_path / "j.pth")]
    assert refusal(judge_command.main, argv, capsys) == (
        f"--data-root {typo} does not exist"
    )
    argv = [str(tiny), "--data-root", typo, "--out", str(tmp_path / "f")]
    assert refusal(figures_command.main, argv, capsys) == (
        f"--data-root {typo} does not exist"
    )


def test_a_read_only_out_is_said_to_be_read_only(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()

    def read_only(self, timeout=None):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.filelock.FileLock, "acquire", read_only)
    with pytest.raises(UserError) as error:
        files.hold_lock(str(out / "ddpm_mnist.pth"))
    assert "read-only" in str(error.value) and "local disk" not in str(error.value)
    read_only = "Read-only file system"
    monkeypatch.setattr(files, "cannot_write_in", lambda folder: read_only)
    with pytest.raises(UserError) as error:
        files.output_folder(str(out))
    assert str(error.value) == (
        f"--out {out} cannot be written in (Read-only file system): choose another "
        f"--out"
    )


def test_the_laptop_preset_in_help_parses_to_the_preset():
    # the help as the terminal shows it, its lines joined again
    help_text = " ".join(cli.parser_for("mnist", "").format_help().split())
    words = re.search(r"GPU: (.*?); flags given", help_text).group(1).split()
    _, settings = cli.parse(["mnist", *words], "")
    _, preset = cli.parse(["mnist", "--laptop"], "")
    assert settings == preset
    assert {key: settings[key] for key in LAPTOP} == LAPTOP


def test_the_trainer_says_its_device_and_precision_first(tmp_path, capsys):
    trainer.train("mnist", device="cpu", n_epoch=1, n_T=2, fake_data=4, batch_size=4,
                  num_workers=0, eps_model="unet", n_feat=8, out=str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert "training on cpu in float32" in lines[:3]


def test_a_conditional_ddpm_called_without_labels_says_what_to_pass():
    ddpm = DDPM(NaiveUnet(1, 1, 8, n_classes=10), (1e-4, 0.02), 10, n_classes=10)
    with pytest.raises(ValueError) as error:
        ddpm(torch.zeros(2, 1, 32, 32))
    assert str(error.value) == (
        "this DDPM has n_classes=10: pass the labels, ddpm(x, c) with c of shape (B,)"
    )


def test_every_package_the_code_imports_is_in_the_requirements():
    required = (REPO / "requirements.txt").read_text()
    names = set()
    for path in [*REPO.glob("mindiffusion/**/*.py"), *REPO.glob("train_*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    # Pillow and numpy come with torchvision, which requires them
    distributions = {
        "PIL": "torchvision", "numpy": "torchvision", "torch_fidelity": "torch-fidelity"
    }
    third_party = names - set(sys.stdlib_module_names) - {"mindiffusion"}
    for name in third_party:
        assert re.search(rf"^{distributions.get(name, name)}\b", required, re.M), name


def test_the_loss_per_t_axis_says_it_plots_the_per_pixel_mean(tmp_path, monkeypatch):
    labels = []
    monkeypatch.setattr(Axes, "set_ylabel",
                        lambda self, text, **options: labels.append(text))
    lesson.plot_loss_per_t([1, 2], torch.tensor([0.5, 0.4]), torch.linspace(1, 0.1, 3),
                           "the loss", str(tmp_path / "loss.png"))
    # the criterion, MSELoss, averages over the pixels: no squared norm
    assert labels[0].startswith(r"per-pixel mean of $(\epsilon")
    assert "\\|" not in labels[0]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "celeba"])
def test_the_trainer_s_grids_take_the_published_walk_and_unit_eps_when_asked(
    dataset,
):
    ddpm = DDPM(torch.nn.Identity(), (1e-4, 0.02), 4)
    normalize = RECIPES[dataset].normalize
    walks = []
    for flag in ([], ["--unit-eps"]):
        argv = [dataset, "--grid-sampler", "ddim", "--grid-steps", "2", "--n-T", "4"]
        _, settings = cli.parse([*argv, *flag], "")
        sampler, _, _ = grids.sampler_for(ddpm, SimpleNamespace(**settings),
                                          normalize, 4, "cpu")
        walks.append((sampler.x0_range, sampler.unit_eps))
    assert walks == [(data_range(normalize), False), (data_range(normalize), True)]
    with pytest.raises(SystemExit):
        cli.parse([dataset, "--unit-eps"], "")
