"""Training and sampling speed of the three setups, default path against fast path.

    python -m mindiffusion.bench --quick          # about a minute on a laptop's CPU
    python -m mindiffusion.bench --device cuda --json bench.json

Run it from the repository's root. Each setup is a model of the notes at its image
size and batch size: the MNIST DummyEpsModel at 28x28, and NaiveUnet at 32x32
(CIFAR-10) and at 128x128 (CelebA). The default path is the notes' float32 run; the
fast path is what --amp --channels-last switch on in the training scripts (and
--compile, when given here). Batches are random tensors already on the device, so
that data loading is left out.
"""
import argparse
import json
import os
import platform
import time

import torch

from mindiffusion.ddpm import DDPM
from mindiffusion.devices import has_native_bf16, resolve_device
from mindiffusion.errors import UserError
from mindiffusion.unet import NaiveUnet
from train_mnist import DummyEpsModel

BETAS = (1e-4, 0.02)
# name, noise model, image shape, the notes' batch size and number of samples per grid
SETUPS = [
    ("MNIST DummyEpsModel 28x28", lambda: DummyEpsModel(1), (1, 28, 28), 128, 16),
    ("CIFAR-10 NaiveUnet 32x32", lambda: NaiveUnet(3, 3, 128), (3, 32, 32), 512, 8),
    ("CelebA NaiveUnet 128x128", lambda: NaiveUnet(3, 3, 128), (3, 128, 128), 32, 8),
]


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, whose kernels run behind the Python that launched them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(
    ddpm: DDPM, x: torch.Tensor, steps: int, warmup: int, amp: bool
) -> float:
    """Images per second of Algorithm 1 training steps on batch x, after `warmup`
    untimed steps (the first steps allocate memory, tune kernels and compile)."""
    optim = torch.optim.Adam(ddpm.parameters(), lr=1e-5)
    ddpm.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(x.device)
            start = time.perf_counter()
        optim.zero_grad()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = ddpm(x)
        loss.backward()
        optim.step()
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def sampling_step_time(
    eps_model: torch.nn.Module, n_sample: int, size, steps: int, warmup: int, device
) -> float:
    """Seconds per step of Algorithm 2 for n_sample images, after `warmup` steps."""
    eps_model.eval()
    DDPM(eps_model, BETAS, n_T=warmup).to(device).sample(n_sample, size, device)
    timed = DDPM(eps_model, BETAS, n_T=steps).to(device)
    synchronize(device)
    start = time.perf_counter()
    timed.sample(n_sample, size, device)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(setup, path: str, device, quick: bool, fast: dict) -> dict:
    """One row of the table: a setup on the default or the fast path."""
    name, make_model, size, batch_size, n_sample = setup
    if quick:
        batch_size, n_sample = 2, 2
    warmup, steps = (1, 2) if quick else (3, 10)
    on_fast_path = path == "fast"
    memory_format = torch.contiguous_format
    if on_fast_path and fast["channels_last"]:
        memory_format = torch.channels_last

    torch.manual_seed(0)
    ddpm = DDPM(make_model(), BETAS, n_T=1000).to(device, memory_format=memory_format)
    if on_fast_path and fast["compile"]:
        ddpm.eps_model.compile()
    x = torch.randn(batch_size, *size, device=device).to(memory_format=memory_format)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    amp = on_fast_path and fast["amp"]
    img_per_s = train_throughput(ddpm, x, steps, warmup, amp)
    step_s = sampling_step_time(ddpm.eps_model, n_sample, size, steps, warmup, device)
    peak_mib = None
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return dict(
        setup=name,
        path=path,
        batch_size=batch_size,
        n_sample=n_sample,
        train_img_per_s=img_per_s,
        sample_step_s=step_s,
        peak_mib=peak_mib,
    )


def table(rows: list[dict]) -> str:
    """The rows as text, each setup's default and fast rows followed by their ratio."""
    header = f"{'setup':<27}{'path':<9}{'batch':>6}{'train img/s':>13}"
    header += f"{'sample step s':>15}{'peak MiB':>10}"
    lines = [header]
    for default, fast in zip(rows[::2], rows[1::2]):
        for row in (default, fast):
            peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
            lines.append(
                f"{row['setup']:<27}{row['path']:<9}{row['batch_size']:>6}"
                f"{row['train_img_per_s']:>13.2f}{row['sample_step_s']:>15.4f}"
                f"{peak:>10}"
            )
        # a speed-up: more images per second, fewer seconds per step
        train_x = fast["train_img_per_s"] / default["train_img_per_s"]
        sample_x = default["sample_step_s"] / fast["sample_step_s"]
        ratios = f"{train_x:>12.2f}x{sample_x:>14.2f}x"
        lines.append(f"{'':<27}{'fast/def':<9}{'':>6}{ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mindiffusion.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", metavar="NAME",
                        help="cpu, cuda, cuda:N or mps; falls back as the training "
                        "scripts do (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="batches of 2 and 2 timed steps, instead of the notes' "
                        "batches and 10 timed steps (default: off)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile to the fast path (default: off)")
    parser.add_argument("--bf16-anyway", action="store_true",
                        help="autocast to bfloat16 on the fast path even where the "
                        "device only emulates it, to see what that costs "
                        "(default: off)")
    parser.add_argument("--only", metavar="NAME",
                        help="measure only the setups whose name starts with NAME: "
                        "mnist, cifar-10 or celeba (default: all three)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the numbers to FILE (default: off)")
    args = parser.parse_args(argv)
    prefix = (args.only or "").lower()
    setups = [setup for setup in SETUPS if setup[0].lower().startswith(prefix)]
    if not setups:
        parser.error(f"--only {args.only}: no setup's name starts so")
    # --json before the measurements, which take minutes
    if args.json and not os.path.isdir(os.path.dirname(args.json) or "."):
        parser.error(f"--json {args.json}: its folder does not exist")
    if args.json and os.path.exists(args.json):
        parser.error(f"--json {args.json} already exists: choose another file")
    try:
        device = resolve_device(args.device)
    except UserError as err:
        parser.error(str(err))

    fast = dict(
        amp=args.bf16_anyway or has_native_bf16(device),
        channels_last=True,
        compile=args.compile,
    )
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        capability = torch.backends.cpu.get_cpu_capability()
        machine = f"{platform.machine()} {capability} CPU, "
        machine += f"{torch.get_num_threads()} threads"
    print(f"{machine}, torch {torch.__version__}; fast path: {fast}")
    rows = []
    for setup in setups:
        for path in ("default", "fast"):
            rows.append(measure(setup, path, device, args.quick, fast))
            print(f"measured {setup[0]}, {path} path", flush=True)
    print(table(rows))
    if args.json:
        report = dict(
            machine=machine,
            device=str(device),
            torch=torch.__version__,
            quick=args.quick,
            fast_path=fast,
            rows=rows,
        )
        try:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        except OSError as err:
            parser.exit(2, f"could not write {args.json}: {err.strerror}\n")


if __name__ == "__main__":
    main()
