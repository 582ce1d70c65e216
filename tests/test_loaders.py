"""Each script's real dataset loader, on a few images written in the dataset's own
on-disk format. The model is swapped for a cheap stand-in: the data is under test."""

import os
import pickle

from PIL import Image
import pytest
import torch
import torchvision.datasets.cifar
from torchvision import transforms

from conftest import cheap_ddpm, grid_tiles, write_idx
from mindiffusion.train import train
from mindiffusion.training.data import FakeImages

# one epoch in batches of 4 on the CPU, with a single diffusion step
SMALL_RUN = dict(n_epoch=1, device="cpu", batch_size=4, n_T=1, num_workers=0)


@pytest.fixture
def seen_batches(monkeypatch):
    """Record the batches that training sees, and skip the expensive model."""
    batches = []
    cheap_ddpm(monkeypatch, on_forward=lambda ddpm, x: batches.append(x.clone()))
    return batches


def test_mnist_reads_idx_files(tmp_path, seen_batches):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8, generator=g)
    write_idx(raw / "train-images-idx3-ubyte", images)
    write_idx(raw / "train-labels-idx1-ubyte", torch.arange(6, dtype=torch.uint8))
    write_idx(raw / "t10k-images-idx3-ubyte", images[:2])
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.arange(2, dtype=torch.uint8))

    train("mnist", data_root=str(tmp_path), out=str(tmp_path / "out"), **SMALL_RUN)

    x = torch.cat(seen_batches)
    assert x.shape == (6, 1, 28, 28)
    # Normalize((0.5,), (1.0,)) maps a byte v to v / 255 - 0.5
    assert x.min() >= -0.5 and x.max() <= 0.5
    pixels = ((x + 0.5) * 255).round().to(torch.uint8)[:, 0]
    assert sorted(map(bytes, pixels.numpy())) == sorted(map(bytes, images.numpy()))
    assert (tmp_path / "out" / "ddpm_sample_0.png").exists()


def test_cifar10_reads_python_batches(tmp_path, monkeypatch, seen_batches):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    # 10 images, rows of 3072 bytes: the red plane, then green, then blue
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g)
    for k in range(5):
        batch = {
            "data": images[2 * k : 2 * k + 2].reshape(2, 3072).numpy(),
            "labels": [k, k],
        }
        (folder / f"data_batch_{k + 1}").write_bytes(pickle.dumps(batch))
    test = {"data": images[:1].reshape(1, 3072).numpy(), "labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    # torchvision insists on the real files' checksums; keep its check that they exist
    monkeypatch.setattr(
        torchvision.datasets.cifar,
        "check_integrity",
        lambda path, md5=None: os.path.isfile(path),
    )

    train("cifar10", data_root=str(tmp_path), out=str(tmp_path / "out"), **SMALL_RUN)

    x = torch.cat(seen_batches)
    assert x.shape == (10, 3, 32, 32)
    # Normalize(0.5, 0.5) maps a byte v to 2 v / 255 - 1
    pixels = ((x + 1) / 2 * 255).round().to(torch.uint8)
    written = sorted(map(bytes, images.numpy()))
    assert sorted(map(bytes, pixels.numpy())) == written
    # beside the 8 samples, the last batch's images, as the script draws them: the
    # 2 that the last batch of 10 in 4s holds
    tiles = grid_tiles(tmp_path / "out" / "ddpm_sample_cifar0.png", 32)
    last = ((seen_batches[-1] + 1) / 2 * 255).round().to(torch.uint8)
    assert [bytes(tile.numpy()) for tile in tiles[8:10]] == list(
        map(bytes, last.numpy())
    )
    assert all(bytes(tile.numpy()) in written for tile in tiles[8:10])


def test_celeba_reads_an_image_folder(tmp_path, seen_batches):
    faces = tmp_path / "celeba" / "img_align_celeba"
    faces.mkdir(parents=True)
    # flat colours survive JPEG and resizing almost unchanged, and tell the files apart
    colours = [(40 * k, 250 - 40 * k, 60 + 30 * k) for k in range(5)]
    for k, colour in enumerate(colours):
        Image.new("RGB", (178, 218), colour).save(faces / f"{k + 1:06d}.jpg")

    root = str(tmp_path / "celeba")
    train("celeba", data_root=root, out=str(tmp_path / "out"), **SMALL_RUN)

    def colour_of(image):
        return [round(v) for v in image.float().mean(dim=(1, 2)).tolist()]

    def is_written(rgb):
        return any(max(abs(a - b) for a, b in zip(rgb, c)) <= 3 for c in colours)

    x = torch.cat(seen_batches)
    assert x.shape == (5, 3, 128, 128)
    pixels = (x + 1) / 2 * 255
    assert all(is_written(colour_of(image)) for image in pixels)
    tiles = grid_tiles(tmp_path / "out" / "ddpm_sample_celeba000.png", 128)
    # beside the 8 samples, the last batch's one face, as the script draws it
    assert is_written(colour_of(tiles[8]))
    assert not any(tile.any() for tile in tiles[9:])


@pytest.mark.parametrize("image_size", [(1, 28, 28), (3, 218, 178)])
def test_fake_images_are_fixed_bytes_that_leave_the_training_noise_alone(image_size):
    torch.manual_seed(0)
    noise = torch.rand(3)
    torch.manual_seed(0)
    fake = FakeImages(5, image_size, transform=transforms.PILToTensor())
    # the global generator is where the training noise comes from
    assert torch.equal(torch.rand(3), noise)
    again = FakeImages(5, image_size)
    for index in range(len(fake)):
        image, label = fake[index]
        assert image.dtype == torch.uint8 and tuple(image.shape) == image_size
        # the same pixels through PIL, and the same label, every time
        assert torch.equal(image.permute(1, 2, 0), fake.images[index])
        assert torch.equal(transforms.PILToTensor()(again[index][0]), image)
        assert label == again[index][1] and 0 <= label < 10
    assert len({label for _, label in (fake[j] for j in range(5))}) > 1
