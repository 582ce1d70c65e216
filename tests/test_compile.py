"""The fast path's compiled and fused code against the eager code it stands in for:
the noise models compiled, in training and in evaluation, where norms have had
compile-only bugs (pytorch#181696); the sampler compiled, and on a GPU captured in
CUDA graphs; fused Adam against torch's default Adam."""

import copy

import pytest
import torch
import torch.nn as nn

from mindiffusion.ddpm import DDPM
from mindiffusion.training.devices import compile_for_sampling
from mindiffusion.unet import Conv3, NaiveUnet
from mindiffusion.dummy import DummyEpsModel, blk

NO_GPU = "CUDA graphs need a CUDA GPU, and this machine has none"
# whole models through dynamo, AOTAutograd and inductor's decompositions, but not
# inductor's code generation, whose C++ compiles take minutes on a 2-core CPU; in
# float64, for NaiveUnet's GroupNorms of one channel amplify float32's rounding
# into gradients 0.2% apart, while in float64 they agree to 1e-14
WHOLE_MODEL_BACKEND = "aot_eager_decomp_partition"
# float32 sums in another order
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


class TimeScaled(nn.Module):
    """A block of the noise models, called as they are, eps_model(x, t)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.block(x) * t.view(-1, 1, 1, 1)


MODELS = {
    "NaiveUnet": (lambda: NaiveUnet(1, 1, n_feat=8), (1, 32, 32)),
    # convolutions alone: 8x8 images cost a tenth of MNIST's in float64
    "DummyEpsModel": (lambda: DummyEpsModel(1), (1, 8, 8)),
}
# the norms and activations that inductor fuses, as each model has them
BLOCKS = {
    "GroupNorm ReLU": (lambda: TimeScaled(Conv3(8, 8, is_res=True)), (8, 8, 8)),
    "BatchNorm LeakyReLU": (lambda: TimeScaled(blk(1, 8)), (1, 8, 8)),
}


def train_then_evaluate(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list:
    """A training step's loss, gradients and norm statistics, then the output in
    evaluation mode, which BatchNorm computes from those statistics."""
    model.train()
    loss = model(x, t).square().mean()
    loss.backward()
    seen = [loss.detach(), *(p.grad for p in model.parameters())]
    seen += [b.clone() for b in model.buffers()]
    model.eval()
    with torch.no_grad():
        seen.append(model(x, t))
    return seen


def compare_compiled(make, size, dtype, tolerance, **compile_options) -> None:
    torch.manual_seed(0)
    eager = make().to(dtype)
    compiled = copy.deepcopy(eager)
    # as --compile does it: in place, so that the state_dict keeps its names
    compiled.compile(**compile_options)
    x, t = torch.randn(4, *size, dtype=dtype), torch.rand(4, 1, dtype=dtype)
    expected = train_then_evaluate(eager, x, t)
    got = train_then_evaluate(compiled, x, t)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_noise_models_train_and_evaluate_as_eager_ones(name):
    float64 = dict(rtol=1e-9, atol=1e-11)
    # GroupNorm has no running statistics to mishandle: NaiveUnet through dynamo and
    # AOTAutograd alone, which trace it in half the time
    backend = "aot_eager" if name == "NaiveUnet" else WHOLE_MODEL_BACKEND
    compare_compiled(*MODELS[name], torch.float64, float64, backend=backend)


@pytest.mark.parametrize("name", BLOCKS)
def test_inductor_s_fused_norm_kernels_compute_what_eager_ones_do(name):
    compare_compiled(*BLOCKS[name], torch.float32, TOLERANCE)


def sample_before_and_after_compiling(device: torch.device) -> tuple:
    """Samples of a small DDPM, eager and then compiled for sampling, from one seed."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                          nn.Conv2d(8, 2, 3, padding=1))
    ddpm = DDPM(TimeScaled(block), (1e-4, 0.02), n_T=5).to(device).eval()
    samples = []
    for compiled in (False, True):
        if compiled:
            compile_for_sampling(ddpm.eps_model, device)
        torch.manual_seed(1)
        samples.append(ddpm.sample(3, (2, 8, 8), device))
    # the compiler's wrapper, not the module's own forward, took the calls
    assert hasattr(ddpm.eps_model.forward, "_torchdynamo_orig_callable")
    return samples


def test_compiled_sampling_draws_the_eager_samples():
    eager, compiled = sample_before_and_after_compiling(torch.device("cpu"))
    torch.testing.assert_close(compiled, eager, **TOLERANCE)


@pytest.mark.cuda(reason=NO_GPU)
def test_sampling_in_cuda_graphs_draws_the_eager_samples():
    eager, graphed = sample_before_and_after_compiling(torch.device("cuda"))
    torch.testing.assert_close(graphed, eager, **TOLERANCE)


def test_fused_adam_takes_the_steps_of_torch_s_default_adam():
    torch.manual_seed(0)
    model = NaiveUnet(1, 1, n_feat=8)
    fused_model = copy.deepcopy(model)
    default = torch.optim.Adam(model.parameters(), lr=1e-3)
    fused = torch.optim.Adam(fused_model.parameters(), lr=1e-3, fused=True)
    # the notes' Adam is torch's multi-tensor (foreach) implementation, not fused
    assert not default.defaults["fused"]
    # the same gradients for both: Adam turns the float32 noise of gradients that
    # are zero in exact arithmetic, such as a bias's before a GroupNorm, into
    # whole steps of lr, so gradients of two models would drift apart
    for _ in range(3):
        for p, q in zip(model.parameters(), fused_model.parameters(), strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        default.step()
        fused.step()
    for a, b in zip(fused_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, **TOLERANCE)
