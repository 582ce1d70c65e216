"""The command line: help and defaults, devices, checkpoints, --resume, and every bad
input ending in one sentence and a non-zero exit, without a traceback."""

import os
import shutil

from PIL import Image
import pytest
import torch
import torch.nn as nn

from conftest import narrow_unets, run_script
from mindiffusion.ddpm import DDPM
from mindiffusion.training import checkpoints, devices
import mindiffusion.train as trainer
from mindiffusion.dummy import DummyEpsModel

# the cores this process may use, which a SLURM job or a container may limit
CPUS = len(os.sched_getaffinity(0))
# a CIFAR-10 run of a few seconds on a CPU
QUICK = dict(device="cpu", batch_size=2, n_T=2, fake_data=3, num_workers=0)
# the same run on the command line: n_T -> --n-T 2, fake_data -> --fake-data 3, ...
QUICK_FLAGS = [
    word
    for key, value in QUICK.items()
    for word in (f"--{key.replace('_', '-')}", str(value))
]


# the notes' settings for each script; num_workers: the original's, capped at the CPUs
@pytest.mark.parametrize(
    "train, epochs, device, batch_size, lr, num_workers",
    [
        ("mnist", 100, "cuda:0", 128, 2e-4, min(20, CPUS)),
        ("cifar10", 100, "cuda:1", 512, 1e-5, min(16, CPUS)),
        ("celeba", 100, "cuda:1", 32, 2e-5, min(16, CPUS)),
    ],
)
def test_help_shows_each_flag_with_the_notes_defaults(
    train, epochs, device, batch_size, lr, num_workers, capsys
):
    with pytest.raises(SystemExit) as exit_info:
        trainer.main([train, *["--help"]])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--epochs", epochs),
        ("--device", device),
        ("--batch-size", batch_size),
        ("--lr", lr),
        ("--n-T", 1000),
        ("--out", "contents"),
        ("--num-workers", num_workers),
    ]:
        assert f"{flag} " in text and f"(default: {default})" in text, flag
    for flag in [
        "--data-root",
        "--seed",
        "--resume",
        "--fake-data",
        "--amp",
        "--channels-last",
        "--compile",
        "--ema",
    ]:
        assert f"{flag} " in text, flag


def test_a_missing_cuda_device_falls_back_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.resolve_device("cuda:1") == torch.device("cpu")
    assert (
        capsys.readouterr().out
        == "CUDA is not available here: using cpu instead of cuda:1\n"
    )
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve_device("cuda") == torch.device("mps")
    assert (
        capsys.readouterr().out
        == "CUDA is not available here: using mps instead of cuda\n"
    )


def test_a_missing_gpu_index_falls_back_to_cuda_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("cuda:1") == torch.device("cuda:0")
    assert (
        capsys.readouterr().out
        == "cuda:1 does not exist (1 GPU(s) here): using cuda:0 instead\n"
    )
    assert devices.resolve_device("cuda:0") == torch.device("cuda:0")
    assert devices.resolve_device("cuda") == torch.device("cuda")
    assert capsys.readouterr().out == ""


def test_cpu_is_taken_as_asked(capsys):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert capsys.readouterr().out == ""


