"""Where a run computes: the device and its fallbacks, torchrun's processes (rank 0
the one that speaks and writes), the number format --amp gives the forward pass, and
what --fast turns on.

A plain run is rank 0 of 1, and every torchrun function here is then a no-op or its
trivial case, so the scripts read the same either way. `python -m mindiffusion.bench`
measures each speed knob alone on the machine it runs on; docs/performance.md has
the tables behind --fast's choices.
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

from mindiffusion.training.flags import UserError

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


DEVICES = "use cpu, cuda, cuda:N or mps"


def resolve_device(name: str) -> torch.device:
    """The device to train on: `name`, or the nearest one this machine has.

    A CUDA device falls back to MPS or the CPU when there is no CUDA, and a CUDA index
    this machine lacks falls back to cuda:0, each with one printed line.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: {DEVICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fallback = "mps" if torch.backends.mps.is_available() else "cpu"
            say(f"CUDA is not available here: using {fallback} instead of {name}")
            return torch.device(fallback)
        n_gpus = torch.cuda.device_count()
        if device.index is not None and device.index >= n_gpus:
            say(f"{name} does not exist ({n_gpus} GPU(s) here): using cuda:0 instead")
            return torch.device("cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            say(f"MPS is not available here: using cpu instead of {name}")
            return torch.device("cpu")
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}: {DEVICES}")
    return device


def cuda_of(device: torch.device) -> list[torch.device]:
    """The CUDA devices whose generators a fork of the random state takes: the
    device itself on CUDA, none elsewhere."""
    return [device] if device.type == "cuda" else []


def usable_cpus() -> int:
    """The CPU cores this process may run on, which a SLURM job or a container may
    hold to fewer than the machine has; the machine's where the system cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively; if not, say so in one line.

    Elsewhere autocast still runs, but emulated: on this repository's AVX2 test CPU,
    NaiveUnet trained 10 times slower in bfloat16 than in float32 (README).
    """
    if device.type == "cuda":
        # bfloat16 tensor cores came with Ampere, compute capability 8.0
        native = torch.cuda.get_device_capability(device)[0] >= 8
        where = f"this GPU ({torch.cuda.get_device_name(device)})"
    elif device.type == "cpu":
        # oneDNN runs bfloat16 convolutions only on CPUs with AVX-512 or AMX
        native = (
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
        where = "this CPU"
    else:
        say(f"--amp: bfloat16 autocast is for CUDA and CPUs; {device} stays in float32")
        return False
    if not native:
        say(f"--amp: {where} has no native bfloat16, so training stays in float32")
    return native


def autocast_dtype(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype that --amp autocasts the training forward pass to; None: float32.

    auto takes bfloat16 where the device computes it natively, and float16 (with a
    GradScaler) on CUDA GPUs of compute capability 7.x, such as the T4 and the V100,
    which have float16 tensor cores but no bfloat16; elsewhere it stays in float32
    and says so. bf16 and fp16 force their dtype anywhere.
    """
    if amp in (None, "bf16", "fp16"):
        return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 7:
        return torch.float16
    return torch.bfloat16 if has_native_bf16(device) else None


# the flags --fast turns on, by device type; a flag given as well keeps its value
FAST_PATHS = {
    # bfloat16 autocast (float16 on GPUs without it), compiled: without compile each
    # GroupNorm casts to float32 and back, and an H200 trained slower in bfloat16
    # than in float32; no channels_last, whose GroupNorm kernels are slow on CUDA
    "cuda": dict(amp="auto", compile=True),
    # compiled, and in bfloat16 where the CPU has it natively (AVX-512 or AMX):
    # together 2.1 to 3.1 times the default on a 2-core AVX-512 and AMX CPU, for
    # all four setups; elsewhere --amp auto stays in float32, for emulated bfloat16
    # was 10 times slower on an AVX2 CPU; no channels_last, which paid alone on
    # --laptop's small model only
    "cpu": dict(amp="auto", compile=True),
    # nothing measured yet: torch.compile is experimental on MPS
    "mps": dict(),
}


def precision_of(dtype: torch.dtype | None) -> str:
    """The precision a run trains in, as autocast_dtype gave it, in words."""
    if dtype is None:
        return "float32"
    scaled = " with loss scaling" if dtype == torch.float16 else ""
    return f"{dtype}".removeprefix("torch.") + f" autocast{scaled} (--amp)"


def fast_settings(device: torch.device) -> dict:
    """What --fast sets on `device`: a dict of settings and their values."""
    return dict(FAST_PATHS[device.type])


def sampling_mode(device: torch.device) -> str:
    """torch.compile's mode for a sampler's many calls of one shape on `device`: on
    CUDA "reduce-overhead", CUDA graphs, which replay a call's kernels for the cost
    of one launch."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_for_sampling(eps_model: nn.Module, device: torch.device) -> None:
    """Compile eps_model's forward in place, in sampling_mode(device). The module's
    hooks stay outside the compiled forward, so that progress bars and snapshots
    still see every call."""
    eps_model.forward = torch.compile(eps_model.forward, mode=sampling_mode(device))
