"""Windows, Macs and MPS, by patching the platform: the scripts run without SIGUSR1
and without a folder fsync, --laptop takes MPS where there is one, and FID's
float64 sums are made on the CPU. And this suite's own tests that need a GPU."""
import errno
import importlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, gpu_first, narrow_unets
from mindiffusion.frechet import Moments
from mindiffusion.training import files, signals
import mindiffusion.train as trainer

TINY = dict(device="cpu", batch_size=2, n_T=2, fake_data=4, num_workers=0, seed=0)


@pytest.fixture
def windows(monkeypatch):
    """The platform as Windows has it: no SIGUSR1, and a folder that cannot be
    opened as a file."""
    # the module as it is, so that its classes, such as Stopped, come back as the
    # same objects that other modules imported
    module = dict(vars(signals))
    monkeypatch.delattr(signal, "SIGUSR1")
    importlib.reload(signals)
    real_open = os.open

    def open_as_windows(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", open_as_windows)
    yield
    monkeypatch.undo()
    vars(signals).update(module)


def test_on_windows_the_stop_signals_are_sigterm_and_sigint(windows):
    assert signals.STOP_SIGNALS == (signal.SIGTERM, signal.SIGINT)


def test_on_windows_a_run_trains_and_saves_without_the_folder_fsync(
    windows, tmp_path, monkeypatch
):
    narrow_unets(monkeypatch)
    trainer.train("cifar10", n_epoch=1, out=str(tmp_path), **TINY)
    state = torch.load(tmp_path / "ddpm_cifar.pth", weights_only=True)
    assert state["epoch"] == 1
    assert (tmp_path / "ddpm_sample_cifar0.png").exists()


def test_a_failing_fsync_is_still_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        files.write_atomically(str(tmp_path / "file"), b"data")
    assert not list(tmp_path.iterdir())


def test_laptop_takes_mps_where_there_is_one():
    # one process for both cases: the preset is read when the recipes are
    # imported; is_available is patched with a cached function, as torch's own is
    code = (
        "import functools, importlib, torch\n"
        "for mps in (True, False):\n"
        "    torch.backends.mps.is_available = functools.cache(lambda: mps)\n"
        "    from mindiffusion.training import recipes\n"
        "    importlib.reload(recipes)\n"
        "    print(recipes.LAPTOP['device'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
        check=True,
    )
    assert result.stdout.split() == ["mps", "cpu"]


class OnMps(torch.Tensor):
    """A tensor that acts as one on an MPS device: it has no float64."""

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    def cpu(self):
        return self.as_subclass(torch.Tensor)


def test_fid_sums_its_float64_moments_on_the_cpu():
    features = torch.randn(5, 3, dtype=torch.float64)
    moments = Moments()
    moments.add(features.float().as_subclass(OnMps))
    mu, sigma = moments.statistics()
    torch.testing.assert_close(mu, features.float().double().mean(0))
    torch.testing.assert_close(sigma, torch.cov(features.float().double().T))


class CollectedTest:
    """A collected test as gpu_first sees it: its gpu marker, and the markers added."""

    def __init__(self, reason=None):
        self.gpu = None if reason is None else pytest.mark.cuda(reason=reason).mark
        self.added = []

    def get_closest_marker(self, name):
        return self.gpu if name == "cuda" else None

    def add_marker(self, marker):
        self.added.append(marker.mark)


def test_a_gpu_runs_the_gpu_tests_first_and_elsewhere_they_say_why_they_skip():
    plain, other = CollectedTest(), CollectedTest()
    graphs, waits = CollectedTest("no graphs"), CollectedTest("no wait")
    items = [plain, graphs, other, waits]
    gpu_first(items, cuda=True)
    assert items == [graphs, waits, plain, other]
    assert all(not item.added for item in items)
    items = [plain, graphs, other, waits]
    gpu_first(items, cuda=False)
    assert items == [plain, graphs, other, waits]
    assert plain.added == other.added == []
    assert [(m.name, m.kwargs) for m in graphs.added + waits.added] == [
        ("skip", dict(reason="no graphs")), ("skip", dict(reason="no wait"))
    ]
