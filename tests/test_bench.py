"""python -m mindiffusion.bench: its timings against models whose cost is known, the
choice of its best row, and its table and JSON on small stand-ins for the setups.
Nothing here compiles: torch.compile takes a minute on a small CPU."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from conftest import narrow_unets
from mindiffusion.bench import command, speeds
from mindiffusion.bench import report as bench_report
from mindiffusion.bench import rows as bench_rows
from mindiffusion.bench import setups as bench_setups
from mindiffusion.ddpm import DDPM
from mindiffusion.training.files import Record
from mindiffusion.training.recipes import LAPTOP
from mindiffusion.unet import NaiveUnet

WARMUP_S, STEP_S = 0.3, 0.05
# the rows that run on a CPU without compiling, and those that a CPU skips
CHEAP = "default,channels_last,fused_adam,tf32,cuda_graphs"


@pytest.fixture(autouse=True)
def one_thread():
    """torch on one thread: when other processes share a small CPU, two threads that
    wait for each other made these tiny models up to 50 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def clock(monkeypatch):
    """The bench's clock, which only SleepyEps moves: a row's value is then what the
    stand-in cost, whatever else the machine is doing."""
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(perf_counter=lambda: clock.now)
    monkeypatch.setattr(speeds, "time", fake_time)
    return clock


class SleepyEps(nn.Module):
    """A noise model whose first call takes WARMUP_S on `clock` and each later call
    STEP_S, as a compiled model's first call does."""

    def __init__(self, clock):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls, self.clock = 0, clock

    def forward(self, x, t):
        self.clock.now += WARMUP_S if self.calls == 0 else STEP_S
        self.calls += 1
        return x * self.scale


def test_training_throughput_counts_images_per_second_after_warm_up(clock):
    for knobs in (frozenset(), frozenset({"fused_adam"})):
        ddpm = DDPM(SleepyEps(clock), bench_setups.BETAS, n_T=10)
        img_per_s = speeds.train_throughput(
            ddpm, torch.zeros(4, 1, 2, 2), steps=3, warmup=1, knobs=knobs
        )
        assert ddpm.eps_model.calls == 4
        # 4 images per STEP_S: the warm-up's WARMUP_S is left out
        assert img_per_s == pytest.approx(4 / STEP_S)


def test_sampling_step_time_is_seconds_per_step_after_warm_up(clock):
    eps_model = SleepyEps(clock)
    step_s = speeds.sampling_step_time(
        eps_model, 2, (1, 2, 2), steps=3, warmup=1, device=torch.device("cpu")
    )
    assert eps_model.calls == 4
    assert step_s == pytest.approx(STEP_S)


