"""Training and sampling speed of the notes' setups, with each speed knob alone.

    python -m mindiffusion.bench --device cuda --json bench.json
    python -m mindiffusion.bench --device cpu --quick --knobs default,channels_last

Run it from the repository's root. The setups, in this order: CIFAR-10's NaiveUnet
at 32x32, MNIST's DummyEpsModel at 28x28, CelebA's NaiveUnet at 128x128, and the
small NaiveUnet of train_mnist.py --laptop at 32x32, each at the notes' batch size.

Rows of each setup:
  train  images per second of the bare training step, on random batches already on
         the device: default (the notes' float32, Adam's foreach implementation),
         then each knob alone: bf16, fp16 (with a GradScaler), channels_last,
         compile, fused_adam, tf32 (matmuls; CUDA only); fast, the knobs --fast
         turns on for this device; best, the knobs that each reached 1.03x the
         default alone, together
  sample seconds per step of the sampler on the setup's grid: default (eager),
         compile, cuda_graphs (torch.compile's reduce-overhead mode; CUDA only)
  loop   images per second of the training script itself, run in-process on fake
         data, read off its record's second epoch: loop_default, loop_fast (with
         the --fast flags), loop_ema (loop_default with --ema 0.999); the ratio is
         to the bare step of the same knobs, the cost of the real loop
Each train ratio is to the default; a sample ratio is the default's seconds over
the row's. A knob that fails is a row that says why. The first steps of each row
are not timed: they allocate memory, tune kernels and compile.

The rows come in three passes over the setups, so that a run cut short by a time
limit has measured the fast path of every setup: the default and fast train rows;
the default sample row and the one of `mindiffusion.sample --compile` on the device
(cuda_graphs on CUDA, compile elsewhere); then the rest, setup by setup. At the end
the tables come again, each setup's rows together.
"""
import argparse
import contextlib
import csv
import glob
import inspect
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn

from mindiffusion import signals
from mindiffusion.cli import at_least
from mindiffusion.ddpm import DDPM
from mindiffusion.devices import autocast_dtype, has_native_bf16, resolve_device
from mindiffusion.errors import UserError
from mindiffusion.fastpath import fast_settings, sampling_mode
from mindiffusion.run import run_training
from mindiffusion.unet import NaiveUnet
from train_celeba import train_celeba
from train_cifar10 import train_cifar10
from train_mnist import LAPTOP, DummyEpsModel, train_mnist

BETAS = (1e-4, 0.02)
# the notes' diffusion steps, for the bare step and the scripts' runs alike
N_T = 1000
# a knob joins `best` when it alone trains at least this much faster than the default
BEST_AT_LEAST = 1.03
# the training knobs, each measured alone
TRAIN_KNOBS = ("bf16", "fp16", "channels_last", "compile", "fused_adam", "tf32")
KNOB_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the sampling rows: torch.compile's mode, or None for the eager model
SAMPLE_MODES = {"default": None, "compile": "default", "cuda_graphs": "reduce-overhead"}
# the train rows, in the order of their tables: best takes the knobs that paid alone
TRAIN_ROWS = ("default", *TRAIN_KNOBS, "fast", "best")
# the loop rows: the bare row they are compared with, and their extra Run flags
# (loop_fast's are fast_settings(device))
LOOP_ROWS = {
    "loop_default": ("default", {}),
    "loop_fast": ("fast", None),
    "loop_ema": ("default", {"ema": 0.999}),
}
ROW_NAMES = (*TRAIN_ROWS, "cuda_graphs", *LOOP_ROWS)
# the kinds of row, in the order of their tables
UNITS = {"train": "img/s", "sample": "s/step", "loop": "img/s"}
# knobs that need CUDA, and why
CUDA_ONLY = {
    "tf32": "TF32 is a CUDA tensor-core format",
    "cuda_graphs": "CUDA graphs need a CUDA device",
}


class Setup(NamedTuple):
    """A setup of the notes: its noise model, image shape, batch size, grid size, and
    the training script that trains it, with the settings of the script's preset."""

    name: str
    model: Callable[[], nn.Module]
    size: tuple[int, int, int]
    batch_size: int
    n_sample: int
    script: Callable
    preset: dict


