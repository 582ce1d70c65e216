"""torchrun: one process per device, rank 0 the one that speaks and writes.

A plain run is rank 0 of 1, and every function here is then a no-op or its trivial
case, so the scripts read the same either way.
"""
import builtins
import functools
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import tqdm
from torch.nn.parallel import DistributedDataParallel

from mindiffusion.training.errors import UserError

# under torchrun, a gloo group in which the ranks wait for rank 0 without a time limit
patient_group = None


def process_rank() -> int:
    """This process's rank: torchrun sets RANK; a plain run is rank 0."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes: torchrun's WORLD_SIZE, or 1."""
    return dist.get_world_size() if dist.is_initialized() else 1


def say(message: str) -> None:
    """Print a line once: under torchrun only rank 0 speaks."""
    if process_rank() == 0:
        print(message)


def init_processes(device: torch.device) -> torch.device:
    """The device this process trains on; under torchrun, join the process group.

    Under torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE, each process takes the
    GPU of its local rank (nccl), or stays on the CPU (gloo), and ranks above 0 stay
    quiet: their print() and progress bars print nothing, as DeiT's
    setup_for_distributed does, so the scripts print as a plain run does.
    """
    if "LOCAL_RANK" not in os.environ:
        return device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        n_gpus = torch.cuda.device_count()
        if local_rank >= n_gpus:
            raise UserError(
                f"torchrun started more processes on this machine than its {n_gpus} "
                f"GPU(s): use --nproc_per_node={n_gpus}"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun runs on CUDA GPUs or on the CPU, not on {device}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    global patient_group
    # a year: longer than any grid takes to draw, and torchrun ends the group anyway
    # when a process dies
    patient_group = dist.new_group(backend="gloo", timeout=timedelta(days=365))
    if process_rank() > 0:
        builtins.print = functools.partial(builtins.print, file=open(os.devnull, "w"))
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
    return device


def gather(value) -> list:
    """`value` from every rank, in rank order; a plain run's is a list of one.

    The ranks meet in the patient group: while rank 0 draws a grid, which can take
    longer than the process group's 30 minutes (a 1000-step MNIST grid takes 48 on a
    CPU), the other ranks wait here without a time limit.
    """
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value, group=patient_group)
    return values


def largest(value: int) -> int:
    """The largest of every rank's `value`, such as a stop signal one rank received."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(value)
    dist.all_reduce(tensor, dist.ReduceOp.MAX, group=patient_group)
    return int(tensor)


def shared_seed(seed: int | None) -> int:
    """`seed`, or if there is none a random one; under torchrun, rank 0's on all."""
    if seed is not None:
        return seed
    drawn = torch.randint(2**62, ())
    if dist.is_initialized():
        dist.broadcast(drawn, src=0, group=patient_group)
    return int(drawn)


def distribute(ddpm: nn.Module, device: torch.device) -> nn.Module:
    """Under torchrun, ddpm inside DistributedDataParallel; otherwise ddpm itself.

    DDP starts every rank from rank 0's weights and averages the gradients of all
    ranks during backward, so every rank takes the same optimizer step. On GPUs,
    BatchNorm becomes SyncBatchNorm, which normalises over the global batch as one
    GPU would; torch's SyncBatchNorm runs on GPUs only, so CPU ranks keep BatchNorm
    and normalise their own share of the batch.
    """
    if not dist.is_initialized():
        return ddpm
    if device.type == "cuda":
        # in place, on the same parameters and buffers: the optimizer keeps them
        ddpm = nn.SyncBatchNorm.convert_sync_batchnorm(ddpm)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(ddpm, device_ids=device_ids)


def split_batch(batch_size: int) -> int:
    """Each rank's share of the global batch, so N ranks take the steps of one."""
    n = world_size()
    if batch_size % n:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly across "
            f"{n} processes: give a multiple of {n}"
        )
    return batch_size // n