def one_sentence(err):
    """The single line a bad input prints, without the program's name."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0].split(": error: ", 1)[1]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("banana", "unknown device 'banana': use cpu, cuda, cuda:N or mps"),
        ("cuda:x", "unknown device 'cuda:x': use cpu, cuda, cuda:N or mps"),
        ("meta", "unsupported device 'meta': use cpu, cuda, cuda:N or mps"),
    ],
)
def test_an_unknown_device_is_one_sentence(name, expected, tmp_path, capsys):
    code, err = run_script(
        "cifar10", ["--device", name, "--out", str(tmp_path)], capsys
    )
    assert code == 2
    assert one_sentence(err) == expected


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--epochs", "0", "must be at least 1, got 0"),
        ("--n-T", "0", "must be at least 1, got 0"),
        ("--batch-size", "0", "must be at least 1, got 0"),
        ("--fake-data", "0", "must be at least 1, got 0"),
        ("--num-workers", "-1", "must be at least 0, got -1"),
        ("--lr", "0", "must be positive, got 0.0"),
        ("--ema", "1", "must be between 0 and 1, got 1.0"),
        ("--ema", "0", "must be between 0 and 1, got 0.0"),
        ("--epochs", "many", "invalid integer value: 'many'"),
    ],
)
def test_out_of_range_numbers_are_refused_by_the_parser(flag, value, expected, capsys):
    code, err = run_script("mnist", [flag, value], capsys)
    assert code == 2
    # argparse prints its usage, then the one line that says what is wrong
    assert err.splitlines()[-1].endswith(f"error: argument {flag}: {expected}")


@pytest.mark.parametrize(
    "train, name", [("mnist", "MNIST"), ("cifar10", "CIFAR-10")]
)
def test_a_dataset_that_is_missing_and_cannot_be_downloaded(
    train, name, tmp_path, capsys, no_network
):
    root = str(tmp_path / "data")
    code, err = run_script(
        train,
        ["--device", "cpu", "--data-root", root, "--out", str(tmp_path / "out")],
        capsys,
    )
    assert code == 2
    sentence = one_sentence(err)
    assert sentence.startswith(f"{name} is not in {root} and could not be downloaded (")
    assert sentence.endswith(
        "put its files there or point --data-root at them, or run with --fake-data N"
    )


def write_jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (178, 218), (10, 20, 30)).save(path)


def test_celeba_image_folder_mistakes(tmp_path, capsys):
    def error_for(root):
        code, err = run_script(
            "celeba",
            [
                "--device",
                "cpu",
                "--data-root",
                str(root),
                "--out",
                str(tmp_path / "out"),
            ],
            capsys,
        )
        assert code == 2
        return one_sentence(err)

    layout = "ImageFolder wants the images one folder down, in ROOT/<subfolder>/*.jpg"
    assert error_for(tmp_path / "nowhere") == (
        f"{tmp_path / 'nowhere'} is not a folder: give the image folder to --data-root"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert error_for(empty) == f"no images found under {empty}: {layout}"
    loose = tmp_path / "loose"
    write_jpg(loose / "000001.jpg")
    write_jpg(loose / "000002.jpg")
    assert error_for(loose) == (
        f"{loose} holds 2 images directly, but {layout}: move them into a subfolder "
        f"such as {loose / 'all'}"
    )
    hollow = tmp_path / "hollow"
    (hollow / "img_align_celeba").mkdir(parents=True)
    assert error_for(hollow) == f"no images found under {hollow}: {layout}"


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A folder holding the checkpoint and grid of a 1-epoch CIFAR-10 run, seed 0,
    with its NaiveUnet 8 wide."""
    out = tmp_path_factory.mktemp("one_epoch")
    with pytest.MonkeyPatch.context() as patch:
        narrow_unets(patch)
        trainer.train("cifar10", n_epoch=1, seed=0, out=str(out), **QUICK)
    return out


@pytest.fixture(autouse=True)
def narrow(monkeypatch):
    """This module's runs, one_epoch's among them, train a NaiveUnet 8 wide."""
    narrow_unets(monkeypatch)