# --laptop's settings, but for its device, which is the bench's, and its precision
# and average, which are each row's own, so that loop_default is the bare default's
LAPTOP_RUN = {k: v for k, v in LAPTOP.items() if k not in ("device", "amp", "ema")}
# the most telling first, so that a run cut short by a time limit has them
SETUPS = [
    Setup("CIFAR-10 NaiveUnet(3,3,128) 32x32", lambda: NaiveUnet(3, 3, 128),
          (3, 32, 32), 512, 8, train_cifar10, {}),
    Setup("MNIST DummyEpsModel(1) 28x28", lambda: DummyEpsModel(1),
          (1, 28, 28), 128, 16, train_mnist, {}),
    Setup("CelebA NaiveUnet(3,3,128) 128x128", lambda: NaiveUnet(3, 3, 128),
          (3, 128, 128), 32, 8, train_celeba, {}),
    Setup("Laptop MNIST NaiveUnet(1,1,24) 32x32",
          lambda: NaiveUnet(1, 1, LAPTOP["n_feat"]), (1, 32, 32),
          LAPTOP["batch_size"], 16, train_mnist, LAPTOP_RUN),
]


class Plan(NamedTuple):
    """What the command line asks for: the rows, their sizes and the device."""

    device: torch.device
    names: frozenset[str]
    batch_size: int | None
    n_sample: int | None
    steps: int
    warmup: int
    # the Run flags of --fast here, and the same as training knobs
    fast_settings: dict
    fast: frozenset[str]


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, whose kernels run behind the Python that launched them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    """While it lasts, float32 matmuls on CUDA in TF32, if `enabled`; cuDNN's
    convolutions already take TF32 by torch's default."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def train_throughput(
    ddpm: DDPM, x: torch.Tensor, steps: int, warmup: int, knobs: frozenset = frozenset()
) -> float:
    """Images per second of Algorithm 1 training steps on batch x, after `warmup`
    untimed steps, with the knobs bf16, fp16 (with loss scaling) and fused_adam."""
    # None, Adam's default, is its foreach implementation
    fused = True if "fused_adam" in knobs else None
    optim = torch.optim.Adam(ddpm.parameters(), lr=1e-5, fused=fused)
    dtype = next((KNOB_DTYPES[k] for k in KNOB_DTYPES if k in knobs), None)
    # float16 needs its loss scaled, so that small gradients do not round to zero;
    # disabled, the scaler passes the loss and the step through
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)
    ddpm.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(x.device)
            start = time.perf_counter()
        optim.zero_grad()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            loss = ddpm(x)
        scaler.scale(loss).backward()
        scaler.step(optim)
        scaler.update()
    synchronize(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def train_speed(
    setup: Setup, knobs: frozenset, device, batch_size: int, steps: int, warmup: int
) -> float:
    """Images per second of the setup's model trained with `knobs` on a random
    batch already on the device, so that data loading is left out."""
    torch.manual_seed(0)
    ddpm = DDPM(setup.model(), BETAS, n_T=N_T).to(device)
    x = torch.randn(batch_size, *setup.size, device=device)
    if "channels_last" in knobs:
        ddpm.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if "compile" in knobs:
        # in place, as the training scripts' --compile does
        ddpm.eps_model.compile()
    with tf32_matmuls("tf32" in knobs):
        return train_throughput(ddpm, x, steps, warmup, knobs)


def sampling_step_time(
    eps_model: nn.Module, n_sample: int, size, steps: int, warmup: int, device
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


def sample_speed(
    setup: Setup, mode: str | None, device, n_sample: int, steps: int, warmup: int
) -> float:
    """Seconds per sampler step of the setup's model, eager (mode None) or compiled
    in torch.compile's `mode`."""
    torch.manual_seed(0)
    eps_model = setup.model().to(device)
    if mode is not None:
        eps_model = torch.compile(eps_model, mode=mode)
    return sampling_step_time(eps_model, n_sample, setup.size, steps, warmup, device)


def loop_settings(
    setup: Setup, flags: dict, device, batch_size: int, steps: int
) -> dict:
    """The settings of a short run of the setup's script: two epochs of `steps`
    steps on fake data, its grid one DDIM step, no saves within an epoch, with the
    script's own number of DataLoader workers and the Run flags `flags`."""
    script_run = inspect.signature(setup.script).parameters["run"].default
    fixed = dict(
        device=str(device), batch_size=batch_size, n_epoch=2, n_T=N_T,
        fake_data=steps * batch_size, grid_every=2, grid_sampler="ddim",
        grid_steps=1, save_every=None,
    )
    return {"num_workers": script_run.num_workers, **setup.preset, **fixed, **flags}


