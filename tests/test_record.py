"""The record: one CSV row per epoch, and a resume that drops the rows a killed run
wrote past its checkpoint."""

import csv
from types import SimpleNamespace

from conftest import cheap_ddpm, narrow_unets
from mindiffusion.training import files
from mindiffusion.training.files import FIELDS, Record
import mindiffusion.train as trainer


def rows(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_one_row_per_epoch_with_the_mean_loss(tmp_path):
    record = Record(str(tmp_path / "run_log.csv"))
    for epoch, losses in enumerate([[1.0, 2.0, 6.0], [0.5, 1.5]]):
        for loss in losses:
            record.add(loss, images=4)
        record.end_epoch(epoch, lr=1e-4)
    with open(record.path) as file:
        assert file.readline().strip() == ",".join(FIELDS)
    written = rows(record.path)
    assert [(r["epoch"], r["step"], r["loss"], r["lr"]) for r in written] == [
        ("0", "3", "3.0", "0.0001"),
        ("1", "5", "1.0", "0.0001"),
    ]
    assert all(float(r["images_per_s"]) > 0 for r in written)


def test_resume_drops_the_rows_past_the_checkpoint(tmp_path):
    record = Record(str(tmp_path / "run_log.csv"))
    for epoch in range(3):
        record.add(1.0, images=2)
        record.end_epoch(epoch, lr=1e-4)
    # the checkpoint stands in epoch 1: its row and epoch 2's were written by a run
    # that died before saving
    state = dict(steps=1, loss_sum=0.25, batches=1, images=2, seconds=1.0)
    resumed = Record(record.path)
    resumed.resume(state, epoch=1)
    assert [r["epoch"] for r in rows(record.path)] == ["0"]
    resumed.add(0.75, images=2)
    resumed.end_epoch(1, lr=1e-4)
    assert [(r["epoch"], r["step"], r["loss"]) for r in rows(record.path)] == [
        ("0", "1", "1.0"),
        ("1", "2", "0.5"),
    ]


def test_an_epoch_s_time_leaves_out_the_grid_before_it(tmp_path, monkeypatch):
    # the record's clock, which only a grid moves, by an hour: the test asserts which
    # spans the clock measures, whatever the machine's speed or load
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(perf_counter=lambda: clock.now)
    monkeypatch.setattr(files, "time", fake_time)

    def an_hour_long_grid(ddpm, size):
        clock.now += 3600.0

    narrow_unets(monkeypatch)
    cheap_ddpm(monkeypatch, on_sample=an_hour_long_grid)
    trainer.train(
        "cifar10", device="cpu", batch_size=2, n_T=2, fake_data=4, n_epoch=2,
        num_workers=0, out=str(tmp_path),
    )
    written = rows(tmp_path / "ddpm_cifar_log.csv")
    # epoch 0's grid came before epoch 1's first batch, and each epoch's grid after
    # its row was written
    assert clock.now == 2 * 3600.0
    assert [float(row["seconds"]) for row in written] == [0.0, 0.0]
