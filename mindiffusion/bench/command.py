"""The bench's command line, python -m mindiffusion.bench."""
import argparse
import os

import torch

from mindiffusion import bench
from mindiffusion.bench.report import (
    Report,
    heading,
    load_1min,
    machine_of,
    table_order,
    tables,
)
from mindiffusion.bench.rows import fast_knobs, measure, quick_leaves_out
from mindiffusion.bench.setups import LOOP_ROWS, ROW_NAMES, SETUPS, Plan, Setup
from mindiffusion.training import signals
from mindiffusion.training.devices import (
    fast_settings,
    has_native_bf16,
    resolve_device,
)
from mindiffusion.training import flags
from mindiffusion.training.flags import UserError, at_least


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
    parser = flags.command_parser("python -m mindiffusion.bench", bench.__doc__)
    parser.add_argument("--device", default="cuda", metavar="NAME",
                        help=flags.DEVICE_HELP)
    parser.add_argument("--quick", action="store_true",
                        help="a quick look, about a minute on a small CPU: batches "
                        "of 2, grids of 2, 1 warm-up step and 2 timed steps, and "
                        "none of the rows that wait for the compiler or that the "
                        "device emulates, which it lists; --batch-size, --steps "
                        "and --knobs given as well win (default: off)")
    parser.add_argument("--batch-size", type=at_least(1), metavar="N",
                        help="every setup's batch, the loop rows' too, for a CPU "
                        "where the notes' batches take minutes a step (default: "
                        "each setup's own)")
    parser.add_argument("--steps", type=at_least(1), metavar="N",
                        help="timed steps of each row, after 3 untimed ones; also "
                        "the steps of each epoch of the loop rows (default: 10)")
    parser.add_argument("--knobs", type=row_names, metavar="LIST",
                        help="comma-separated row names to measure, or all; default "
                        "and compile name a train and a sample row each: "
                        f"{', '.join(ROW_NAMES)} (default: all, or with --quick "
                        "all but those it leaves out)")
    parser.add_argument("--only", metavar="PREFIX",
                        help="measure only the setups whose name starts with PREFIX, "
                        "in any case: cifar, mnist, celeba or laptop (default: all)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the machine, its 1-minute load average "
                        "at the start and at the latest row, and every row to FILE, "
                        "rewritten after each row (default: off)")
    return parser


def plan_of(args: argparse.Namespace, device: torch.device, first: Setup) -> Plan:
    """The rows and sizes the command line asks for, on `device`; with --quick and
    no --knobs, measured in full on the `first` setup alone."""
    quick_batch = 2 if args.quick else None
    settings = fast_settings(device)
    fast = fast_knobs(settings, device)
    native_bf16 = has_native_bf16(device)
    left_out, knob_setup = {}, None
    if args.quick and args.knobs is None:
        left_out = quick_leaves_out(device, fast, native_bf16)
        knob_setup = first.name
    return Plan(
        device=device,
        names=args.knobs or (frozenset(ROW_NAMES) - set(left_out)),
        batch_size=args.batch_size or quick_batch,
        n_sample=2 if args.quick else None,
        steps=args.steps or (2 if args.quick else 10),
        warmup=1 if args.quick else 3,
        fast_settings=settings,
        fast=fast,
        native_bf16=native_bf16,
        left_out=left_out,
        knob_setup=knob_setup,
    )


def kept(path: str | None) -> str:
    """Where the rows measured before an interruption are."""
    return f": the rows measured are in {path}" if path else ""


def main(argv: list[str] | None = None) -> None:
    """python -m mindiffusion.bench: see the package's docstring."""
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

    plan = plan_of(args, device, setups[0])
    machine = machine_of(device)
    header = dict(
        machine=machine, device=str(device), torch=torch.__version__,
        cpu_count=os.cpu_count(), native_bf16=plan.native_bf16,
        load_1min_start=load_1min(), quick=args.quick,
        batch_size_override=args.batch_size, steps=plan.steps, warmup=plan.warmup,
        fast=plan.fast_settings, left_out=plan.left_out, knob_setup=plan.knob_setup,
    )
    print(f"{machine}, torch {torch.__version__}; --fast here: {plan.fast_settings}")
    if plan.knob_setup:
        rows_of = {}
        for name, reason in plan.left_out.items():
            rows_of.setdefault(reason, []).append(name)
        print("--quick leaves out these rows, which --knobs measures when named:")
        for reason, names in rows_of.items():
            print(f"  {', '.join(names)}: {reason}")
        print(f"  every row but the defaults of the setups after {plan.knob_setup}")
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
    # the passes took the rows out of their tables' order, or the trainer's progress
    # lines came between the loop rows
    if ordered != report.rows or plan.names & set(LOOP_ROWS):
        print("\nThe tables again, each setup's rows together, without the trainer's "
              "lines:")
        print(tables(ordered, plan, setups))
