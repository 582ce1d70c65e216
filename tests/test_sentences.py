"""Mistakes and odd machines told in one true sentence: a folder that cannot be
written or locked, a seed too large, a file that is no checkpoint, an abbreviated
flag, the settings a resume changes, and the cores a job may use."""
import errno
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from mindiffusion import export, fid, sample
from mindiffusion.figures import command as figures_command
from mindiffusion.bench import command
from mindiffusion.training import devices, files
from test_long_runs import FLAGS, SCRIPTS, SMALL_MNIST, train
from test_stops import CHECKPOINTS


# the command-line entry points, each with a flag it has, abbreviated
COMMANDS = [
    (sample.main, ["x.pth", "--clas", "3"], "--clas"),
    (fid.main, ["x.pth", "--see", "0"], "--see"),
    (figures_command.main, ["x.pth", "--dev", "cpu"], "--dev"),
    (export.main, ["x.pth", "y.pth", "--hel"], "--hel"),
    (command.main, ["--qui"], "--qui"),
]


def flags_of(script, *more):
    return [*FLAGS.split(), *more] + (SMALL_MNIST if script == "mnist" else [])


@pytest.mark.parametrize("main, argv, typo", COMMANDS)
def test_every_command_refuses_an_abbreviated_flag(main, argv, typo, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {typo}" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_refuses_an_abbreviated_flag(script, tmp_path, capsys):
    code, line, _ = train(script, flags_of(script, "--epo", "1"), capsys)
    assert code == 2 and "unrecognized arguments: --epo" in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_seed_too_large_is_one_sentence(script, tmp_path, capsys):
    argv = [*flags_of(script, "--out", str(tmp_path)), "--seed", str(10**20)]
    code, line, _ = train(script, argv, capsys)
    assert code == 2
    assert line == (
        f"argument --seed: must be from 0 to 2**63 - 1025, got {10**20}"
    )


def test_sample_s_seed_too_large_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["x.pth", "--seed", "99999999999999999999"])
    assert exit_info.value.code == 2
    assert "--seed: must be from 0 to" in capsys.readouterr().err


def test_a_csv_given_as_a_checkpoint_is_one_sentence(tmp_path, capsys):
    record = tmp_path / "ddpm_mnist_log.csv"
    record.write_text("epoch,step,loss,lr,seconds,images_per_s\n0,4,0.5,2e-4,1,8\n")
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(record), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith(f"error: {record} is not a readable checkpoint\n")


def refuse_locks(monkeypatch, err: Exception) -> None:
    """Every lock that filelock takes fails with `err` while monkeypatch lasts."""

    def refused(self, *args, **kwargs):
        raise err

    monkeypatch.setattr(files.filelock.FileLock, "acquire", refused)


