"""torchrun with two gloo processes on the CPU: DDP keeps the ranks in step, the
global batch is shared out, and rank 0 alone writes grids and checkpoints."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from mindiffusion import cli

# 8 fake images in global batches of 4: two steps per epoch, 2 images per rank each
FLAGS = "--device cpu --fake-data 8 --batch-size 4 --n-T 2 --num-workers 0 --seed 0"


def torchrun(*args, cwd):
    """Run torchrun with 2 processes on this machine; return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node=2", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_torchrun_trains_in_step_and_resumes(tmp_path, no_network):
    out = tmp_path / "out"
    stdout = torchrun(
        str(REPO / "train_cifar10.py"),
        *FLAGS.split(),
        "--epochs",
        "1",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    # rank 0 alone prints, samples and saves
    assert stdout.count("Epoch 0 : ") == 1
    assert sorted(os.listdir(out)) == ["ddpm_cifar.pth", "ddpm_sample_cifar0.png"]
    after_one = torch.load(out / "ddpm_cifar.pth", weights_only=True)

    stdout = torchrun(
        str(REPO / "tests" / "ddp_worker.py"),
        "train_cifar10",
        *FLAGS.split(),
        "--epochs",
        "2",
        "--out",
        str(out),
        "--resume",
        cwd=tmp_path,
    )
    assert stdout.count("resuming from") == 1 and stdout.count("Epoch 1 : ") == 1
    assert sorted(os.listdir(out)) == [
        "ddpm_cifar.pth",
        "ddpm_sample_cifar0.png",
        "ddpm_sample_cifar1.png",
        "rank0.pt",
        "rank1.pt",
    ]
    saved = torch.load(out / "ddpm_cifar.pth", weights_only=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert saved["epoch"] == 2
    # each rank trained on its half of every global batch of 4
    assert ranks[0]["batch_sizes"] == ranks[1]["batch_sizes"] == [2, 2]
    # and drew its own noise, even though both started from one checkpoint
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])
    for name, value in saved["model"].items():
        # the same weights on both ranks, equal to the checkpoint
        assert torch.equal(ranks[0]["model"][name], value), name
        assert torch.equal(ranks[1]["model"][name], value), name
    # and the second epoch did change them
    assert not torch.equal(
        saved["model"]["eps_model.out.weight"],
        after_one["model"]["eps_model.out.weight"],
    )


def test_a_batch_that_does_not_split_evenly_is_one_sentence():
    assert cli.split_batch(512, 4) == 128
    with pytest.raises(cli.UserError, match=r"^--batch-size 5 does not split evenly"):
        cli.split_batch(5, 2)


def torchrun_environment(monkeypatch, local_rank):
    for name, value in dict(
        RANK=local_rank, LOCAL_RANK=local_rank, WORLD_SIZE=2
    ).items():
        monkeypatch.setenv(name, str(value))


def test_more_processes_than_gpus_is_one_sentence(monkeypatch):
    torchrun_environment(monkeypatch, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(cli.UserError, match=r"use --nproc_per_node=1$"):
        cli.init_processes("cuda")


def test_torchrun_on_mps_is_one_sentence(monkeypatch):
    torchrun_environment(monkeypatch, local_rank=0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(
        cli.UserError, match=r"^torchrun runs on CUDA GPUs or on the CPU"
    ):
        cli.init_processes("mps")
