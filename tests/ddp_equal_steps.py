"""Under torchrun, the gradients DDP averages over two ranks, each with half a batch,
against one process's gradients on the whole batch: the same x_t, t and eps.

    torchrun --nproc_per_node=2 tests/ddp_equal_steps.py OUT

Rank 0 writes OUT: for each noise model, the largest difference between the two,
relative to the largest gradient.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindiffusion.dummy import DummyEpsModel  # noqa: E402
from mindiffusion.training import devices  # noqa: E402
from mindiffusion.unet import NaiveUnet  # noqa: E402


class NoiseLoss(torch.nn.Module):
    """The loss of Algorithm 1 for a given x_t, t and eps, so both runs share them."""

    def __init__(self, eps_model):
        super().__init__()
        self.eps_model = eps_model

    def forward(self, x_t, t, eps):
        return torch.nn.functional.mse_loss(eps, self.eps_model(x_t, t))


def gradients(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    device = devices.init_processes(torch.device("cpu"))
    rank = devices.process_rank()
    half = slice(2 * rank, 2 * rank + 2)
    results = {}
    # NaiveUnet normalises with GroupNorm, DummyEpsModel with BatchNorm
    for name, make_model, side in [
        ("NaiveUnet", lambda: NaiveUnet(1, 1, n_feat=16), 32),
        ("DummyEpsModel", lambda: DummyEpsModel(1), 8),
    ]:
        torch.manual_seed(0)
        x_t, eps = torch.randn(2, 4, 1, side, side)
        t = torch.rand(4, 1)
        loss = NoiseLoss(make_model())
        wrapped = devices.distribute(loss, device)
        wrapped(x_t[half], t[half], eps[half]).backward()
        # one process with the same weights, those DDP gave every rank
        alone = NoiseLoss(make_model())
        alone.load_state_dict(loss.state_dict())
        alone(x_t, t, eps).backward()
        reference = gradients(alone)
        difference = (gradients(loss) - reference).abs().max() / reference.abs().max()
        results[name] = float(difference)
    if rank == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
