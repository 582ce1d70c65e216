"""The fast path: --amp, --channels-last and --compile reach the training step, the
default run is left as the notes have it, and sampling works on the device alone."""

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from types import SimpleNamespace

import mindiffusion.train as trainer
from conftest import cheap_ddpm
from mindiffusion.ddpm import DDPM
from mindiffusion.dummy import DummyEpsModel
from mindiffusion.training import cli, devices
from mindiffusion.unet import NaiveUnet

SCRIPTS = [
    ("mnist", "mnist"),
    ("cifar10", "cifar10"),
    ("celeba", "celeba"),
]
# one step on two fake images, with a single diffusion step
TINY_RUN = dict(n_epoch=1, device="cpu", batch_size=2, n_T=1, num_workers=0)


def channels_innermost(tensor: torch.Tensor) -> bool:
    """Whether a 4-d tensor is laid out channels_last: stepping one channel steps one
    element. (is_contiguous cannot tell when there is a single channel, as in MNIST.)
    """
    return tensor.stride(1) == 1


@pytest.fixture
def seen_steps(monkeypatch):
    """Record what each training step sees, and skip the expensive model."""
    steps = []

    def look(ddpm, x):
        # a matrix product: in float32, unless autocast lowers it to bfloat16
        product = nn.functional.linear(torch.ones(1, 2), torch.ones(2, 2))
        # the first weight is a convolution kernel (out, in, kh, kw) in every script
        weight = next(ddpm.eps_model.parameters())
        steps.append(
            dict(
                compute_dtype=product.dtype,
                batch_channels_last=channels_innermost(x),
                weight_channels_last=channels_innermost(weight),
            )
        )

    cheap_ddpm(monkeypatch, on_forward=look)
    return steps


def native_bf16(monkeypatch, native: bool):
    """Make this CPU look as if it had bfloat16 units, or as if it had none."""
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native, raising=False
    )


@pytest.mark.parametrize("module, train", SCRIPTS)
def test_the_default_run_is_float32_and_contiguous(
    module, train, seen_steps, tmp_path, monkeypatch
):
    native_bf16(monkeypatch, True)
    trainer.train(train, out=str(tmp_path), fake_data=2, **TINY_RUN)
    assert seen_steps[0]["compute_dtype"] == torch.float32
    assert not seen_steps[0]["batch_channels_last"]
    assert not seen_steps[0]["weight_channels_last"]


@pytest.mark.parametrize("module, train", SCRIPTS)
def test_amp_autocasts_the_forward_pass_to_bfloat16(
    module, train, seen_steps, tmp_path, monkeypatch, capsys
):
    native_bf16(monkeypatch, True)
    trainer.train(train, out=str(tmp_path), fake_data=2, amp="auto", **TINY_RUN)
    assert seen_steps[0]["compute_dtype"] == torch.bfloat16
    # said once, as the run's precision, with no warning beside it
    said = [line for line in capsys.readouterr().out.splitlines() if "bfloat16" in line]
    assert said == ["training on cpu in bfloat16 autocast (--amp)"]


def test_amp_without_native_bfloat16_says_so_and_stays_float32(
    seen_steps, tmp_path, monkeypatch, capsys
):
    native_bf16(monkeypatch, False)
    trainer.train(
        "cifar10",
        out=str(tmp_path),
        fake_data=2,
        amp="auto",
        **TINY_RUN
    )
    assert seen_steps[0]["compute_dtype"] == torch.float32
    lines = [line for line in capsys.readouterr().out.splitlines() if "--amp" in line]
    assert lines == [
        "--amp: this CPU has no native bfloat16, so training stays in float32"
    ]


@pytest.mark.parametrize(
    "capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_a_gpu_has_native_bfloat16_from_ampere_on(
    capability, native, monkeypatch, capsys
):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Some GPU")
    assert devices.has_native_bf16(torch.device("cuda", 0)) is native
    out = capsys.readouterr().out
    if native:
        assert out == ""
    else:
        assert out == (
            "--amp: this GPU (Some GPU) has no native bfloat16, "
            "so training stays in float32\n"
        )


@pytest.mark.parametrize("module, train", SCRIPTS)
def test_channels_last_reaches_the_weights_and_leaves_the_batch_as_it_is(
    module, train, seen_steps, tmp_path
):
    trainer.train(train, out=str(tmp_path), fake_data=2, channels_last=True, **TINY_RUN)
    assert not seen_steps[0]["batch_channels_last"]
    assert seen_steps[0]["weight_channels_last"]


@pytest.mark.parametrize(
    "eps_model, x",
    [
        (NaiveUnet(3, 3, 8), torch.randn(2, 3, 32, 32)),
        (DummyEpsModel(1), torch.randn(2, 1, 28, 28)),
    ],
)
def test_channels_last_weights_make_every_activation_channels_last(eps_model, x):
    """The notes' x.to(device) leaves the batch contiguous: a convolution with
    channels_last weights returns channels_last all the same."""
    eps_model.to(memory_format=torch.channels_last)
    layouts = []
    for module in eps_model.modules():
        if isinstance(module, nn.Conv2d) and module.out_channels > 1:
            module.register_forward_hook(
                lambda m, inputs, out: layouts.append(channels_innermost(out))
            )
    eps_model(x, torch.rand(2))
    assert layouts and all(layouts)


