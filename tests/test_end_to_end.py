"""Each script run as a user runs it, in a fresh process, on --fake-data; the runs
start as the session begins (conftest.py's started_early)."""

import csv
import math
import os
import subprocess
import sys

from PIL import Image
import pytest
import torch

from conftest import REPO
from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet
from train_mnist import DummyEpsModel

# script, its flags, the grid it writes and its tile size, its checkpoint and model
RUNS = [
    (
        "train_mnist.py",
        ["--fake-data", "2", "--batch-size", "2"],
        "ddpm_sample_0.png",
        28,
        "ddpm_mnist.pth",
        lambda: DummyEpsModel(1),
    ),
    (
        "train_cifar10.py",
        ["--fake-data", "3", "--batch-size", "2", "--device", "cpu"],
        "ddpm_sample_cifar0.png",
        32,
        "ddpm_cifar.pth",
        lambda: NaiveUnet(3, 3, n_feat=128),
    ),
    (
        "train_celeba.py",
        ["--fake-data", "1", "--device", "cpu"],
        "ddpm_sample_celeba000.png",
        128,
        "ddpm_celeba.pth",
        lambda: NaiveUnet(3, 3, n_feat=128),
    ),
]


# each run's folder and process, started as the session begins (conftest.py)
STARTED = {}


def start_early(tmp_path_factory) -> list:
    """Every run of this module, each in a folder of its own."""
    env = {k: v for k, v in os.environ.items() if k != "CELEBA_PATH"}
    # one thread each, as torchrun gives its processes: these runs share two cores
    # with each other and with the in-process tests
    env["OMP_NUM_THREADS"] = "1"
    quick = ["--epochs", "1", "--n-T", "1", "--num-workers", "0", "--out", "results"]
    commands = {script: [script, *quick, *flags] for script, flags, *_ in RUNS}
    commands["without a folder"] = ["train_celeba.py"]
    for name, (script, *argv) in commands.items():
        cwd = tmp_path_factory.mktemp("run")
        process = subprocess.Popen(
            [sys.executable, str(REPO / script), *argv],
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


@pytest.mark.parametrize("script, flags, grid, tile, checkpoint, make_model", RUNS)
def test_script_runs_end_to_end_on_fake_data(
    script, flags, grid, tile, checkpoint, make_model
):
    tmp_path, returncode, stdout, stderr = finished(script)
    assert returncode == 0, stderr
    assert "Traceback" not in stderr
    if "--device" not in flags and not torch.cuda.is_available():
        assert "CUDA is not available here: using cpu instead of cuda:0" in stdout

    out = tmp_path / "results"
    log = checkpoint.replace(".pth", "_log.csv")
    assert sorted(p.name for p in out.iterdir()) == sorted([grid, checkpoint, log])
    # the record: its columns, and one row for the one epoch
    with open(out / log, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["epoch", "step", "loss", "lr", "images_per_s", "seconds"]
    assert len(rows) == 2 and rows[1][0] == "0"
    assert math.isfinite(float(rows[1][2])) and float(rows[1][3]) > 0
    # 16 tiles in 4 rows of 4, with make_grid's 2-pixel padding around each
    side = 4 * (tile + 2) + 2
    assert Image.open(out / grid).size == (side, side)

    state = torch.load(out / checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    ddpm = DDPM(eps_model=make_model(), betas=(1e-4, 0.02), n_T=1)
    ddpm.load_state_dict(state["model"])
    assert not any(p.isnan().any() for p in ddpm.parameters())


def test_celeba_without_a_folder_says_where_to_put_one():
    _, returncode, _, stderr = finished("without a folder")
    assert returncode == 2
    assert stderr.splitlines() == [
        "train_celeba.py: error: no image folder given: pass --data-root DIR or set "
        "CELEBA_PATH (or run with --fake-data N)"
    ]