class SeeingEps(nn.Module):
    """A noise model that keeps the autocast dtype of each call (None: off)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.dtypes = []

    def forward(self, x, t):
        on = torch.is_autocast_enabled("cpu")
        self.dtypes.append(torch.get_autocast_dtype("cpu") if on else None)
        return x * self.scale


def test_the_step_knobs_reach_the_step(monkeypatch):
    made = []

    def adam(*args, **kwargs):
        made.append(kwargs.get("fused"))
        return real_adam(*args, **kwargs)

    class Scaler(torch.amp.GradScaler):
        def scale(self, outputs):
            scaled.append(self.is_enabled())
            return super().scale(outputs)

    real_adam, scaled = torch.optim.Adam, []
    monkeypatch.setattr(torch.optim, "Adam", adam)
    monkeypatch.setattr(torch.amp, "GradScaler", Scaler)
    x = torch.zeros(2, 1, 2, 2)
    for knobs, dtype, fused in (
        (set(), None, None),
        ({"bf16"}, torch.bfloat16, None),
        ({"fp16"}, torch.float16, None),
        ({"fused_adam"}, None, True),
    ):
        ddpm = DDPM(SeeingEps(), bench_setups.BETAS, n_T=10)
        speeds.train_throughput(ddpm, x, steps=1, warmup=1, knobs=frozenset(knobs))
        assert ddpm.eps_model.dtypes == [dtype, dtype] and made.pop() is fused
        # float16's loss is scaled, before each backward
        assert scaled == [dtype == torch.float16] * 2
        scaled.clear()


def test_the_model_knobs_reach_the_model_and_the_batch(monkeypatch):
    seen = {}

    def look(ddpm, x, steps, warmup, knobs):
        weight = next(ddpm.parameters())
        # stepping one channel steps one element: channels_last
        layout = (x.stride(1) == 1, weight.stride(1) == 1)
        seen[knobs] = layout, torch.backends.cuda.matmul.allow_tf32
        return 1.0

    monkeypatch.setattr(speeds, "train_throughput", look)
    setup = tiny_setup("Tiny", size=(3, 32, 32))._replace(
        model=lambda: NaiveUnet(3, 3, 8)
    )
    tf32 = torch.backends.cuda.matmul.allow_tf32
    for knobs in (frozenset(), {"channels_last"}, {"tf32"}):
        speeds.train_speed(setup, frozenset(knobs), torch.device("cpu"), 2, 1, 1)
    assert seen == {
        frozenset(): ((False, False), tf32),
        frozenset({"channels_last"}): ((True, True), tf32),
        frozenset({"tf32"}): ((False, False), True),
    }
    assert torch.backends.cuda.matmul.allow_tf32 == tf32


def test_best_takes_each_knob_that_paid_alone_and_one_autocast():
    fast = frozenset({"compile"})
    ratios = dict(bf16=1.2, fp16=1.5, channels_last=1.03, compile=0.6,
                  fused_adam=1.02, tf32=1.1)
    best = ({"fp16", "channels_last", "tf32"}, None)
    assert bench_rows.best_knobs(ratios, fast) == best
    # a tie keeps bfloat16, which needs no loss scaling
    tie = dict(bf16=1.2, fp16=1.2, channels_last=1.1)
    assert bench_rows.best_knobs(tie, fast) == ({"bf16", "channels_last"}, None)


def test_best_is_skipped_when_it_would_repeat_a_row():
    fast = frozenset({"bf16", "compile"})
    assert bench_rows.best_knobs(dict(bf16=1.0, compile=1.029), fast) == (
        set(), "no knob reached 1.03x the default alone"
    )
    assert bench_rows.best_knobs(dict(bf16=1.2, fp16=1.1, compile=1.5), fast) == (
        fast, "the same knobs as fast"
    )
    assert bench_rows.best_knobs(dict(bf16=0.9, fused_adam=1.3), fast) == (
        {"fused_adam"}, "fused_adam alone, measured above"
    )


def test_a_speed_up_is_more_images_per_second_or_fewer_seconds_per_step():
    assert bench_rows.speedup("train", 150.0, 100.0) == 1.5
    assert bench_rows.speedup("loop", 50.0, 100.0) == 0.5
    assert bench_rows.speedup("sample", 0.02, 0.05) == 2.5
    assert bench_rows.speedup("train", None, 100.0) is None
    assert bench_rows.speedup("sample", 0.02, None) is None


def test_fast_settings_become_training_knobs():
    cpu = torch.device("cpu")
    assert bench_rows.fast_knobs({}, cpu) == set()
    fp16_compile = dict(amp="fp16", compile=True)
    assert bench_rows.fast_knobs(fp16_compile, cpu) == {"fp16", "compile"}
    assert bench_rows.fast_knobs(dict(amp="bf16", channels_last=True), cpu) == {
        "bf16", "channels_last"
    }


def tiny():
    return NaiveUnet(1, 1, n_feat=8)


def tiny_setup(name, size=(1, 32, 32), batch_size=64, n_sample=16, preset=None):
    """A setup of the tiny UNet, whose loop rows would run "mnist"'s --laptop
    UNet without workers."""
    preset = preset or dict(eps_model="unet", n_feat=8, num_workers=0)
    return bench_setups.Setup(
        name, tiny, size, batch_size, n_sample, "mnist", preset
    )


@pytest.fixture
def tiny_setups(monkeypatch):
    setups = [tiny_setup("Tiny A"), tiny_setup("Tiny B", (1, 32, 64), 32, 8)]
    monkeypatch.setattr(command, "SETUPS", setups)
    return setups


def test_quick_run_prints_a_table_and_writes_json(tmp_path, tiny_setups, capsys):
    path = tmp_path / "b.json"
    command.main(["--device", "cpu", "--quick", "--knobs", CHEAP, "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    assert report["batch_size_override"] is None
    assert report["cpu_count"] == os.cpu_count()
    assert report["torch"] == torch.__version__
    assert report["machine"].endswith(f"{torch.get_num_threads()} threads")
    assert not os.path.exists(f"{path}.tmp")
    rows = report["rows"]
    # the defaults of every setup first: the fast rows of these knobs
    first = [(setup.name, "train", "default") for setup in tiny_setups]
    first += [(setup.name, "sample", "default") for setup in tiny_setups]
    rest = [("train", n) for n in ("channels_last", "fused_adam", "tf32")]
    rest += [("sample", "cuda_graphs")]
    assert [(r["setup"], r["kind"], r["name"]) for r in rows] == first + [
        (setup.name, kind, name) for setup in tiny_setups for kind, name in rest
    ]
    table = capsys.readouterr().out
    for row in rows:
        # --quick: batches of 2, whatever the setup's own
        assert row["batch_size"] == 2 and row["peak_mib"] is None
        if row["name"] in ("tf32", "cuda_graphs"):
            assert row["value"] is row["ratio"] is None
            assert f"skipped: {row['skipped']}" in table
        else:
            assert row["value"] > 0 and row["skipped"] is None
            assert f"{row['value']:.4g}" in table
    for name in "Tiny A", "Tiny B":
        own = [r for r in rows if r["setup"] == name]
        setup = bench_report.table_order(own, tiny_setups)
        train_default, sample_default = setup[0]["value"], setup[4]["value"]
        assert setup[0]["ratio"] == setup[4]["ratio"] == 1.0
        for row in setup[1:3]:
            assert row["ratio"] == pytest.approx(row["value"] / train_default)
            assert f"{row['ratio']:.2f}x" in table
        assert setup[3]["skipped"] == "TF32 is a CUDA tensor-core format"
        assert setup[5]["skipped"] == "CUDA graphs need a CUDA device"
        assert sample_default > 0


@pytest.mark.parametrize("native_bf16", [False, True])
def test_quick_measures_the_first_setup_s_knobs_and_says_what_it_left_out(
    native_bf16, tmp_path, tiny_setups, monkeypatch, capsys
):
    monkeypatch.setattr(command, "has_native_bf16", lambda device: native_bf16)
    fast = dict(amp="auto", compile=True)
    monkeypatch.setattr(command, "fast_settings", lambda device: fast)
    monkeypatch.setattr(bench_rows, "train_speed", lambda *args: 100.0)
    monkeypatch.setattr(bench_rows, "sample_speed", lambda *args: 1.0)
    monkeypatch.setattr(bench_rows, "loop_in_temporary_folder", lambda *args: 90.0)
    path = tmp_path / "b.json"
    command.main(["--device", "cpu", "--quick", "--json", str(path)])
    report = json.loads(path.read_text())
    knobs = ["bf16"] if native_bf16 else []
    knobs += ["channels_last", "fused_adam", "tf32", "best"]
    assert [(r["setup"][-1], r["kind"], r["name"]) for r in report["rows"]] == [
        ("A", "train", "default"), ("B", "train", "default"),
        ("A", "sample", "default"), ("B", "sample", "default"),
        *[("A", "train", knob) for knob in knobs], ("A", "loop", "loop_default"),
    ]
    left_out = {"compile", "cuda_graphs", "fast", "loop_fast", "loop_ema", "fp16"}
    left_out |= set() if native_bf16 else {"bf16"}
    assert set(report["left_out"]) == left_out
    assert report["knob_setup"] == "Tiny A"
    out = capsys.readouterr().out
    assert "--quick leaves out these rows, which --knobs measures when named:" in out
    assert "  compile, cuda_graphs: wait a minute or more for the compiler\n" in out
    assert "  fast, loop_fast: take --compile here\n" in out
    assert "  fp16: a CPU emulates float16, at about 0.01x\n" in out
    assert ("  bf16: this CPU emulates bfloat16" in out) is not native_bf16
    assert "  every row but the defaults of the setups after Tiny A\n" in out


def test_fast_and_best_rows_measure_the_knobs_chosen(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(command, "SETUPS", [tiny_setup("Tiny")])
    monkeypatch.setattr(command, "fast_settings", lambda device: dict(amp="bf16"))
    speed_ups = dict(bf16=1.2, fp16=1.3, channels_last=1.1, compile=0.5,
                     fused_adam=1.05, tf32=2.0)
    measured = []

    def made_up_speed(setup, knobs, device, batch_size, steps, warmup):
        measured.append(knobs)
        speed = 100.0
        for knob in knobs:
            speed *= speed_ups[knob]
        return speed

    monkeypatch.setattr(bench_rows, "train_speed", made_up_speed)
    # the compile sampling row too, which would compile for a minute
    monkeypatch.setattr(bench_rows, "sample_speed", lambda *args: 1.0)
    path = tmp_path / "b.json"
    knobs = "default,bf16,fp16,channels_last,compile,fused_adam,tf32,fast,best"
    command.main(["--device", "cpu", "--knobs", knobs, "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert sorted(row["kind"] for row in rows) == ["sample"] * 2 + ["train"] * 9
    by_name = {row["name"]: row for row in rows if row["kind"] == "train"}
    fast, best = by_name["fast"], by_name["best"]
    assert fast["knobs"] == ["bf16"] and fast["value"] == pytest.approx(120.0)
    # tf32 is skipped on the CPU, compile slowed down, fp16 beat bf16
    assert best["knobs"] == ["channels_last", "fp16", "fused_adam"]
    assert best["ratio"] == pytest.approx(1.3 * 1.1 * 1.05)
    assert measured[-1] == {"fp16", "channels_last", "fused_adam"}
    assert "best (channels_last+fp16+fused_adam)" in capsys.readouterr().out


def test_the_fast_path_of_every_setup_comes_first(tmp_path, tiny_setups, monkeypatch,
                                                 capsys):
    measured = []

    def made_up(kind):
        def speed(setup, knobs_or_mode, *args):
            measured.append((setup.name[-1], kind, knobs_or_mode))
            return 100.0

        return speed

    monkeypatch.setattr(bench_rows, "train_speed", made_up("train"))
    monkeypatch.setattr(bench_rows, "sample_speed", made_up("sample"))
    monkeypatch.setattr(bench_rows, "loop_in_temporary_folder", lambda *args: 90.0)
    monkeypatch.setattr(command, "fast_settings", lambda device: dict(amp="bf16"))
    command.main(["--device", "cpu"])
    none, bf16 = frozenset(), frozenset({"bf16"})
    fast_path = [
        ("A", "train", none), ("A", "train", bf16),
        ("B", "train", none), ("B", "train", bf16),
        ("A", "sample", None), ("A", "sample", "default"),
        ("B", "sample", None), ("B", "sample", "default"),
    ]
    assert measured[:8] == fast_path
    # then each knob alone; best is skipped, for no knob paid, and so is cuda_graphs
    knobs = [frozenset({k}) for k in bench_setups.TRAIN_KNOBS if k != "tf32"]
    assert measured[8:] == [(s, "train", k) for s in "AB" for k in knobs]
    tables = capsys.readouterr().out.split("each setup's rows together")[1]
    # the tables in their own order: the fast row after each knob alone
    assert tables.index("train  bf16") < tables.index("train  fast (bf16)")
    assert tables.index("train  fast (bf16)") < tables.index("sample default")
    assert tables.index("loop_ema") < tables.index("Tiny B")
    # on CUDA, the fast sampler is the CUDA graphs row, skipped here on the CPU
    monkeypatch.setattr(bench_rows, "sampling_mode", lambda device: "reduce-overhead")
    measured.clear()
    path = tmp_path / "b.json"
    command.main(["--device", "cpu", "--knobs", "default,compile,cuda_graphs",
                  "--json", str(path)])
    rows = json.loads(path.read_text())["rows"]
    assert [(r["setup"][-1], r["kind"], r["name"]) for r in rows[:6]] == [
        ("A", "train", "default"), ("B", "train", "default"),
        ("A", "sample", "default"), ("A", "sample", "cuda_graphs"),
        ("B", "sample", "default"), ("B", "sample", "cuda_graphs"),
    ]


def test_a_row_s_name_shows_while_it_is_measured(tiny_setups, monkeypatch, capsys):
    shown = []

    def speed(*args):
        shown.append(capsys.readouterr().out)
        return 100.0

    for measurement in ("train_speed", "sample_speed", "loop_in_temporary_folder"):
        monkeypatch.setattr(bench_rows, measurement, speed)
    command.main(["--device", "cpu", "--only", "tiny a",
                  "--knobs", "default,channels_last,loop_default"])
    train, sample, channels_last, loop = shown

    def start(kind, name):
        return f"{kind:<7}{name:<30}"

    assert "\nTiny A: batch 64, grids of 16\n" in train
    assert train.endswith("peak MiB\n" + start("train", "default"))
    # then the row is done, on the same line
    assert sample.startswith(f"{100:>10} img/s     1.00x")
    assert sample.endswith("\n" + start("sample", "default"))
    assert channels_last.endswith("\n" + start("train", "channels_last"))
    # the script's lines come below a loop row's name, and then the whole row
    assert loop.endswith("\n" + start("loop", "loop_default") + "\n")
    out = capsys.readouterr().out
    assert out.startswith(start("loop", "loop_default") + f"{100:>10} img/s")


def test_a_failing_knob_is_a_row_that_says_why(tmp_path, tiny_setups, monkeypatch):
    real = speeds.train_throughput

    def no_fused(ddpm, x, steps, warmup, knobs):
        if "fused_adam" in knobs:
            raise RuntimeError("fused=True is not here\nsecond line of the error")
        return real(ddpm, x, steps, warmup, knobs)

    monkeypatch.setattr(speeds, "train_throughput", no_fused)
    path = tmp_path / "b.json"
    argv = ["--device", "cpu", "--quick", "--json", str(path)]
    command.main(argv + ["--knobs", "default,fused_adam,channels_last"])
    rows = json.loads(path.read_text())["rows"]
    assert [(row["setup"][-1], row["kind"], row["name"]) for row in rows] == [
        ("A", "train", "default"), ("B", "train", "default"),
        ("A", "sample", "default"), ("B", "sample", "default"),
        ("A", "train", "channels_last"), ("A", "train", "fused_adam"),
        ("B", "train", "channels_last"), ("B", "train", "fused_adam"),
    ]
    assert rows[5]["skipped"] == "RuntimeError: fused=True is not here"
    assert rows[5]["value"] is None
    # the bench went on after it
    assert rows[6]["value"] > 0


def test_the_json_holds_every_row_before_an_interruption(
    tmp_path, tiny_setups, monkeypatch, capsys
):
    calls = []

    def third_is_interrupted(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return 10.0 * len(calls)

    monkeypatch.setattr(bench_rows, "train_speed", third_is_interrupted)
    path = tmp_path / "b.json"
    monkeypatch.setattr(bench_rows, "sample_speed", lambda *args: 1.0)
    argv = ["--device", "cpu", "--knobs", "default,bf16,fp16", "--json", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv + ["--only", "tiny a"])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert err == f"\ninterrupted: the rows measured are in {path}\n"
    rows = json.loads(path.read_text())["rows"]
    assert [(row["kind"], row["name"], row["value"]) for row in rows] == [
        ("train", "default", 10.0), ("sample", "default", 1.0), ("train", "bf16", 20.0)
    ]
    assert rows[2]["ratio"] == 2.0


def test_loop_rows_read_the_second_epoch_of_the_trainer_s_record(
    tmp_path, monkeypatch, capsys
):
    narrow_unets(monkeypatch)
    setup = bench_setups.Setup(
        "Tiny CIFAR-10", lambda: NaiveUnet(3, 3, 8), (3, 32, 32), 512, 8,
        "cifar10", dict(num_workers=0),
    )
    monkeypatch.setattr(command, "SETUPS", [setup])
    original = Record.end_epoch

    def known_speed(self, epoch, lr):
        # epoch 0 at 111 images per second, epoch 1 at 222
        self.images = 111 * (epoch + 1)
        self.seconds, self.clock, self.last_step = 0.0, 0.0, 1.0
        original(self, epoch, lr)

    monkeypatch.setattr(Record, "end_epoch", known_speed)
    seen = []

    train = speeds.train

    def spy(dataset, **settings):
        seen.append(settings)
        return train(dataset, **settings)

    monkeypatch.setattr(speeds, "train", spy)
    path = tmp_path / "b.json"
    argv = ["--device", "cpu", "--batch-size", "2", "--steps", "2"]
    command.main(argv + ["--knobs", "default,loop_default", "--json", str(path)])
    default, _, loop = json.loads(path.read_text())["rows"]
    assert (loop["kind"], loop["name"], loop["value"]) == ("loop", "loop_default", 222)
    assert loop["ratio"] == pytest.approx(222 / default["value"])
    # the table again at the end, without the trainer's lines between the rows
    out = capsys.readouterr().out
    tables = out.split("rows together, without the trainer's lines:\n")[1]
    assert "Epoch" not in tables and bench_report.row_line(loop) in tables
    (settings,) = seen
    assert not os.path.exists(settings.pop("out"))
    assert settings == dict(
        num_workers=0, device="cpu", batch_size=2, n_epoch=2, n_T=1000,
        fake_data=4, grid_every=2, grid_sampler="ddim", grid_steps=1,
        save_every=None,
    )


def test_loop_settings_keep_the_scripts_own_workers_and_the_laptop_preset():
    cpu = torch.device("cpu")
    cifar, mnist, _, laptop = bench_setups.SETUPS
    assert cifar.dataset == "cifar10"
    settings = speeds.loop_settings(cifar, dict(ema=0.999), cpu, 8, 3)
    assert settings["num_workers"] == min(16, len(os.sched_getaffinity(0)))
    assert settings["ema"] == 0.999 and settings["fake_data"] == 24
    settings = speeds.loop_settings(mnist, {}, cpu, 8, 3)
    assert settings["num_workers"] == min(20, len(os.sched_getaffinity(0)))
    assert "eps_model" not in settings
    settings = speeds.loop_settings(laptop, dict(compile=True), cpu, 64, 10)
    assert (settings["eps_model"], settings["n_feat"]) == ("unet", 16)
    assert settings["num_workers"] == 0 and settings["lr"] == LAPTOP["lr"]
    assert settings["device"] == "cpu" and settings["compile"] is True
    # each row's own precision and average, not the preset's
    assert "amp" not in settings and "ema" not in settings


def test_an_unwritable_json_file_is_one_sentence(tmp_path, tiny_setups, monkeypatch,
                                                 capsys):
    folder = tmp_path / "out"
    folder.mkdir()

    def measure_then_lose_the_folder(*args):
        # the folder was there at the start, and is gone when the numbers are
        if folder.exists():
            folder.rmdir()
        return 1.0

    monkeypatch.setattr(bench_rows, "train_speed", measure_then_lose_the_folder)
    path = folder / "b.json"
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--device", "cpu", "--knobs", "default", "--json", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"could not write {path}: No such file or directory\n"


def test_an_existing_or_folderless_json_is_refused_before_measuring(
    tmp_path, monkeypatch, capsys
):
    def measure(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(command, "measure", measure)
    existing = tmp_path / "b.json"
    existing.write_text("earlier numbers")
    missing = tmp_path / "no" / "such" / "b.json"
    for path, sentence in (
        (existing, f"--json {existing} already exists: choose another file"),
        (missing, f"--json {missing}: its folder does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            command.main(["--device", "cpu", "--quick", "--json", str(path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f"python -m mindiffusion.bench: error: {sentence}\n")
    assert existing.read_text() == "earlier numbers"


def test_only_picks_setups_by_the_start_of_their_name(tmp_path, tiny_setups, capsys):
    argv = ["--device", "cpu", "--quick", "--knobs", "default"]
    command.main(argv + ["--only", "tiny b", "--json", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(row["setup"], row["kind"]) for row in rows] == [
        ("Tiny B", "train"), ("Tiny B", "sample")
    ]
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv + ["--only", "cifar"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(
        "error: --only cifar: no setup's name starts so\n"
    )


def test_each_setup_has_a_prefix_of_its_own():
    for prefix in ("cifar", "mnist", "celeba", "laptop"):
        chosen = [s for s in bench_setups.SETUPS if s.name.lower().startswith(prefix)]
        assert len(chosen) == 1


def test_an_unknown_row_name_is_one_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--device", "cpu", "--knobs", "default,bf17"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --knobs: unknown row bf17: choose from all or default," in err