def loop_speed(setup: Setup, settings: dict, out: str) -> float:
    """Images per second of the second epoch of the setup's script run in-process
    with `settings` into the folder `out`, as its record has it: the first epoch
    holds the warm-up and the compiling."""
    run_training(setup.script, **settings, out=out)
    (log,) = glob.glob(os.path.join(out, "*_log.csv"))
    with open(log, newline="") as file:
        epochs = list(csv.DictReader(file))
    return float(epochs[1]["images_per_s"])


def loop_in_temporary_folder(setup: Setup, settings: dict) -> float:
    """loop_speed into a folder of its own, removed after: a new run refuses to
    overwrite a checkpoint."""
    with tempfile.TemporaryDirectory(prefix="bench_") as out:
        return loop_speed(setup, settings, out)


def fast_knobs(settings: dict, device) -> frozenset[str]:
    """The training knobs of fast_settings(device)'s Run flags."""
    dtype = autocast_dtype(settings.get("amp"), device)
    knobs = {name for name, knob in KNOB_DTYPES.items() if knob == dtype}
    knobs |= {name for name in ("compile", "channels_last") if settings.get(name)}
    return frozenset(knobs)


def best_knobs(
    ratios: dict[str, float], fast: frozenset[str]
) -> tuple[frozenset[str], str | None]:
    """The knobs whose ratio alone is at least BEST_AT_LEAST, the faster of bf16 and
    fp16 only, and why the row is not worth measuring (None if it is): no knob, the
    same as fast, or a single knob, already measured alone."""
    good = {name for name, ratio in ratios.items() if ratio >= BEST_AT_LEAST}
    if {"bf16", "fp16"} <= good:
        # one autocast at a time; on a tie bfloat16, which needs no loss scaling
        good.discard("fp16" if ratios["bf16"] >= ratios["fp16"] else "bf16")
    knobs = frozenset(good)
    if not knobs:
        return knobs, f"no knob reached {BEST_AT_LEAST}x the default alone"
    if knobs == fast:
        return knobs, "the same knobs as fast"
    if len(knobs) == 1:
        return knobs, f"{next(iter(knobs))} alone, measured above"
    return knobs, None


