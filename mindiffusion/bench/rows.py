"""Which rows a run measures, in what order, and what each is compared with."""
from collections.abc import Callable
from functools import partial

import torch

from mindiffusion.bench.report import Report
from mindiffusion.bench.setups import (
    BEST_AT_LEAST,
    CUDA_ONLY,
    KNOB_DTYPES,
    LOOP_ROWS,
    SAMPLE_MODES,
    TRAIN_KNOBS,
    TRAIN_ROWS,
    UNITS,
    Plan,
    Setup,
)
from mindiffusion.bench.speeds import (
    loop_in_temporary_folder,
    loop_settings,
    sample_speed,
    train_speed,
)
from mindiffusion.training import signals
from mindiffusion.training.devices import autocast_dtype, sampling_mode


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


def quick_leaves_out(
    device: torch.device, fast: frozenset[str], native_bf16: bool
) -> dict[str, str]:
    """The rows that --quick leaves out on `device`, each with why: those that wait
    for the compiler, run the script a second time, or measure a precision that the
    device only emulates, each of which takes minutes where a quick look has
    seconds."""
    compiles = "wait a minute or more for the compiler"
    left_out = {"compile": compiles, "cuda_graphs": compiles}
    if "compile" in fast:
        left_out["fast"] = left_out["loop_fast"] = "take --compile here"
    left_out["loop_ema"] = "a second run of the script, for the cost of --ema"
    if device.type == "cpu":
        left_out["fp16"] = "a CPU emulates float16, at about 0.01x"
    if not native_bf16:
        where = "CPU" if device.type == "cpu" else "GPU"
        left_out["bf16"] = f"this {where} emulates bfloat16, at about 0.05x"
    return left_out


def to_measure(
    order: tuple, names: tuple, plan: Plan, setup: Setup, rows: dict
) -> list[str]:
    """Those of `names` that plan asks for on `setup` and that are not among `rows`
    yet, in the order of `order`."""
    return [
        name for name in order
        if name in names and plan.asks_for(name, setup) and name not in rows
    ]


def train_rows(
    report: Report, plan: Plan, setup: Setup, rows: dict, names=TRAIN_ROWS
) -> None:
    """Measure the setup's train rows `names` that plan asks for into `rows`, by
    name, in TRAIN_ROWS' order and each once: default, each knob alone, fast, best."""
    for name in to_measure(TRAIN_ROWS, names, plan, setup, rows):
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
    for name in to_measure(tuple(SAMPLE_MODES), names, plan, setup, rows):
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
        if plan.asks_for(name, setup):
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


def measure(report: Report, plan: Plan, setups: list[Setup]) -> None:
    """Every row of `setups` that plan asks for, in the three passes of the
    package's docstring: the fast path of every setup first, then the rest."""
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
