"""Run the trainer under torchrun, and keep what each rank ends with.

    torchrun --nproc_per_node=2 tests/ddp_worker.py DATASET [the trainer's flags]

Each rank writes OUT/rank{r}.pt (OUT is --out): its weights after training, the size
of each batch it trained on, and its random generator's state at its first step.
Three variables of the environment change the run:
- PG_TIMEOUT=S: the process group gives up on a collective after S seconds;
- SLOW_GRID=S: the first grid takes S seconds to draw (the grids are zeros);
- SIGTERM_AT=K0,K1: rank r sends itself SIGTERM during its K_r-th training step.
"""

import functools
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindiffusion.train as trainer  # noqa: E402
from mindiffusion.ddpm import DDPM  # noqa: E402
from mindiffusion.training import devices  # noqa: E402


def main() -> None:
    dataset, *flags = sys.argv[1:]
    train = trainer.train
    rank = devices.process_rank()
    batch_sizes, first_rng = [], []
    forward = DDPM.forward
    sigterm_at = os.environ.get("SIGTERM_AT")

    def recording_forward(self, x, c=None):
        if not first_rng:
            first_rng.append(torch.get_rng_state())
        batch_sizes.append(len(x))
        if sigterm_at and len(batch_sizes) == int(sigterm_at.split(",")[rank]):
            signal.raise_signal(signal.SIGTERM)
        return forward(self, x, c)

    DDPM.forward = recording_forward
    if "PG_TIMEOUT" in os.environ:
        timeout = timedelta(seconds=float(os.environ["PG_TIMEOUT"]))
        dist.init_process_group = functools.partial(
            dist.init_process_group, timeout=timeout
        )
    if "SLOW_GRID" in os.environ:
        grids = []

        def slow_sample(self, n_sample, size, device, c=None, guide_w=0.0):
            if not grids:
                time.sleep(float(os.environ["SLOW_GRID"]))
            grids.append(size)
            return torch.zeros(n_sample, *size)

        DDPM.sample = slow_sample

    def train_and_keep(**settings):
        ddpm = train(**settings)
        kept = dict(model=ddpm.state_dict(), batch_sizes=batch_sizes, rng=first_rng[0])
        torch.save(kept, os.path.join(settings["out"], f"rank{rank}.pt"))

    trainer.train = train_and_keep
    trainer.main([dataset, *flags])


if __name__ == "__main__":
    main()