def first_line(err: Exception) -> str:
    """The error's kind and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def attempt(measurement: Callable[[], float], device) -> tuple:
    """(value, None, CUDA peak MiB or None) of measurement(), or (None, the error's
    first line, None) if it fails; a stop signal during a run still stops."""
    # each row compiles afresh, as a run of its own would, and never meets the limit
    # on recompilations that sends a model back to eager
    torch.compiler.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        value = measurement()
    except signals.Stopped:
        raise
    except Exception as err:
        return None, first_line(err), None
    peak = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    return value, None, peak


def speedup(kind: str, value: float | None, reference: float | None) -> float | None:
    """How much faster a row is than its reference: more images per second, or
    fewer seconds per sampler step."""
    if value is None or reference is None:
        return None
    return reference / value if kind == "sample" else value / reference


class Report:
    """The rows so far: each printed as it comes, under the heading of its setup
    where it follows another setup's row, and, with a path, the whole report
    written after it, so that a run killed by a time limit keeps what it measured."""

    def __init__(self, path: str | None, header: dict, headings: dict) -> None:
        self.path, self.header, self.headings, self.rows = path, header, headings, []

    def begin(self, row: dict) -> None:
        """Show the name of the row about to be measured: a row that compiles, or
        a CPU's step at a notes' batch size, takes minutes."""
        if not self.rows or self.rows[-1]["setup"] != row["setup"]:
            print(self.headings[row["setup"]])
        # a loop row's script prints its own lines, below the row's name
        print(row_start(row), end="\n" if row["kind"] == "loop" else "", flush=True)

    def add(self, row: dict) -> dict:
        """Show the measured row, and keep it."""
        self.rows.append(row)
        print(row_line(row) if row["kind"] == "loop" else row_end(row), flush=True)
        if self.path:
            self.write()
        return row

    def write(self) -> None:
        """Write the report whole or not at all: to a file beside it, then renamed."""
        report = dict(self.header, load_1min_end=load_1min(), rows=self.rows)
        try:
            with open(self.path + ".tmp", "w") as file:
                json.dump(report, file, indent=2)
            os.replace(self.path + ".tmp", self.path)
        except OSError as err:
            raise UserError(f"could not write {self.path}: {err.strerror}") from None


def run_row(
    report: Report,
    plan: Plan,
    setup: Setup,
    kind: str,
    name: str,
    measurement: Callable[[], float],
    reference: dict | None = None,
    skip: str | None = None,
    knobs: frozenset | None = None,
) -> dict:
    """Measure one row, unless there is a reason to `skip` it, and add it to the
    report; its ratio is to the row `reference`."""
    row = dict(
        setup=setup.name, kind=kind, name=name,
        batch_size=plan.batch_size or setup.batch_size,
        knobs=None if knobs is None else sorted(knobs),
    )
    report.begin(row)
    value = peak = None
    if skip is None:
        value, skip, peak = attempt(measurement, plan.device)
    # the default rows are the reference of their kind
    base = value if name == "default" else reference and reference["value"]
    row.update(
        value=value, unit=UNITS[kind], ratio=speedup(kind, value, base),
        skipped=skip, peak_mib=peak,
    )
    return report.add(row)


def needs_cuda(name: str, device: torch.device) -> str | None:
    """Why the row `name` cannot run on `device`, or None if it can."""
    return CUDA_ONLY.get(name) if device.type != "cuda" else None


def nothing_fast(device: torch.device) -> str:
    """Why the fast rows are skipped where --fast turns nothing on."""
    return f"--fast turns nothing on for {device.type}: the same as the default"


def train_row(
    report: Report,
    plan: Plan,
    setup: Setup,
    name: str,
    knobs: frozenset,
    reference: dict | None,
    skip: str | None = None,
) -> dict:
    """The train row `name`: the bare step with `knobs`, against `reference`."""
    batch_size = plan.batch_size or setup.batch_size
    measurement = partial(
        train_speed, setup, knobs, plan.device, batch_size, plan.steps, plan.warmup
    )
    return run_row(
        report, plan, setup, "train", name, measurement, reference, skip, knobs
    )


def to_measure(order: tuple, names: tuple, plan: Plan, rows: dict) -> list[str]:
    """Those of `names` that plan asks for and that are not among `rows` yet, in the
    order of `order`."""
    return [
        name for name in order
        if name in names and name in plan.names and name not in rows
    ]


def train_rows(
    report: Report, plan: Plan, setup: Setup, rows: dict, names=TRAIN_ROWS
) -> None:
    """Measure the setup's train rows `names` that plan asks for into `rows`, by
    name, in TRAIN_ROWS' order and each once: default, each knob alone, fast, best."""
    for name in to_measure(TRAIN_ROWS, names, plan, rows):
        knobs, skip = frozenset({name}), needs_cuda(name, plan.device)
        if name == "default":
            knobs = frozenset()
        elif name == "fast":
            knobs, skip = plan.fast, None if plan.fast else nothing_fast(plan.device)
        elif name == "best":
            ratios = {
                knob: row["ratio"] for knob, row in rows.items()
                if knob in TRAIN_KNOBS and row["ratio"] is not None
            }
            knobs, skip = best_knobs(ratios, plan.fast)
        rows[name] = train_row(
            report, plan, setup, name, knobs, rows.get("default"), skip
        )


def sample_rows(
    report: Report, plan: Plan, setup: Setup, rows: dict, names=tuple(SAMPLE_MODES)
) -> None:
    """Measure the setup's sample rows `names` that plan asks for into `rows`, by
    name, in SAMPLE_MODES' order and each once: default, compile, cuda_graphs."""
    n_sample = plan.n_sample or setup.n_sample
    for name in to_measure(tuple(SAMPLE_MODES), names, plan, rows):
        measurement = partial(
            sample_speed, setup, SAMPLE_MODES[name], plan.device, n_sample,
            plan.steps, plan.warmup,
        )
        skip = needs_cuda(name, plan.device)
        rows[name] = run_row(
            report, plan, setup, "sample", name, measurement, rows.get("default"),
            skip,
        )