def test_resume_continues_exactly_as_a_straight_run(one_epoch, tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train("cifar10", n_epoch=2, seed=0, out=str(straight), **QUICK)
    shutil.copytree(one_epoch, resumed)
    trainer.main(
        ["cifar10", *QUICK_FLAGS, "--seed", "0", "--epochs", "2", "--resume", "--out",
         str(resumed)]
    )
    assert "resuming from" in capsys.readouterr().out

    a = torch.load(straight / "ddpm_cifar.pth", weights_only=True)
    b = torch.load(resumed / "ddpm_cifar.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for p, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][p][key]), (p, key)
    for name in ["ddpm_sample_cifar0.png", "ddpm_sample_cifar1.png"]:
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_a_new_run_never_overwrites_a_checkpoint(one_epoch, capsys):
    checkpoint = one_epoch / "ddpm_cifar.pth"
    before = checkpoint.read_bytes()
    code, err = run_script(
        "cifar10", [*QUICK_FLAGS, "--out", str(one_epoch)], capsys
    )
    assert code == 2
    assert one_sentence(err) == (
        f"{checkpoint} already exists: continue it with --resume, "
        f"or choose another --out"
    )
    assert checkpoint.read_bytes() == before


def test_resume_when_every_epoch_is_done(one_epoch, capsys):
    code, err = run_script(
        "cifar10",
        [*QUICK_FLAGS, "--epochs", "1", "--resume", "--out", str(one_epoch)],
        capsys,
    )
    assert code == 2
    assert one_sentence(err) == (
        f"--resume: {one_epoch / 'ddpm_cifar.pth'} has already trained 1 epochs; "
        f"ask for more with --epochs"
    )


class RunsCode:
    """Unpickling this object runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_are_refused_with_one_sentence(one_epoch, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = out / "ddpm_cifar.pth"

    def resume_error():
        code, err = run_script(
            "cifar10", [*QUICK_FLAGS, "--resume", "--out", str(out)], capsys
        )
        assert code == 2
        return one_sentence(err)

    assert resume_error() == f"--resume: there is no checkpoint at {checkpoint}"

    good = (one_epoch / "ddpm_cifar.pth").read_bytes()
    checkpoint.write_bytes(good[: len(good) // 2])
    assert resume_error() == f"--resume: {checkpoint} is not a readable checkpoint"
    checkpoint.write_bytes(b"")
    assert resume_error() == f"--resume: {checkpoint} is not a readable checkpoint"

    marker = tmp_path / "code-ran"
    torch.save({"model": RunsCode(marker), "epoch": 1}, checkpoint)
    assert resume_error() == (
        f"--resume: {checkpoint} refused: it holds Python objects besides tensors and "
        f"plain values, and loading them could run code"
    )
    assert not marker.exists()

    mnist_ddpm = DDPM(eps_model=DummyEpsModel(1), betas=(1e-4, 0.02), n_T=2)
    optim = torch.optim.Adam(mnist_ddpm.parameters())
    checkpoints.Checkpoint(str(checkpoint), mnist_ddpm, optim, {}).save(1)
    assert resume_error().startswith(
        f"--resume: {checkpoint} does not fit this script's model and settings ("
    )


def test_an_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ddpm.pth")
    ddpm = DDPM(eps_model=nn.Conv2d(1, 1, 3, padding=1), betas=(1e-4, 0.02), n_T=10)
    optim = torch.optim.Adam(ddpm.parameters())
    checkpoints.Checkpoint(path, ddpm, optim, {}).save(1)
    before = open(path, "rb").read()

    def save_half_then_stop(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_half_then_stop)
    with torch.no_grad():
        ddpm.eps_model.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.Checkpoint(path, ddpm, optim, {}).save(2)
    assert open(path, "rb").read() == before
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert not (tmp_path / "ddpm.pth.tmp").exists()


def test_ctrl_c_stops_with_one_line_and_keeps_the_checkpoint(
    one_epoch, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(one_epoch, out)
    before = (out / "ddpm_cifar.pth").read_bytes()

    def interrupted(self, x, c):
        raise KeyboardInterrupt

    monkeypatch.setattr(DDPM, "forward", interrupted)
    code, err = run_script(
        "cifar10",
        [*QUICK_FLAGS, "--epochs", "3", "--resume", "--out", str(out)],
        capsys,
    )
    assert code == 130
    # the progress bar shares stderr; the message is its last line
    assert err.splitlines()[-1] == (
        f"interrupted: {out} holds what the saves before it wrote, each file whole"
    )
    assert (out / "ddpm_cifar.pth").read_bytes() == before


def test_an_out_that_names_a_file_is_one_sentence(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("kept")
    code, err = run_script("cifar10", [*QUICK_FLAGS, "--out", str(out)], capsys)
    assert code == 2
    assert one_sentence(err) == (
        f"--out {out} is a file, not a folder: choose another --out"
    )
    assert out.read_text() == "kept"
