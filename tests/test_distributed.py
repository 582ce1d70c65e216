"""torchrun with two gloo processes on the CPU: DDP keeps the ranks in step, the
global batch is shared out, and rank 0 alone writes grids and checkpoints. The
launches start as the session begins (conftest.py's started_early)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import OFFLINE, REPO
from mindiffusion.ddpm import DDPM
import mindiffusion.train as trainer
from mindiffusion.training import devices
from mindiffusion.training.flags import UserError
from mindiffusion.dummy import DummyEpsModel

# global batches of 4, 2 images per rank each, with more steps to an epoch than the
# steps between the ranks' checks for a stop signal
STEPS_PER_EPOCH = trainer.SIGNAL_EVERY + 2
FLAGS = (f"--device cpu --fake-data {4 * STEPS_PER_EPOCH} --batch-size 4 --n-T 2 "
         "--num-workers 0 --seed 0")
# MNIST with a narrow UNet: most of each launch is then Python and torch starting up
SMALL_MNIST = "--eps-model unet --n-feat 8"


def start_torchrun(*args, cwd, env=None) -> subprocess.Popen:
    """Start torchrun with 2 processes on this machine."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node=2", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, returncode=0) -> str:
    """What a torchrun started so printed, once it has ended with `returncode`."""
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == returncode, stderr[-3000:]
    return stdout + stderr


def start_mnist_on_2_ranks(out, *flags, env=None) -> subprocess.Popen:
    """Start "mnist" under torchrun, through tests/ddp_worker.py."""
    return start_torchrun(
        str(REPO / "tests" / "ddp_worker.py"),
        "mnist",
        *FLAGS.split(),
        *SMALL_MNIST.split(),
        "--epochs",
        "2",
        "--out",
        str(out),
        *flags,
        cwd=out.parent,
        env=env,
    )


# the first launch of each test below, started as the session begins (conftest.py)
STARTED = {}


def start_early(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("torchrun")
    STARTED["folder"] = folder
    # a first grid slower than the process group's timeout: the other rank waits
    STARTED["straight"] = start_mnist_on_2_ranks(
        folder / "straight", env=dict(PG_TIMEOUT="10", SLOW_GRID="12", **OFFLINE)
    )
    # SIGTERM reaches rank 0 alone, in its first step: both ranks stop after the step
    # at which they next compare their signals, the largest of which is rank 0's,
    # and rank 0 saves (rank 1's 0 never matches a step)
    STARTED["halves"] = start_mnist_on_2_ranks(
        folder / "halves", env=dict(SLOW_GRID="0", SIGTERM_AT="1,0", **OFFLINE)
    )
    STARTED["equal steps"] = start_torchrun(
        str(REPO / "tests" / "ddp_equal_steps.py"), "out.pt", cwd=folder
    )
    return [STARTED[name] for name in ("straight", "halves", "equal steps")]


def test_torchrun_trains_in_step_stops_together_and_resumes_exactly(no_network):
    straight, halves = STARTED["folder"] / "straight", STARTED["folder"] / "halves"
    stdout = finish(STARTED["straight"])
    # rank 0 alone prints, draws and saves
    assert stdout.count("Epoch 0 : ") == 1 and stdout.count("Epoch 1 : ") == 1
    assert sorted(os.listdir(straight)) == [
        "ddpm_mnist.pth",
        "ddpm_mnist_log.csv",
        "ddpm_sample_0.png",
        "ddpm_sample_1.png",
        "rank0.pt",
        "rank1.pt",
    ]
    saved = torch.load(straight / "ddpm_mnist.pth", weights_only=True)
    ranks = [torch.load(straight / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each rank trained on its half of every global batch of 4
    steps = 2 * STEPS_PER_EPOCH
    assert ranks[0]["batch_sizes"] == ranks[1]["batch_sizes"] == [2] * steps
    # and drew its own noise
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    for name, value in saved["model"].items():
        # the same weights on both ranks, equal to the checkpoint
        assert torch.equal(ranks[0]["model"][name], value), name
        assert torch.equal(ranks[1]["model"][name], value), name

    stdout = finish(STARTED["halves"], returncode=1)
    at = trainer.SIGNAL_EVERY
    assert stdout.count(f"stopped by SIGTERM after epoch 0, step {at}:") == 1
    state = torch.load(halves / "ddpm_mnist.pth", weights_only=True)
    assert (state["epoch"], state["batches"]) == (0, at)
    stdout = finish(
        start_mnist_on_2_ranks(halves, "--resume", env=dict(SLOW_GRID="0"))
    )
    assert stdout.count("resuming from") == 1
    resumed = torch.load(halves / "ddpm_mnist.pth", weights_only=True)
    for name, value in saved["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for p, moments in saved["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(resumed["optimizer"]["state"][p][key], value), key
    for grid in ("ddpm_sample_0.png", "ddpm_sample_1.png"):
        assert (straight / grid).read_bytes() == (halves / grid).read_bytes()


def test_a_batch_that_does_not_split_evenly_is_one_sentence(monkeypatch):
    monkeypatch.setattr(devices, "world_size", lambda: 4)
    assert devices.split_batch(512) == 128
    monkeypatch.setattr(devices, "world_size", lambda: 2)
    with pytest.raises(UserError, match=r"^--batch-size 5 does not split"):
        devices.split_batch(5)


def torchrun_environment(monkeypatch, local_rank):
    for name, value in dict(
        RANK=local_rank, LOCAL_RANK=local_rank, WORLD_SIZE=2
    ).items():
        monkeypatch.setenv(name, str(value))


def test_more_processes_than_gpus_is_one_sentence(monkeypatch):
    torchrun_environment(monkeypatch, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"use --nproc_per_node=1$"):
        devices.init_processes(torch.device("cuda"))


def test_torchrun_on_mps_is_one_sentence(monkeypatch):
    torchrun_environment(monkeypatch, local_rank=0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(
        UserError, match=r"^torchrun runs on CUDA GPUs or on the CPU"
    ):
        devices.init_processes(torch.device("mps"))


def test_two_ranks_take_the_step_of_one_with_groupnorm():
    finish(STARTED["equal steps"])
    difference = torch.load(STARTED["folder"] / "out.pt")
    assert difference["NaiveUnet"] < 1e-5
    # on the CPU each rank normalises its own half: BatchNorm's gradients differ
    assert difference["DummyEpsModel"] > 1e-2


@pytest.mark.parametrize(
    "device, norm", [("cuda", nn.SyncBatchNorm), ("cpu", nn.BatchNorm2d)]
)
def test_under_ddp_batchnorm_is_synchronised_on_gpus_only(device, norm, monkeypatch):
    monkeypatch.setattr(devices.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(
        devices, "DistributedDataParallel", lambda module, device_ids: module
    )
    ddpm = DDPM(DummyEpsModel(1), betas=(1e-4, 0.02), n_T=2)
    parameters = list(ddpm.parameters())
    wrapped = devices.distribute(ddpm, torch.device(device))
    norms = [m for m in wrapped.modules() if "Norm" in type(m).__name__]
    assert len(norms) == 7 and {type(m) for m in norms} == {norm}
    # the optimizer, made before, still holds the model's parameters
    assert all(
        a is b for a, b in zip(wrapped.parameters(), parameters, strict=True)
    )