def loop_rows(report: Report, plan: Plan, setup: Setup, bare: dict) -> None:
    """The setup's loop rows that plan asks for, each against the train row of the
    same knobs in `bare`."""
    batch_size = plan.batch_size or setup.batch_size
    for name, (bare_name, flags) in LOOP_ROWS.items():
        if name in plan.names:
            flags = plan.fast_settings if flags is None else flags
            settings = loop_settings(setup, flags, plan.device, batch_size, plan.steps)
            measurement = partial(loop_in_temporary_folder, setup, settings)
            skip = None
            if name == "loop_fast" and not flags:
                skip = nothing_fast(plan.device)
            run_row(
                report, plan, setup, "loop", name, measurement,
                bare.get(bare_name), skip,
            )


def heading(plan: Plan, setup: Setup) -> str:
    """The first lines of a setup's table: its name and sizes, and the columns."""
    batch_size = plan.batch_size or setup.batch_size
    n_sample = plan.n_sample or setup.n_sample
    columns = f"{'kind':<7}{'row':<30}{'value':>10} {'unit':<7}{'ratio':>8}"
    columns += f"{'peak MiB':>10}"
    return f"\n{setup.name}: batch {batch_size}, grids of {n_sample}\n{columns}"


def measure(report: Report, plan: Plan, setups: list[Setup]) -> None:
    """Every row of `setups` that plan asks for, in the three passes of the module's
    docstring: the fast path of every setup first, then the rest."""
    fast_sampler = next(
        name for name, mode in SAMPLE_MODES.items()
        if mode == sampling_mode(plan.device)
    )
    trained = {setup.name: {} for setup in setups}
    sampled = {setup.name: {} for setup in setups}
    for setup in setups:
        train_rows(report, plan, setup, trained[setup.name], ("default", "fast"))
    for setup in setups:
        sample_rows(report, plan, setup, sampled[setup.name], ("default", fast_sampler))
    for setup in setups:
        train_rows(report, plan, setup, trained[setup.name])
        sample_rows(report, plan, setup, sampled[setup.name])
        loop_rows(report, plan, setup, trained[setup.name])


def table_order(rows: list[dict], setups: list[Setup]) -> list[dict]:
    """The rows setup by setup, and in a setup train, sample, then loop rows, each
    kind in the order of ROW_NAMES."""
    names = [setup.name for setup in setups]

    def place(row: dict) -> tuple[int, int, int]:
        kind = list(UNITS).index(row["kind"])
        return names.index(row["setup"]), kind, ROW_NAMES.index(row["name"])

    return sorted(rows, key=place)


def tables(rows: list[dict], plan: Plan, setups: list[Setup]) -> str:
    """The table of each setup, its rows in the order of `rows`."""
    parts = []
    for setup in setups:
        lines = [row_line(row) for row in rows if row["setup"] == setup.name]
        parts.append("\n".join([heading(plan, setup), *lines]))
    return "\n".join(parts)


def row_line(row: dict) -> str:
    """A row of the table: its kind and name, then row_end."""
    return row_start(row) + row_end(row)


def row_start(row: dict) -> str:
    """The row's kind and name, with the knobs of fast and best."""
    label = row["name"]
    if row["name"] in ("fast", "best") and row["knobs"]:
        label += f" ({'+'.join(row['knobs'])})"
    return f"{row['kind']:<7}{label:<30}"


def row_end(row: dict) -> str:
    """The row's value, unit, ratio and peak memory, or why it was skipped."""
    if row["skipped"] is not None:
        return f"skipped: {row['skipped']}"
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    return f"{row['value']:>10.4g} {row['unit']:<7}{ratio:>8}{peak:>10}"


