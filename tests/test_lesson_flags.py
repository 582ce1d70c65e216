"""The lesson's flags: --per-class takes the first images of each class, --grid-minutes
draws grids within long epochs without changing what the run trains, and --laptop
reaches the run from the trainer's command line; each wired in for all three
datasets."""
import pytest
import torch

import mindiffusion.train as trainer
from conftest import cheap_ddpm, narrow_unets
from mindiffusion.training import data
from test_long_runs import FLAGS, SMALL_MNIST, train
from test_prepared_run import SCRIPTS


def test_per_class_keeps_the_first_images_of_each_label_in_order(capsys):
    dataset = type("Labelled", (), {
        "targets": [3, 1, 3, 3, 1, 2, 1], "__len__": lambda self: 7,
    })()
    assert data.first_of_each_class(dataset, 2).indices == [0, 1, 2, 4, 5]
    assert data.first_of_each_class(dataset, 1).indices == [0, 1, 5]
    assert "takes all" not in capsys.readouterr().out
    # a part as large as the whole is said, not refused: the README's command
    # names the part, and a folder may hold just that part
    assert len(data.first_of_each_class(dataset, 3)) == 7
    assert "--per-class 3 takes all 7 images" in capsys.readouterr().out


@pytest.mark.parametrize("script, flags, grid", SCRIPTS)
def test_each_script_trains_on_the_first_images_of_each_class(
    script, flags, grid, tmp_path, capsys, monkeypatch
):
    seen = []
    cheap_ddpm(monkeypatch, on_forward=lambda ddpm, x: seen.append(len(x)))
    narrow_unets(monkeypatch)
    argv = [*FLAGS.split(), *flags, "--fake-data", "16", "--epochs", "1"]
    assert train(script, [*argv, "--per-class", "1", "--out", str(tmp_path)],
                 capsys)[0] == 0
    # the labels FakeImages draws, the first image of each
    labels = data.FakeImages(16, (1, 28, 28)).targets
    assert sum(seen) == len(set(labels)) < 16


class FakeClock:
    """time.monotonic for the trainer, a minute later at each reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 60
        return self.now


def run_with_clock(script, flags, out, capsys, monkeypatch, *more):
    """The trainer's run of one epoch of 4 steps under the fake clock."""
    monkeypatch.setattr(trainer, "time", FakeClock())
    argv = [*FLAGS.split(), *flags, "--epochs", "1", "--out", str(out), *more]
    assert train(script, argv, capsys)[0] == 0
    return sorted(path.name for path in out.glob("*.png"))


def test_grid_minutes_draws_within_the_epoch_and_trains_the_same(
    stand_in, tmp_path, capsys, monkeypatch
):
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    assert run_with_clock("mnist", SMALL_MNIST, plain, capsys, monkeypatch) == [
        "ddpm_sample_0.png"
    ]
    # readings: a minute at the start, then one at each step's check; the check
    # after step 2 finds 2 minutes passed, and the grid's draw restarts the clock
    drawn = run_with_clock(
        "mnist", SMALL_MNIST, timed, capsys, monkeypatch, "--grid-minutes", "2"
    )
    assert drawn == ["ddpm_sample_0.png", "ddpm_sample_0_step2.png"]
    # the grid's random numbers are its own: the run trains and ends the same
    a = torch.load(plain / "ddpm_mnist.pth", weights_only=True)
    b = torch.load(timed / "ddpm_mnist.pth", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert all(map(torch.equal, a["rng_cpu"], b["rng_cpu"]))
    assert (plain / "ddpm_sample_0.png").read_bytes() == (
        timed / "ddpm_sample_0.png"
    ).read_bytes()


@pytest.mark.parametrize("script, flags, grid", SCRIPTS)
def test_each_script_draws_its_grid_within_the_epoch(
    script, flags, grid, tmp_path, capsys, monkeypatch
):
    cheap_ddpm(monkeypatch)
    narrow_unets(monkeypatch)
    drawn = run_with_clock(
        script, flags, tmp_path, capsys, monkeypatch, "--grid-minutes", "2"
    )
    step_grid = grid.format(0).replace(".png", "_step2.png")
    assert drawn == sorted([grid.format(0), step_grid])


@pytest.mark.parametrize("minutes", [[], ["--grid-minutes", "60"]])
def test_the_ranks_meet_for_grid_minutes_only_under_it(
    minutes, stand_in, tmp_path, capsys, monkeypatch
):
    # what the ranks compare, in the order they compare it: signals are 0, grids 0/1
    met = []
    monkeypatch.setattr(trainer, "largest", lambda value: met.append(value) or value)
    argv = [*FLAGS.split(), *SMALL_MNIST, "--epochs", "1", "--out", str(tmp_path)]
    assert train("mnist", [*argv, *minutes], capsys)[0] == 0
    # steps 1 to 3 of 4 meet for a stop signal, and under --grid-minutes first for
    # the grid; the epoch's end meets for a signal once more
    per_step = [0, 0] if minutes else [0]
    assert met == per_step * 3 + [0]


def test_the_command_line_hands_the_laptop_preset_to_the_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(trainer, "train", lambda **kw: seen.update(kw))
    trainer.main(["mnist", "--laptop"])
    expected = dict(
        eps_model="unet", n_feat=16, batch_size=16, lr=3e-3, ema=0.995,
        channels_last=True, grid_sampler="ddim", grid_steps=20, guide_w=2.0,
        grid_minutes=2.0, num_workers=0,
    )
    assert {k: seen[k] for k in expected} == expected


def test_under_torchrun_each_rank_saves_and_rank_0_alone_draws(
    stand_in, tmp_path, capsys, monkeypatch
):
    from mindiffusion.training import checkpoints

    saves = []
    save = checkpoints.Checkpoint.save

    def counted(self, epoch, batches=0, rng=None):
        saves.append((epoch, batches))
        save(self, epoch, batches, rng)

    monkeypatch.setattr(checkpoints.Checkpoint, "save", counted)
    # a rank other than 0, whose clock finds a grid due after step 2
    monkeypatch.setattr(trainer, "process_rank", lambda: 1)
    drawn = run_with_clock(
        "mnist", SMALL_MNIST, tmp_path, capsys, monkeypatch, "--grid-minutes", "2"
    )
    assert [s for s in saves if s[1]] == [(0, 2)]
    assert not [name for name in drawn if "_step" in name]
