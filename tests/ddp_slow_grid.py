"""Run a training script under torchrun with a process group that gives up after
4 seconds, and a first grid that takes 8 to draw.

    torchrun --nproc_per_node=2 tests/ddp_slow_grid.py train_cifar10 [flags]
"""

import functools
import importlib
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindiffusion import cli  # noqa: E402
from mindiffusion.ddpm import DDPM  # noqa: E402


def main() -> None:
    script, *flags = sys.argv[1:]
    train = getattr(importlib.import_module(script), script)
    dist.init_process_group = functools.partial(
        dist.init_process_group, timeout=timedelta(seconds=4)
    )
    grids = []

    def slow_sample(self, n_sample, size, device):
        if not grids:
            time.sleep(8)
        grids.append(size)
        return torch.zeros(n_sample, *size)

    DDPM.sample = slow_sample
    cli.main(train, "", flags)


if __name__ == "__main__":
    main()
