"""Run a training script under torchrun, and keep what each rank ends with.

    torchrun --nproc_per_node=2 tests/ddp_worker.py train_cifar10 [the script's flags]

Each rank writes OUT/rank{r}.pt (OUT is --out): its weights after training, the size
of each batch it trained on, and its random generator's state at its first step.
"""

import functools
import importlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindiffusion import cli  # noqa: E402
from mindiffusion.ddpm import DDPM  # noqa: E402


def main() -> None:
    script, *flags = sys.argv[1:]
    train = getattr(importlib.import_module(script), script)
    batch_sizes, first_rng = [], []
    forward = DDPM.forward

    def recording_forward(self, x):
        if not first_rng:
            first_rng.append(torch.get_rng_state())
        batch_sizes.append(len(x))
        return forward(self, x)

    DDPM.forward = recording_forward

    @functools.wraps(train)
    def train_and_keep(**settings):
        ddpm = train(**settings)
        kept = dict(model=ddpm.state_dict(), batch_sizes=batch_sizes, rng=first_rng[0])
        torch.save(kept, os.path.join(settings["out"], f"rank{dist.get_rank()}.pt"))

    cli.main(train_and_keep, "", flags)


if __name__ == "__main__":
    main()