def load_1min() -> float | None:
    """The 1-minute load average, where the system has one: was the machine idle?"""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_of(device: torch.device) -> str:
    """The GPU's name, or the CPU's architecture, vector unit and torch's threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()} {capability} CPU, {torch.get_num_threads()} threads"


def row_names(text: str) -> frozenset[str]:
    """An argparse type: comma-separated row names, or all."""
    if text == "all":
        return frozenset(ROW_NAMES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROW_NAMES]
    if unknown or not names:
        wrong = f"unknown row {', '.join(unknown)}" if unknown else "no row named"
        raise argparse.ArgumentTypeError(
            f"{wrong}: choose from all or {', '.join(ROW_NAMES)}"
        )
    return frozenset(names)


def parser() -> argparse.ArgumentParser:
    """The command line, each default in its help."""
    parser = argparse.ArgumentParser(
        prog="python -m mindiffusion.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", metavar="NAME",
                        help="cpu, cuda, cuda:N or mps; falls back as the training "
                        "scripts do (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny: batches of 2, grids of 2, 1 warm-up step and 2 "
                        "timed steps; --batch-size and --steps given as well win "
                        "(default: off)")
    parser.add_argument("--batch-size", type=at_least(1), metavar="N",
                        help="every setup's batch, the loop rows' too, for a CPU "
                        "where the notes' batches take minutes a step (default: "
                        "each setup's own)")
    parser.add_argument("--steps", type=at_least(1), metavar="N",
                        help="timed steps of each row, after 3 untimed ones; also "
                        "the steps of each epoch of the loop rows (default: 10)")
    parser.add_argument("--knobs", type=row_names, default="all", metavar="LIST",
                        help="comma-separated row names to measure; default and "
                        "compile name a train and a sample row each: "
                        f"{', '.join(ROW_NAMES)} (default: %(default)s)")
    parser.add_argument("--only", metavar="PREFIX",
                        help="measure only the setups whose name starts with PREFIX, "
                        "in any case: cifar, mnist, celeba or laptop (default: all)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the machine, its 1-minute load average "
                        "at the start and at the latest row, and every row to FILE, "
                        "rewritten after each row (default: off)")
    return parser


def plan_of(args: argparse.Namespace, device: torch.device) -> Plan:
    """The rows and sizes the command line asks for, on `device`."""
    quick_batch = 2 if args.quick else None
    settings = fast_settings(device)
    return Plan(
        device=device,
        names=args.knobs,
        batch_size=args.batch_size or quick_batch,
        n_sample=2 if args.quick else None,
        steps=args.steps or (2 if args.quick else 10),
        warmup=1 if args.quick else 3,
        fast_settings=settings,
        fast=fast_knobs(settings, device),
    )


def kept(path: str | None) -> str:
    """Where the rows measured before an interruption are."""
    return f": the rows measured are in {path}" if path else ""


def main(argv: list[str] | None = None) -> None:
    """python -m mindiffusion.bench: see the module's docstring."""
    command = parser()
    args = command.parse_args(argv)
    prefix = (args.only or "").lower()
    setups = [setup for setup in SETUPS if setup.name.lower().startswith(prefix)]
    if not setups:
        command.error(f"--only {args.only}: no setup's name starts so")
    # --json before the measurements, which take minutes
    if args.json and not os.path.isdir(os.path.dirname(args.json) or "."):
        command.error(f"--json {args.json}: its folder does not exist")
    if args.json and os.path.exists(args.json):
        command.error(f"--json {args.json} already exists: choose another file")
    try:
        device = resolve_device(args.device)
    except UserError as err:
        command.error(str(err))

    plan = plan_of(args, device)
    machine = machine_of(device)
    header = dict(
        machine=machine, device=str(device), torch=torch.__version__,
        cpu_count=os.cpu_count(), native_bf16=has_native_bf16(device),
        load_1min_start=load_1min(), quick=args.quick,
        batch_size_override=args.batch_size, steps=plan.steps, warmup=plan.warmup,
        fast=plan.fast_settings,
    )
    print(f"{machine}, torch {torch.__version__}; --fast here: {plan.fast_settings}")
    report = Report(args.json, header, {s.name: heading(plan, s) for s in setups})
    try:
        measure(report, plan, setups)
    except UserError as err:
        command.exit(2, f"{err}\n")
    except KeyboardInterrupt:
        command.exit(130, f"\ninterrupted{kept(args.json)}\n")
    except signals.Stopped as stop:
        # not the run's own message: its folder, and so its checkpoint, is gone
        stopped = f"stopped by {signals.name(stop.signum)}"
        command.exit(128 + stop.signum, f"\n{stopped}{kept(args.json)}\n")
    ordered = table_order(report.rows, setups)
    # the passes took the rows out of their tables' order, or the scripts' progress
    # lines came between the loop rows
    if ordered != report.rows or plan.names & set(LOOP_ROWS):
        print("\nThe tables again, each setup's rows together, without the scripts' "
              "lines:")
        print(tables(ordered, plan, setups))


if __name__ == "__main__":
    main()