@pytest.mark.parametrize("module, train", SCRIPTS)
def test_compile_compiles_the_noise_model_in_place(
    module, train, seen_steps, tmp_path, monkeypatch, capsys
):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self: compiled.append(self))
    ddpm = trainer.train(train, out=str(tmp_path), fake_data=2, compile=True,
                         **TINY_RUN)
    # nn.Module.compile, unlike torch.compile, keeps the module and its state_dict
    assert compiled == [ddpm.eps_model]
    # the wait before the first step is announced
    assert capsys.readouterr().out.startswith(
        "--compile: the noise model compiles in the first training step"
    )


class StopBeforeTraining(Exception):
    pass


@pytest.fixture
def loader_options(monkeypatch):
    """What the trainer's DataLoader is given; it then stops the run."""
    options = {}

    def data_loader(dataset, **given):
        options.update(given)
        raise StopBeforeTraining

    monkeypatch.setattr(trainer, "DataLoader", data_loader)
    return options


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_the_loader_pins_memory_on_cuda(device, pinned, loader_options, monkeypatch,
                                        tmp_path):
    monkeypatch.setattr(trainer, "resolve_device", lambda name: torch.device(device))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)
    with pytest.raises(StopBeforeTraining):
        trainer.train("cifar10", out=str(tmp_path), fake_data=2, **TINY_RUN)
    assert loader_options["pin_memory"] is pinned


@pytest.mark.parametrize("module, train", SCRIPTS)
def test_num_workers_reaches_the_loader(module, train, tmp_path, loader_options):
    with pytest.raises(StopBeforeTraining):
        run = dict(TINY_RUN, num_workers=2)
        trainer.train(train, out=str(tmp_path), fake_data=2, **run)
    assert loader_options["num_workers"] == 2


class RecordingEps(nn.Module):
    """Predicts zero noise, and notes whether autograd was switched off for it."""

    def __init__(self):
        super().__init__()
        self.inference_mode = []

    def forward(self, x, t):
        self.inference_mode.append(torch.is_inference_mode_enabled())
        return torch.zeros_like(x)


def test_sampling_runs_in_inference_mode_and_training_does_not():
    ddpm = DDPM(RecordingEps(), (1e-4, 0.02), n_T=3)
    ddpm(torch.zeros(2, 1, 4, 4))
    ddpm.sample(2, (1, 4, 4), torch.device("cpu"))
    assert ddpm.eps_model.inference_mode == [False, True, True, True]


class TensorDevices(TorchFunctionMode):
    """Record the device of every tensor that a torch function returns."""

    def __init__(self):
        super().__init__()
        self.devices = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, tuple) else (result,):
            if isinstance(value, torch.Tensor):
                self.devices.add(value.device.type)
        return result


def test_sampling_makes_every_tensor_on_the_device_it_samples_on():
    # the meta device stands for a GPU: a tensor made on the CPU would show up here
    ddpm = DDPM(NaiveUnet(1, 1, n_feat=8), (1e-4, 0.02), n_T=3).to("meta")
    with TensorDevices() as mode:
        x = ddpm.sample(2, (1, 32, 32), torch.device("meta"))
    assert x.device.type == "meta"
    assert mode.devices == {"meta"}


def test_amp_on_mps_says_it_stays_float32(capsys):
    assert devices.has_native_bf16(torch.device("mps")) is False
    assert capsys.readouterr().out == (
        "--amp: bfloat16 autocast is for CUDA and CPUs; mps stays in float32\n"
    )


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("module, train", SCRIPTS)
def test_fast_compiles_on_a_cpu_and_takes_bfloat16_where_it_is_native(
    module, train, native, seen_steps, tmp_path, monkeypatch, capsys
):
    native_bf16(monkeypatch, native)
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self: compiled.append(self))
    ddpm = trainer.train(train, out=str(tmp_path), fake_data=2, fast=True, **TINY_RUN)
    assert compiled == [ddpm.eps_model]
    dtype = torch.bfloat16 if native else torch.float32
    assert seen_steps[0]["compute_dtype"] == dtype
    # channels_last is not on the fast path
    assert not seen_steps[0]["weight_channels_last"]
    assert "--fast on cpu: --amp auto --compile\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    "device, given, said",
    [
        ("cuda", {}, "--fast on cuda: --amp auto --compile"),
        ("cuda", dict(amp="fp16"), "--fast on cuda: --amp fp16 --compile"),
        ("cpu", dict(channels_last=True),
         "--fast on cpu: --amp auto --channels-last --compile"),
        ("mps", {}, "--fast on mps: nothing, for nothing measured pays there yet"),
    ],
)
def test_fast_takes_the_device_s_knobs_and_keeps_the_flags_given(
    device, given, said, capsys
):
    args = SimpleNamespace(**{**cli.DEFAULTS, "fast": True, **given})
    trainer.take_fast_path(args, torch.device(device))
    assert capsys.readouterr().out == said + "\n"
    for name, value in given.items():
        assert getattr(args, name) == value
