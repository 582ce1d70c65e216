"""The device a run trains on, the number format --amp gives its forward pass, and
the CPU cores its DataLoader workers may take."""
import os

import torch

from mindiffusion.training.distributed import say
from mindiffusion.training.errors import UserError

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
