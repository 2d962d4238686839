import loralib
import pytest
import torch

from fs_pipeline import PipelineError
from fs_pipeline import device as device_module
from fs_pipeline import modeling
from fs_pipeline.device import compiles_by_default, flash_attention_available, select_device
from fs_pipeline.models import load_llm
from tests.test_modeling import LOGITS, batch_rows, pad

# compute capabilities, as torch.cuda.get_device_capability reports them
GPUS = {"P100": (6, 0), "V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "H100": (9, 0)}


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine with the given accelerators: `cuda` is a GPU's compute capability."""

    def set_machine(cuda=None, mps=False):
        monkeypatch.setattr(device_module, "_cuda_available", lambda: cuda is not None)
        monkeypatch.setattr(device_module, "_mps_available", lambda: mps)
        monkeypatch.setattr(device_module, "_cuda_capability", lambda device=None: cuda)
        # as torch answers: by default a T4 or V100 says yes too, counting bf16 emulation
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or cuda >= (8, 0))

    return set_machine


def test_auto_prefers_cuda_with_bf16(machine):
    machine(cuda=GPUS["H100"], mps=True)
    choice = select_device()
    assert (choice.type, choice.dtype) == ("cuda", torch.bfloat16)


@pytest.mark.parametrize("gpu, precision, dtype, flash", [
    ("P100", "auto", torch.float32, False),
    ("P100", "fp16", torch.float16, False),
    ("V100", "auto", torch.float16, False),
    ("V100", "fp32", torch.float32, False),
    ("T4", "auto", torch.float16, False),
    ("T4", "fp16", torch.float16, False),
    ("T4", "fp32", torch.float32, False),
    ("A100", "auto", torch.bfloat16, True),
    ("A100", "fp16", torch.float16, True),
    ("A100", "fp32", torch.float32, False),
    ("H100", "auto", torch.bfloat16, True),
    ("H100", "bf16", torch.bfloat16, True),
    ("H100", "fp16", torch.float16, True),
    ("H100", "fp32", torch.float32, False),
])
def test_precision_and_attention_kernel_per_gpu(machine, gpu, precision, dtype, flash):
    """bf16 only where native (not emulated), fp16 from Volta, fp32 before; flash attention only in fp16/bf16 from Ampere."""
    machine(cuda=GPUS[gpu])
    choice = select_device(precision=precision)
    assert (choice.type, choice.dtype) == ("cuda", dtype)
    assert flash_attention_available(choice.device, choice.dtype) == flash


@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_bf16_without_native_support_is_an_error(machine, gpu):
    machine(cuda=GPUS[gpu])
    capability = ".".join(map(str, GPUS[gpu]))
    with pytest.raises(PipelineError, match=rf"--precision bf16: this GPU \(compute capability {capability}\) has no native bf16"):
        select_device(precision="bf16")


def test_cpu_and_mps_run_fp32_only(machine):
    machine(mps=True)
    assert select_device("cpu", precision="fp32").dtype == torch.float32
    assert select_device(force_mps=True).dtype == torch.float32
    for device, precision in (("cpu", "bf16"), ("mps", "fp16")):
        with pytest.raises(PipelineError, match=f"--precision {precision} runs on CUDA GPUs only, and this run is on {device}"):
            select_device(device, force_mps=True, precision=precision)
    assert flash_attention_available(torch.device("cpu"), torch.float32)
    assert not flash_attention_available(torch.device("mps"), torch.float32)


def test_unknown_precision(machine):
    machine(cuda=GPUS["H100"])
    with pytest.raises(PipelineError, match="unknown precision 'fp8': use one of auto, bf16, fp16, fp32"):
        select_device(precision="fp8")


def test_attention_gets_the_causal_mask_where_flash_does_not_exist(tiny_model_dir, cpu, monkeypatch):
    """Where flash runs (here: CPU) attention gets no mask, as before. Elsewhere it gets the causal mask, asked for
    the compute dtype (autocast's, where on), and gives the same logits at every position of a padded and packed batch."""
    model = load_llm(tiny_model_dir, cpu)
    inputs, _ = pad(model, batch_rows(model))
    x = modeling.embed(model, inputs)
    assert modeling.causal_mask(model, x) is None
    with torch.inference_mode():
        flash_logits, _ = modeling.slow_forward(model, inputs)

    asked = []

    def no_flash(device, dtype):
        asked.append(dtype)
        return False

    monkeypatch.setattr(modeling, "flash_attention_available", no_flash)
    length = inputs.shape[-1]
    assert torch.equal(modeling.causal_mask(model, x), torch.ones(length, length, dtype=torch.bool).tril()[None, None])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        modeling.causal_mask(model, x)
    assert asked == [torch.float32, torch.bfloat16]
    with torch.inference_mode():
        masked_logits, _ = modeling.slow_forward(model, inputs)
    torch.testing.assert_close(masked_logits, flash_logits, **LOGITS)


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
    machine(cuda=GPUS["H100"])
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


@pytest.mark.parametrize("gpu, platform, compiles", [
    ("H100", "linux", True), ("T4", "linux", True), ("P100", "linux", False), ("H100", "win32", False),
])
def test_training_compiles_by_default_on_cuda_gpus_under_linux_only(machine, monkeypatch, gpu, platform, compiles):
    machine(cuda=GPUS[gpu])
    monkeypatch.setattr(device_module.sys, "platform", platform)
    assert compiles_by_default(select_device()) == compiles
    assert not compiles_by_default(select_device("cpu"))
