"""Checkpoints and --resume: nothing saved is dropped, settings that cannot change are
named, a machine with fewer GPUs resumes, and worker processes leave the order exact."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import cheap_ddpm, narrow_unets, run_script
from mindiffusion.training import checkpoints, data, devices
import mindiffusion.train as trainer

# two steps of 2 fake CIFAR-10 images per epoch, on the CPU
RUN = dict(device="cpu", batch_size=2, n_T=2, fake_data=4, seed=0)
FLAGS = "--device cpu --batch-size 2 --n-T 2 --fake-data 4 --num-workers 0".split()


@pytest.fixture(scope="module", autouse=True)
def narrow():
    """CIFAR-10's NaiveUnet at width 8 in every test here, for small checkpoints."""
    with pytest.MonkeyPatch.context() as patch:
        narrow_unets(patch)
        yield


@pytest.fixture(scope="module")
def ema_run(narrow, tmp_path_factory):
    """The folder of a 1-epoch CIFAR-10 run with --ema 0.9."""
    out = tmp_path_factory.mktemp("ema_run")
    trainer.train("cifar10", n_epoch=1, out=str(out), ema=0.9, num_workers=0, **RUN)
    return out


def test_a_resume_without_ema_refuses_to_drop_the_average(ema_run, capsys):
    checkpoint = ema_run / "ddpm_cifar.pth"
    before = checkpoint.read_bytes()
    code, err = run_script(
        "cifar10",
        [*FLAGS, "--epochs", "2", "--resume", "--out", str(ema_run)],
        capsys,
    )
    assert code == 2
    assert err.splitlines()[-1].split("error: ", 1)[1] == (
        f"--resume: {checkpoint} keeps an --ema average that this run would drop: "
        f"resume with --ema DECAY to carry it on"
    )
    assert checkpoint.read_bytes() == before


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--n-T", "3"], "--n-T 2 (this run: 3)"),
        (["--lr", "0.5"], None),
    ],
)
def test_a_resume_names_the_setting_that_cannot_change(ema_run, flags, named, capsys):
    # the last --n-T given wins over FLAGS' own
    argv = [*FLAGS, "--ema", "0.9", "--epochs", "1", "--resume", "--out", str(ema_run)]
    code, err = run_script("cifar10", [*argv, *flags], capsys)
    assert code == 2
    sentence = err.splitlines()[-1].split("error: ", 1)[1]
    if named is None:
        # --lr may change: the refusal is only that every epoch is done
        assert "has already trained 1 epochs" in sentence
    else:
        assert sentence == (
            f"--resume: {ema_run / 'ddpm_cifar.pth'} was trained with {named}: "
            f"resume with the checkpoint's settings, or choose another --out"
        )


def test_a_different_model_is_named_too(ema_run):
    saved = torch.load(ema_run / "ddpm_cifar.pth", weights_only=True)["recipe"]
    recipe = dict(saved, eps_model="DummyEpsModel", eps_model_args=(1,))
    with pytest.raises(checkpoints.UserError) as error:
        checkpoints.check_recipe("ckpt", saved, recipe)
    assert str(error.value) == (
        "--resume: ckpt was trained with the model NaiveUnet (this run: "
        "DummyEpsModel), the model's arguments (3, 3, 8) (this run: (1,)): resume "
        "with the checkpoint's settings, or choose another --out"
    )


def test_a_checkpoint_from_more_gpus_restores_what_fits(monkeypatch, capsys):
    """An 8-GPU torchrun checkpoint resumed by one process on cuda:0."""
    restored = []
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: restored.append(state)
    )
    on_gpu_0 = SimpleNamespace(
        parameters=lambda: iter([SimpleNamespace(device=torch.device("cuda", 0))])
    )
    torch.manual_seed(0)
    rng_cpu = [torch.get_rng_state()] + [torch.zeros(5056, dtype=torch.uint8)] * 7
    rng_cuda = [torch.full((16,), k, dtype=torch.uint8) for k in range(8)]
    torch.manual_seed(1)
    checkpoints.restore_rng(rng_cpu, rng_cuda, on_gpu_0)
    assert torch.equal(torch.get_rng_state(), rng_cpu[0])
    assert len(restored) == 1 and torch.equal(restored[0], rng_cuda[0])
    assert capsys.readouterr().out == (
        "--resume: the checkpoint holds the random states of 8 process(es) and 8 "
        "GPU(s), and this run has 1 on cuda: what does not fit is not restored, so "
        "the run does not go on exactly as it would have\n"
    )


@pytest.mark.parametrize("batches", [0, 1])
def test_resume_is_exact_with_worker_processes(
    batches, stand_in, tmp_path, monkeypatch
):
    """From an epoch's end, and from the middle of one, whose DataLoader drew its
    seed before the save."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    save = checkpoints.Checkpoint.save

    def save_and_keep(self, epoch, at=0, rng=None):
        save(self, epoch, at, rng)
        if (epoch, at) == (1 - batches, batches):
            shutil.copytree(straight, stopped)

    monkeypatch.setattr(checkpoints.Checkpoint, "save", save_and_keep)
    run = dict(RUN, n_epoch=2, num_workers=1, save_every=1)
    trainer.train("cifar10", out=str(straight), **run)
    monkeypatch.setattr(checkpoints.Checkpoint, "save", save)
    trainer.train("cifar10", out=str(stopped), resume=True, **run)
    a = torch.load(straight / "ddpm_cifar.pth", weights_only=True)["model"]
    b = torch.load(stopped / "ddpm_cifar.pth", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # the epoch's end is saved before its grid, which a kill there loses
    lost = {"ddpm_sample_cifar0.png"} if batches == 0 else set()
    for grid in {"ddpm_sample_cifar0.png", "ddpm_sample_cifar1.png"} - lost:
        assert (straight / grid).read_bytes() == (stopped / grid).read_bytes()


def test_the_data_order_follows_the_seed_and_splits_across_ranks(tmp_path, monkeypatch):
    """Each rank of a torchrun run reads its share of the epoch, in an order that
    --seed sets (the ranks are played one after the other here)."""
    seen = []
    # each image is known by its first pixel
    cheap_ddpm(monkeypatch, on_forward=lambda ddpm, x: seen.append(x[:, 0, 0, 0]))
    orders = {}
    for seed in (0, 1):
        for rank in (0, 1):
            seen.clear()
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setattr(devices, "world_size", lambda: 2)
            monkeypatch.setattr(data, "world_size", lambda: 2)
            monkeypatch.setattr(trainer, "world_size", lambda: 2)
            run = dict(RUN, seed=seed, fake_data=8, batch_size=4, num_workers=0)
            trainer.train(
                "cifar10", n_epoch=1, out=str(tmp_path / f"{seed}{rank}"), **run
            )
            orders[seed, rank] = torch.cat(seen).tolist()
    for seed in (0, 1):
        # two batches of 2 on each rank, together all 8 images once
        assert len(orders[seed, 0]) == len(orders[seed, 1]) == 4
        assert len(set(orders[seed, 0] + orders[seed, 1])) == 8
    assert orders[0, 0] != orders[1, 0]
