"""How the bench reports: each row printed as it is measured, the tables at the end,
and the JSON file rewritten after each row."""
import json
import os
import platform

import torch

from mindiffusion.bench.setups import ROW_NAMES, UNITS, Plan, Setup
from mindiffusion.training.flags import UserError


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


def heading(plan: Plan, setup: Setup) -> str:
    """The first lines of a setup's table: its name and sizes, and the columns."""
    batch_size = plan.batch_size or setup.batch_size
    n_sample = plan.n_sample or setup.n_sample
    columns = f"{'kind':<7}{'row':<30}{'value':>10} {'unit':<7}{'ratio':>8}"
    columns += f"{'peak MiB':>10}"
    return f"\n{setup.name}: batch {batch_size}, grids of {n_sample}\n{columns}"


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
