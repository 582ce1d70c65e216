"""The noise models: their shapes, the 32-pixel rule, and agreement with the notes."""

import pytest
import torch

from mindiffusion.unet import NaiveUnet
import notes_code
from train_mnist import DummyEpsModel


@pytest.mark.parametrize("size, batch", [(32, 2), (128, 1)])
def test_naive_unet_keeps_the_image_shape(size, batch):
    model = NaiveUnet(3, 3, n_feat=128)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        # a timestep tensor of shape (B,), as in training, or (B, 1), as in sampling
        assert model(x, torch.rand(batch)).shape == (batch, 3, size, size)
        assert model(x, torch.rand(batch, 1)).shape == (batch, 3, size, size)


def test_dummy_eps_model_keeps_the_mnist_shape():
    model = DummyEpsModel(1)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28), torch.rand(2)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("height, width", [(28, 28), (32, 48), (100, 128)])
def test_naive_unet_names_the_size_rule(height, width):
    model = NaiveUnet(1, 1, n_feat=8)
    with pytest.raises(ValueError, match=rf"multiples of 32.*{height}x{width}"):
        model(torch.randn(1, 1, height, width), torch.rand(1))


def test_naive_unet_accepts_non_square_multiples_of_32():
    model = NaiveUnet(1, 1, n_feat=8)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 64), torch.rand(1)).shape == (1, 1, 32, 64)


@pytest.mark.parametrize("n_feat", [16, 128])
def test_a_state_dict_of_the_notes_naive_unet_loads_and_agrees(n_feat):
    torch.manual_seed(0)
    theirs = notes_code.NaiveUnet(3, 3, n_feat=n_feat)
    ours = NaiveUnet(3, 3, n_feat=n_feat)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2, 1)
    with torch.no_grad():
        assert torch.equal(ours(x, t), theirs(x, t))


def test_a_state_dict_of_the_notes_dummy_eps_model_loads_and_agrees():
    torch.manual_seed(0)
    theirs = notes_code.NotesDummyEpsModel(1)
    ours = DummyEpsModel(1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        # the timestep is ignored: any t gives the notes' output
        assert torch.equal(ours(x, torch.rand(2)), theirs(x, None))