def test_an_out_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch):
    checkpoint = str(tmp_path / "ddpm_mnist.pth")
    refuse_locks(monkeypatch, PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(files.UserError) as error:
        files.hold_lock(checkpoint)
    assert str(error.value) == (
        f"{checkpoint}.lock cannot be written (Permission denied): choose an --out "
        f"where this user can write"
    )


def test_a_file_system_without_locks_is_told_apart_from_another_run(
    tmp_path, monkeypatch
):
    refuse_locks(monkeypatch, OSError(errno.ENOLCK, "No locks available"))
    checkpoint = str(tmp_path / "ddpm_cifar.pth")
    with pytest.raises(files.UserError) as error:
        files.hold_lock(checkpoint)
    message = str(error.value)
    assert message.startswith(f"the file system of {checkpoint}.lock cannot lock files")
    assert "in use" not in message


def test_the_holder_of_a_lock_is_read_past_the_byte_windows_locks(tmp_path):
    checkpoint = str(tmp_path / "ddpm_celeba.pth")
    held = files.hold_lock(checkpoint)
    try:
        with open(checkpoint + ".lock", "rb") as file:
            # msvcrt locks the first byte: the process id comes after it
            file.seek(1)
            assert file.read().strip(b"\0\n") == str(os.getpid()).encode()
        assert files.holder(checkpoint + ".lock") == str(os.getpid())
    finally:
        files.release(held)


def test_another_process_s_lock_is_refused_with_its_holder(tmp_path):
    checkpoint = str(tmp_path / "ddpm_mnist.pth")
    code = (
        "import sys, time; from mindiffusion.training import files; "
        f"lock = files.hold_lock({checkpoint!r}); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.UserError) as error:
            files.hold_lock(checkpoint)
    finally:
        holder.kill()
        holder.wait()
    assert str(error.value) == (
        f"{checkpoint} is in use by another run (process {holder.pid}): wait for it "
        f"to end, or choose another --out"
    )


def test_a_resume_says_none_of_python_s_none(stand_in, tmp_path, capsys):
    argv = flags_of("mnist", "--out", str(tmp_path))
    assert train("mnist", [*argv, "--epochs", "1", "--seed", "3"], capsys)[0] == 0
    resumed = [*argv, "--epochs", "2", "--resume", "--ema", "0.9", "--amp", "bf16"]
    code, _, out = train("mnist", resumed, capsys)
    assert code == 0
    assert "None" not in out
    assert "--ema: the checkpoint has no average yet" in out
    assert "averaged with decay" not in out


def test_the_default_workers_count_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert devices.usable_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert devices.usable_cpus() == 64


def test_torch_takes_the_largest_seed_the_flag_allows():
    torch.manual_seed(2**63 - 1025 + 1023)


def test_resuming_an_export_says_it_is_one(stand_in, tmp_path, capsys):
    argv = flags_of("mnist", "--out", str(tmp_path / "run"), "--ema", "0.9")
    assert train("mnist", [*argv, "--epochs", "1"], capsys)[0] == 0
    first, second = tmp_path / "small.pth", tmp_path / "smaller.pth"
    export.main([str(tmp_path / "run" / "ddpm_mnist.pth"), str(first)])
    # an export of the export is still the averaged weights
    export.main([str(first), str(second)])
    said = capsys.readouterr().out
    assert said.count("the averaged weights and the recipe") == 2
    assert torch.load(second, weights_only=True)["averaged"] is True
    (tmp_path / "again").mkdir()
    os.replace(second, tmp_path / "again" / "ddpm_mnist.pth")
    argv = flags_of("mnist", "--out", str(tmp_path / "again"), "--ema", "0.9")
    code, line, _ = train("mnist", [*argv, "--epochs", "2", "--resume"], capsys)
    assert code == 2
    assert line == (
        f"--resume: {tmp_path / 'again' / 'ddpm_mnist.pth'} is an export "
        f"(mindiffusion.export), which holds the weights alone and cannot be "
        f"resumed: resume the checkpoint it was exported from"
    )


@pytest.mark.parametrize("command_main", [fid.main, figures_command.main])
def test_a_fake_data_checkpoint_with_a_data_root_names_what_it_trained_on(
    command_main, stand_in, tmp_path, capsys
):
    argv = flags_of("mnist", "--out", str(tmp_path), "--epochs", "1")
    assert train("mnist", argv, capsys)[0] == 0
    command = [str(tmp_path / "ddpm_mnist.pth"), "--data-root", str(tmp_path)]
    command += ["--device", "cpu"]
    if command_main is figures_command.main:
        command += ["--out", str(tmp_path / "figures")]
    with pytest.raises(SystemExit) as exit_info:
        command_main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "trained on --fake-data's random images, which no folder holds" in err
    assert "does not name its training set" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_without_a_checkpoint_says_so_before_the_dataset(
    script, tmp_path, capsys
):
    # no --fake-data, and no dataset in --data-root either
    argv = ["--device", "cpu", "--resume", "--out", str(tmp_path / "out")]
    argv += ["--data-root", str(tmp_path / "no_data")]
    code, line, _ = train(script, argv, capsys)
    assert code == 2
    out, name = tmp_path / "out", CHECKPOINTS[script]
    assert line == f"--resume: there is no checkpoint at {out}/{name}"


def test_on_windows_another_run_s_lock_is_one_sentence_with_its_holder(
    tmp_path, monkeypatch
):
    """msvcrt's lock, simulated: the holder keeps byte 0 locked, so reading it would
    raise PermissionError; the holder's process id comes after it."""
    checkpoint = str(tmp_path / "ddpm_mnist.pth")
    (tmp_path / "ddpm_mnist.pth.lock").write_text("\n4242\n")
    real_open = open

    class LockedFirstByte:
        def __init__(self, file):
            self.file = file

        def read(self, *args):
            if self.file.tell() == 0:
                raise PermissionError(errno.EACCES, "Permission denied")
            return self.file.read(*args)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.file.close()

    refuse_locks(monkeypatch, files.filelock.Timeout(checkpoint + ".lock"))
    monkeypatch.setattr(
        "builtins.open", lambda *args, **kw: LockedFirstByte(real_open(*args, **kw))
    )
    with pytest.raises(files.UserError) as error:
        files.hold_lock(checkpoint)
    assert str(error.value) == (
        f"{checkpoint} is in use by another run (process 4242): wait for it to end, "
        f"or choose another --out"
    )