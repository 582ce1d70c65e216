"""python -m mindiffusion.bench: its timings against models whose cost is known, and
its table and JSON on a small stand-in for the three setups."""

import json
import time

import pytest
import torch
import torch.nn as nn

from mindiffusion import bench
from mindiffusion.ddpm import DDPM
from mindiffusion.unet import NaiveUnet

WARMUP_S, STEP_S = 0.3, 0.05


class SleepyEps(nn.Module):
    """A noise model whose first call takes WARMUP_S and each later call STEP_S, as a
    compiled model's first call does."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = 0

    def forward(self, x, t):
        time.sleep(WARMUP_S if self.calls == 0 else STEP_S)
        self.calls += 1
        return x * self.scale


def test_training_throughput_counts_images_per_second_after_warm_up():
    ddpm = DDPM(SleepyEps(), bench.BETAS, n_T=10)
    img_per_s = bench.train_throughput(
        ddpm, torch.zeros(4, 1, 2, 2), steps=3, warmup=1, amp=False
    )
    assert ddpm.eps_model.calls == 4
    # 4 images per STEP_S, slowed a little by the rest of each step
    assert 0.8 * 4 / STEP_S < img_per_s <= 4 / STEP_S


def test_sampling_step_time_is_seconds_per_step_after_warm_up():
    eps_model = SleepyEps()
    step_s = bench.sampling_step_time(
        eps_model, 2, (1, 2, 2), steps=3, warmup=1, device=torch.device("cpu")
    )
    assert eps_model.calls == 4
    assert STEP_S <= step_s < 1.25 * STEP_S


def tiny():
    return NaiveUnet(1, 1, n_feat=8)


def test_quick_run_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        bench,
        "SETUPS",
        [("tiny A", tiny, (1, 32, 32), 64, 16), ("tiny B", tiny, (1, 32, 64), 32, 8)],
    )
    bench.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "b.json")])
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert report["fast_path"]["channels_last"] is True
    rows = report["rows"]
    assert [(r["setup"], r["path"]) for r in rows] == [
        ("tiny A", "default"),
        ("tiny A", "fast"),
        ("tiny B", "default"),
        ("tiny B", "fast"),
    ]
    for row in rows:
        # --quick: batches of 2 and grids of 2, whatever the setup's own sizes
        assert row["batch_size"] == row["n_sample"] == 2
        assert row["train_img_per_s"] > 0 and row["sample_step_s"] > 0
        assert row["peak_mib"] is None
    table = capsys.readouterr().out
    for row in rows:
        assert f"{row['train_img_per_s']:.2f}" in table
    ratio = rows[1]["train_img_per_s"] / rows[0]["train_img_per_s"]
    assert f"{ratio:.2f}x" in table


def test_an_unwritable_json_file_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SETUPS", [("tiny", tiny, (1, 32, 32), 64, 16)])
    folder = tmp_path / "out"
    folder.mkdir()

    def measure_then_lose_the_folder(setup, path, device, quick, fast):
        # the folder was there at the start, and is gone when the numbers are
        if folder.exists():
            folder.rmdir()
        return dict(setup=setup[0], path=path, batch_size=2, n_sample=2,
                    train_img_per_s=1.0, sample_step_s=1.0, peak_mib=None)

    monkeypatch.setattr(bench, "measure", measure_then_lose_the_folder)
    path = folder / "b.json"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--quick", "--json", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"could not write {path}: No such file or directory\n"


def test_an_existing_or_folderless_json_is_refused_before_measuring(
    tmp_path, monkeypatch, capsys
):
    def measure(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(bench, "measure", measure)
    existing = tmp_path / "b.json"
    existing.write_text("earlier numbers")
    missing = tmp_path / "no" / "such" / "b.json"
    for path, sentence in (
        (existing, f"--json {existing} already exists: choose another file"),
        (missing, f"--json {missing}: its folder does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--device", "cpu", "--quick", "--json", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f"python -m mindiffusion.bench: error: {sentence}\n")
    assert existing.read_text() == "earlier numbers"


def test_only_picks_setups_by_the_start_of_their_name(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        bench,
        "SETUPS",
        [("Tiny A", tiny, (1, 32, 32), 64, 16), ("Tiny B", tiny, (1, 32, 64), 32, 8)],
    )
    argv = ["--device", "cpu", "--quick", "--json", str(tmp_path / "b.json")]
    bench.main(argv + ["--only", "tiny b"])
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [row["setup"] for row in rows] == ["Tiny B", "Tiny B"]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + ["--only", "cifar"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --only cifar: no setup's name starts so\n"
    )
