"""The noise models: their shapes, the 32-pixel rule, and agreement with the notes."""

import pytest
import torch

from mindiffusion.unet import NaiveUnet
import notes_code
import mindiffusion.train as trainer
from mindiffusion.dummy import DummyEpsModel


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


def test_a_conditional_unet_hears_both_the_timestep_and_the_class():
    torch.manual_seed(0)
    model = NaiveUnet(1, 1, n_feat=8, n_classes=10).eval()
    x, threes = torch.randn(2, 1, 32, 32), torch.tensor([3, 3])
    with torch.no_grad():
        early, late = (model(x, torch.full((2, 1), t), threes) for t in (0.1, 0.9))
        sevens = model(x, torch.full((2, 1), 0.1), torch.tensor([7, 7]))
    # the class embedding adds to the time embedding, and replaces neither
    assert not torch.allclose(early, late)
    assert not torch.allclose(early, sevens)


def test_train_mnist_draws_its_grid_with_batchnorm_in_eval_mode(tmp_path, monkeypatch):
    # the notes' ddpm.eval() before sampling: BatchNorm then uses, and leaves as they
    # are, its running statistics; a stand-in forward records the mode of each call
    modes = []

    def recording_forward(self, x, t, c=None):
        sampling = torch.is_inference_mode_enabled()
        modes.append((sampling, self.training, self.conv[1][1].training))
        return x * self.conv[-1].weight.sum()

    monkeypatch.setattr(DummyEpsModel, "forward", recording_forward)
    trainer.train(
        "mnist", n_epoch=1, device="cpu", batch_size=2, n_T=2, fake_data=4,
        num_workers=0, out=str(tmp_path),
    )
    assert {mode for mode in modes if not mode[0]} == {(False, True, True)}
    assert {mode for mode in modes if mode[0]} == {(True, False, False)}


def test_naive_unet_cannot_see_the_scale_of_its_input():
    # the reason the sampling page gives for eta 0's static: the first layer's
    # GroupNorm divides out the input's scale, which only the first convolution's
    # biases could carry past it, where they differ within a group of channels
    model = NaiveUnet(1, 1, n_feat=16).eval()
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32), torch.rand(2, 1)
    with torch.no_grad():
        model.init_conv.main[0].bias.zero_()
        assert torch.allclose(model(3 * x, t), model(x, t), atol=1e-4)
        model.init_conv.main[0].bias.copy_(torch.linspace(-1, 1, 16))
        assert not torch.allclose(model(3 * x, t), model(x, t), atol=1e-4)
