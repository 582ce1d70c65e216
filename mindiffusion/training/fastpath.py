"""--fast: the speed knobs that pay on each kind of device, and no knob that slows it.

`python -m mindiffusion.bench` measures each knob alone on the machine it runs on;
the README's Performance part has the tables behind these choices.
"""
import torch
import torch.nn as nn

# the Run flags --fast turns on, by device type; a flag given as well keeps its value
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


def fast_settings(device: torch.device) -> dict:
    """What --fast sets on `device`: a dict of Run fields and their values."""
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
