import signal
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# the training scripts live at the top of the repository, beside mindiffusion/
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindiffusion import train  # noqa: E402
from mindiffusion.ddpm import DDPM  # noqa: E402
from mindiffusion.training import recipes  # noqa: E402
from mindiffusion.training.grids import ZeroEps  # noqa: E402
from mindiffusion.unet import NaiveUnet  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda(reason): needs a CUDA GPU; skipped for `reason` without one"
    )


def pytest_collection_modifyitems(config, items):
    gpu_first(items, torch.cuda.is_available())


def gpu_first(items: list, cuda: bool) -> None:
    """Where there is a CUDA GPU (`cuda`), put the tests marked gpu first, so that
    a run under a time limit reaches them before the suite's slow compiles; where
    there is none, skip them, each with its reason."""
    gpu = [item for item in items if item.get_closest_marker("cuda")]
    if cuda:
        items[:] = gpu + [item for item in items if item not in gpu]
        return
    for item in gpu:
        reason = item.get_closest_marker("cuda").kwargs["reason"]
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def started_early(request, tmp_path_factory):
    """Start the processes of the test modules that have start_early(factory), as
    the session begins, so that they overlap with the in-process tests: most of
    such a process is torch starting up and computing on one of the two cores
    that the in-process tests mostly leave one of. Each returns its processes,
    which are killed at the end if they still run."""
    modules = {item.module for item in request.session.items}
    processes = []
    for module in sorted(modules, key=lambda m: m.__name__):
        if hasattr(module, "start_early"):
            processes += module.start_early(tmp_path_factory)
    yield
    for process in processes:
        process.kill()


# proxies at a closed local port, with no exceptions: every download fails at once
OFFLINE = {
    **{name: "http://127.0.0.1:9"
       for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")},
    "no_proxy": "",
    "NO_PROXY": "",
}


@pytest.fixture
def no_network(monkeypatch):
    """Send every download to a closed local port, so that it fails at once."""
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


def run_script(dataset, argv, capsys):
    """Run the trainer on `dataset` through its command line; return (exit code,
    stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main([dataset, *argv])
    return exit_info.value.code, capsys.readouterr().err


def cheap_ddpm(patch, on_forward=None, on_sample=None, moving=False):
    """Swap DDPM's costly calls for cheap stand-ins while `patch` lasts, and
    CIFAR-10's and CelebA's NaiveUnet for narrow ones (narrow_unets).

    The training loss reaches every parameter, so the optimizer still steps; it is
    zero, or with `moving` the sum of the weights, whose gradient 1 makes each step
    move every weight. The samples are zeros. on_forward(ddpm, x) and
    on_sample(ddpm, size) see each call.
    """

    def forward(self, x, c=None):
        if on_forward is not None:
            on_forward(self, x)
        return sum(p.sum() for p in self.parameters()) * float(moving)

    def sample(self, n_sample, size, device, c=None, guide_w=0.0):
        # the walk of the sampler's draws before a grid is not the grid
        if on_sample is not None and not isinstance(self.eps_model, ZeroEps):
            on_sample(self, size)
        return torch.zeros(n_sample, *size, device=device)

    patch.setattr(DDPM, "forward", forward)
    patch.setattr(DDPM, "sample", sample)
    narrow_unets(patch)


def grid_tiles(path, tile):
    """The tiles of a make_grid PNG, row by row, as uint8 tensors (C, tile, tile)."""
    grid = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)
    step = tile + 2
    rows, columns = (grid.shape[1] - 2) // step, (grid.shape[2] - 2) // step
    return [
        grid[:, 2 + r * step : 2 + r * step + tile, 2 + c * step : 2 + c * step + tile]
        for r in range(rows)
        for c in range(columns)
    ]


def narrow_unets(patch, width=8):
    """CIFAR-10's and CelebA's NaiveUnet at `width` while `patch` lasts, in the
    trainer and in the scripts: their own lines, with a checkpoint a few hundred
    times smaller. MNIST's keeps the width it is given."""
    import train_celeba
    import train_cifar10

    def narrow(in_channels, out_channels, n_feat=128, n_classes=None):
        n_feat = width if in_channels == 3 else n_feat
        return NaiveUnet(in_channels, out_channels, n_feat, n_classes)

    for module in (train_cifar10, train_celeba, recipes):
        patch.setattr(module, "NaiveUnet", narrow)


@pytest.fixture
def stand_in(monkeypatch):
    """A cheap loss and sampler that still depend on the batch, the random numbers
    and the weights, so that any slip in the order or the state shows in the end;
    CIFAR-10's and CelebA's NaiveUnet are 8 wide.

    Setting plan["signal"] = (k, signum) raises signum during the k-th call from then,
    and plan["grid_signals"] = [signum, ...] raises each during the next grid.
    """
    plan = {"signal": (0, 0), "grid_signals": []}

    def forward(self, x, c=None):
        k, signum = plan["signal"]
        plan["signal"] = (k - 1, signum)
        if k == 1:
            signal.raise_signal(signum)
        weights = sum(p.sum() for p in self.parameters())
        return (x.mean() + torch.rand(())) * weights * 1e-3

    def sample(self, n_sample, size, device, c=None, guide_w=0.0):
        x = torch.randn(n_sample, *size)
        # the walk of the sampler's draws before a grid is not the grid
        if not isinstance(self.eps_model, ZeroEps):
            while plan["grid_signals"]:
                signal.raise_signal(plan["grid_signals"].pop(0))
        return x

    monkeypatch.setattr(DDPM, "forward", forward)
    monkeypatch.setattr(DDPM, "sample", sample)
    narrow_unets(monkeypatch)
    return plan


def write_idx(path, array):
    """An IDX file as MNIST ships it: magic 0x08 (unsigned byte) and the dimensions."""
    header = struct.pack(">I", 0x0800 | array.dim())
    header += b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def write_digits(root, n):
    """n random 28x28 digits in torchvision's MNIST layout, as its files hold them,
    for training and for testing alike."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n).byte() % 10)


def write_faces(root, n):
    """n flat-coloured 178x218 JPEGs, CelebA's size, one folder down."""
    faces = Path(root) / "img_align_celeba"
    faces.mkdir(parents=True)
    for k in range(n):
        colour = (20 * k, 200 - 15 * k, 40 + 10 * k)
        Image.new("RGB", (178, 218), colour).save(faces / f"{k + 1:06d}.jpg")
