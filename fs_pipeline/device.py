"""Device and precision selection, in one place.

Policy: cuda > mps > cpu unless the user names a device. MPS falls back to CPU unless forced, since
several ops the models use are missing or slow there. Frozen base weights are stored in the compute dtype;
trainable LoRA weights stay fp32 and every forward runs under `autocast`, which casts each matmul's inputs
to one dtype. That is what rules out the bf16/fp32 mismatch of LoRA layers by design.

Precision (`--precision`): auto picks what the hardware runs natively.
  CUDA, compute capability >= 8.0 (Ampere on: A100, RTX 30xx, H100)  bf16
  CUDA, 7.x (Volta, Turing: V100, T4, RTX 20xx)                        fp16 (tensor cores; training adds a gradient scaler)
  CUDA, < 7.0 (Pascal and older)                                       fp32 (fp16 brings no speed there: 1/64 of fp32 on GTX 10xx)
  MPS and CPU                                                          fp32 (the only precision offered there)
bf16 counts only where the GPU has it natively: torch's default check also counts emulation, which
pre-Ampere GPUs report and which is no faster than fp32. Asking for a precision the device lacks is an error.
"""

import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from loguru import logger

from fs_pipeline import PipelineError

DEVICE_NAMES = ("cuda", "mps", "cpu")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
AMPERE = (8, 0)  # SDPA's flash kernel starts here on CUDA (native bf16 too, which torch reports itself)
VOLTA = (7, 0)  # fp16 tensor cores start here


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def precision(self) -> str:
        return {dtype: name for name, dtype in DTYPES.items()}[self.dtype]

    def autocast(self):
        """Context for every forward pass: matmuls run in `dtype`, whatever their inputs' dtypes."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Scales the loss before backward so that small fp16 gradients don't flush to zero; it skips a step whose
        gradients overflowed and lowers its scale. A no-op in bf16 and fp32, whose range needs no scaling."""
        return torch.amp.GradScaler(self.type, enabled=self.dtype == torch.float16)

    def describe(self) -> str:
        return f"{self.device} ({self.precision}; {self.reason})"


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def _cuda_capability(device: torch.device | None = None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _cuda_bf16_native() -> bool:
    # the default (including_emulation=True) also says yes on a T4 or V100, where bf16 is emulated
    return torch.cuda.is_bf16_supported(including_emulation=False)


def select_device(requested: str | None = None, force_mps: bool = False, precision: str = "auto") -> DeviceChoice:
    """Pick the device and compute dtype. `requested` is one of DEVICE_NAMES, or None for automatic;
    `precision` one of PRECISIONS."""
    if requested is not None and requested not in DEVICE_NAMES:
        raise PipelineError(f"unknown device '{requested}': use one of {', '.join(DEVICE_NAMES)}")
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")

    if requested == "cuda" and not _cuda_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA GPU: drop --device or use --device cpu")
    if requested == "mps" and not _mps_available():
        raise PipelineError("--device mps was asked for, but MPS is not available: drop --device or use --device cpu")

    if requested == "cuda" or (requested is None and _cuda_available()):
        dtype, why = _cuda_dtype(precision)
        return DeviceChoice(torch.device("cuda"), dtype, f"{'asked for' if requested else 'auto: CUDA GPU found'}; {why}")
    if requested == "mps" or (requested is None and _mps_available()):
        if force_mps:
            device, reason = torch.device("mps"), "MPS forced with --force-mps"
        else:
            logger.warning("MPS is available but falls back to CPU; pass --force-mps to use it anyway")
            device, reason = torch.device("cpu"), "auto: MPS found, fell back to CPU"
    else:
        device, reason = torch.device("cpu"), "asked for" if requested == "cpu" else "auto: no GPU found"
    if precision not in ("auto", "fp32"):
        raise PipelineError(f"--precision {precision} runs on CUDA GPUs only, and this run is on {device.type}: "
                            "drop --precision or pass fp32")
    return DeviceChoice(device, torch.float32, reason)


def _cuda_dtype(precision: str) -> tuple[torch.dtype, str]:
    """The compute dtype on the current CUDA GPU for `precision`, and why."""
    capability = _cuda_capability()
    generation = f"compute capability {capability[0]}.{capability[1]}"
    native_bf16 = _cuda_bf16_native()
    if precision == "bf16" and not native_bf16:
        raise PipelineError(f"--precision bf16: this GPU ({generation}) has no native bf16, which needs 8.0 (Ampere) or newer: "
                            "pass --precision fp16, fp32 or auto")
    if precision != "auto":
        return DTYPES[precision], f"--precision {precision}"
    if native_bf16:
        return torch.bfloat16, f"bf16, native on {generation}"
    if capability >= VOLTA:
        return torch.float16, f"fp16, since {generation} has fp16 tensor cores but no native bf16"
    return torch.float32, f"fp32, since {generation} has neither native bf16 nor fast fp16"


def flash_attention_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's flash SDPA kernel runs on `device` in `dtype`. fish-speech forces that kernel for causal
    attention without a mask, and where it does not exist, SDPA raises 'No available kernel'."""
    if device.type == "cpu":
        return True  # PyTorch's CPU flash kernel takes every float dtype
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16) and _cuda_capability(device) >= AMPERE
    return False  # MPS: no flash kernel to rely on


def compiles_by_default(choice: DeviceChoice) -> bool:
    """Whether training compiles its transformer blocks unless told otherwise: on CUDA GPUs of Volta or later under
    Linux, where inductor's Triton kernels run (Triton has no Windows build), the compiled blocks take about half
    the time and less memory than eager ones (benchmarks/RESULTS.md); elsewhere compiling costs more than it gives."""
    return choice.type == "cuda" and sys.platform == "linux" and _cuda_capability(choice.device) >= VOLTA


def on_local_gpu(choice: DeviceChoice, local_rank: int) -> DeviceChoice:
    """`choice` moved to the GPU numbered `local_rank`: torchrun's processes on one machine take one GPU each."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise PipelineError(f"torchrun started more processes on this machine than the {count} GPU(s) torch sees: "
                            f"pass --nproc-per-node {count} (or fewer)")
    return DeviceChoice(torch.device("cuda", local_rank), choice.dtype, f"{choice.reason}; GPU {local_rank} of this machine's {count}")
