import loralib
import pytest
import torch

from fs_pipeline import PipelineError
from fs_pipeline import device as device_module
from fs_pipeline.device import select_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with the given accelerators."""

    def set_machine(cuda=False, mps=False, bf16=True):
        monkeypatch.setattr(device_module, "_cuda_available", lambda: cuda)
        monkeypatch.setattr(device_module, "_mps_available", lambda: mps)
        monkeypatch.setattr(device_module, "_cuda_bf16_supported", lambda: bf16)

    return set_machine


def test_auto_prefers_cuda_with_bf16(machine):
    machine(cuda=True, mps=True)
    choice = select_device()
    assert (choice.type, choice.dtype) == ("cuda", torch.bfloat16)


def test_cuda_without_bf16_uses_fp32(machine):
    machine(cuda=True, bf16=False)
    assert select_device().dtype == torch.float32


def test_mps_falls_back_to_cpu_unless_forced(machine):
    machine(mps=True)
    fallback = select_device()
    assert (fallback.type, fallback.dtype) == ("cpu", torch.float32)
    assert "fell back" in fallback.reason
    assert select_device(force_mps=True).type == "mps"


def test_cpu_only_machine(machine):
    machine()
    choice = select_device()
    assert (choice.type, choice.precision) == ("cpu", "fp32")


def test_explicit_cpu_wins_over_cuda(machine):
    machine(cuda=True)
    assert select_device("cpu").type == "cpu"


def test_asking_for_a_missing_device_is_an_error(machine):
    machine()
    with pytest.raises(PipelineError, match="--device cuda was asked for, but torch sees no CUDA GPU"):
        select_device("cuda")
    with pytest.raises(PipelineError, match="MPS is not available"):
        select_device("mps")


def test_unknown_device_name(machine):
    with pytest.raises(PipelineError, match="unknown device 'tpu'"):
        select_device("tpu")


def test_autocast_lets_fp32_lora_run_on_bf16_base_weights():
    """The known LoRA failure: bf16 activations meet fp32 LoRA matrices. Under the chosen device's
    autocast the layer runs; without it the same layer raises a dtype error."""
    torch.manual_seed(0)
    layer = loralib.Linear(8, 8, r=2, lora_alpha=4)
    layer.weight.data = layer.weight.data.bfloat16()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        layer(x)
    bf16_cpu = device_module.DeviceChoice(torch.device("cpu"), torch.bfloat16, "test")
    with bf16_cpu.autocast():
        out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
