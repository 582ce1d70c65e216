"""Each door run as a user runs it, in a fresh process: the notes' scripts on a few
images in their datasets' own on-disk formats, and the trainer on --fake-data (the
runs start as the session begins, conftest.py's started_early); and the sentence
that a dataset missing gets from each door."""

import csv
import math
import os
import runpy
import subprocess
import sys

from PIL import Image
import pytest
import torch

from conftest import OFFLINE, REPO, run_script, write_digits, write_faces
from mindiffusion.ddpm import DDPM
from mindiffusion.dummy import DummyEpsModel
from mindiffusion.training import recipes
from mindiffusion.unet import NaiveUnet

# the command, its flags, the grid it writes and its tile size, its checkpoint and
# model, and the number of images in its grid
RUNS = {
    "train_mnist.py": (
        ["train_mnist.py", "--batch-size", "2", "--data-root", "digits"],
        "ddpm_sample_0.png", 28, "ddpm_mnist.pth", lambda: DummyEpsModel(1), 16,
    ),
    "train_celeba.py": (
        ["train_celeba.py", "--device", "cpu", "--data-root", "faces"],
        "ddpm_sample_celeba000.png", 128, "ddpm_celeba.pth",
        lambda: NaiveUnet(3, 3, n_feat=128), 9,
    ),
    "train cifar10": (
        ["-m", "mindiffusion.train", "cifar10", "--fake-data", "3", "--batch-size",
         "2", "--device", "cpu"],
        "ddpm_sample_cifar0.png", 32, "ddpm_cifar.pth",
        lambda: NaiveUnet(3, 3, n_feat=128), 9,
    ),
}


# each run's folder and process, started as the session begins (conftest.py)
STARTED = {}


def start_early(tmp_path_factory) -> list:
    """Every run of this module, each in a folder of its own."""
    env = {k: v for k, v in os.environ.items() if k != "CELEBA_PATH"}
    # one thread each, as torchrun gives its processes: these runs share two cores
    # with each other and with the in-process tests
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **OFFLINE)
    quick = ["--epochs", "1", "--n-T", "1", "--out", "results"]
    commands = {name: [*argv, *quick] for name, (argv, *_) in RUNS.items()}
    for name in commands:
        if name.startswith("train "):
            commands[name] += ["--num-workers", "0"]
    for name, argv in commands.items():
        cwd = tmp_path_factory.mktemp("run")
        write_digits(cwd / "digits", 2)
        write_faces(cwd / "faces", 1)
        script = [str(REPO / argv[0])] if argv[0].endswith(".py") else argv[:1]
        process = subprocess.Popen(
            [sys.executable, *script, *argv[1:]],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        STARTED[name] = (cwd, process)
    return [process for _, process in STARTED.values()]


def finished(name):
    """The run's folder, its exit code, stdout and stderr, once it has ended."""
    cwd, process = STARTED[name]
    stdout, stderr = process.communicate(timeout=300)
    return cwd, process.returncode, stdout, stderr


@pytest.mark.parametrize("name", RUNS)
def test_each_door_runs_end_to_end(name):
    argv, grid, tile, checkpoint, make_model, n_images = RUNS[name]
    tmp_path, returncode, stdout, stderr = finished(name)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    if "--device" not in argv and not torch.cuda.is_available():
        assert "CUDA is not available here: using cpu instead of cuda:0" in stdout

    out = tmp_path / "results"
    written = [grid, checkpoint]
    trainer = argv[0] == "-m"
    if trainer:
        # the record: its columns, and one row for the one epoch
        log = checkpoint.replace(".pth", "_log.csv")
        written.append(log)
        with open(out / log, newline="") as file:
            rows = list(csv.reader(file))
        assert rows[0] == ["epoch", "step", "loss", "lr", "images_per_s", "seconds"]
        assert len(rows) == 2 and rows[1][0] == "0"
        assert math.isfinite(float(rows[1][2])) and float(rows[1][3]) > 0
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    # rows of 4 tiles, with make_grid's 2-pixel padding around each
    rows = math.ceil(n_images / 4)
    size = (4 * (tile + 2) + 2, rows * (tile + 2) + 2)
    assert Image.open(out / grid).size == size

    state = torch.load(out / checkpoint, map_location="cpu", weights_only=True)
    # the notes' torch.save(ddpm.state_dict(), ...), or the trainer's checkpoint
    # with the same weights under "model"
    weights = state["model"] if trainer else state
    ddpm = DDPM(eps_model=make_model(), betas=(1e-4, 0.02), n_T=1)
    ddpm.load_state_dict(weights)
    assert not any(p.isnan().any() for p in ddpm.parameters())


def run_script_main(script, argv, monkeypatch):
    """Run a notes' script's `__main__` in this process; return what it exits with."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    return exit_info.value.code


def test_a_script_without_its_data_says_what_to_pass(
    tmp_path, monkeypatch, no_network
):
    monkeypatch.chdir(tmp_path)
    message = run_script_main("train_cifar10.py", ["--device", "cpu"], monkeypatch)
    assert message.startswith("CIFAR-10 is not in ./data and could not be downloaded (")
    assert message.endswith("): put it there, or pass --data-root DIR")
    assert "\n" not in message
    monkeypatch.delenv("CELEBA_PATH", raising=False)
    assert run_script_main("train_celeba.py", ["--device", "cpu"], monkeypatch) == (
        "no images in no folder (no --data-root, no CELEBA_PATH): pass --data-root "
        "DIR, DIR/<subfolder>/*.jpg"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--device", "cpu", "--data-root", str(empty)]
    assert run_script_main("train_celeba.py", argv, monkeypatch) == (
        f"no images in {empty}: pass --data-root DIR, DIR/<subfolder>/*.jpg"
    )


def test_the_trainer_without_a_folder_says_where_to_put_one(monkeypatch, capsys):
    celeba = recipes.RECIPES["celeba"]
    monkeypatch.setitem(recipes.RECIPES, "celeba", celeba._replace(data_root=None))
    code, err = run_script("celeba", ["--device", "cpu"], capsys)
    assert code == 2
    assert err.splitlines() == [
        "python -m mindiffusion.train: error: no image folder given: pass --data-root "
        "DIR or set CELEBA_PATH (or run with --fake-data N)"
    ]
