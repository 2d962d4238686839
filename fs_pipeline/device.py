"""Device and precision selection, in one place.

Policy: cuda > mps > cpu unless the user names a device. MPS falls back to CPU unless forced, since
several ops the models use are missing or slow there. Compute runs in bf16 where the device supports
it and fp32 otherwise. Frozen base weights are stored in the compute dtype; trainable LoRA weights stay
fp32 and every forward runs under `autocast`, which casts each matmul's inputs to one dtype. That is
what rules out the bf16/fp32 mismatch of LoRA layers by design.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from loguru import logger

from fs_pipeline import PipelineError

DEVICE_NAMES = ("cuda", "mps", "cpu")


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
        return {torch.bfloat16: "bf16", torch.float32: "fp32"}[self.dtype]

    def autocast(self):
        """Context for every forward pass: matmuls run in `dtype`, whatever their inputs' dtypes."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.dtype)

    def describe(self) -> str:
        return f"{self.device} ({self.precision}; {self.reason})"


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _mps_available() -> bool:
    return torch.backends.mps.is_available()


def _cuda_bf16_supported() -> bool:
    return torch.cuda.is_bf16_supported()


def select_device(requested: str | None = None, force_mps: bool = False) -> DeviceChoice:
    """Pick the device and compute dtype. `requested` is one of DEVICE_NAMES, or None for automatic."""
    if requested is not None and requested not in DEVICE_NAMES:
        raise PipelineError(f"unknown device '{requested}': use one of {', '.join(DEVICE_NAMES)}")

    if requested == "cuda" and not _cuda_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA GPU: drop --device or use --device cpu")
    if requested == "mps" and not _mps_available():
        raise PipelineError("--device mps was asked for, but MPS is not available: drop --device or use --device cpu")

    if requested == "cpu":
        return DeviceChoice(torch.device("cpu"), torch.float32, "asked for")
    if requested == "cuda" or (requested is None and _cuda_available()):
        dtype = torch.bfloat16 if _cuda_bf16_supported() else torch.float32
        return DeviceChoice(torch.device("cuda"), dtype, "asked for" if requested else "auto: CUDA GPU found")
    if requested == "mps" or (requested is None and _mps_available()):
        if force_mps:
            return DeviceChoice(torch.device("mps"), torch.float32, "MPS forced with --force-mps")
        logger.warning("MPS is available but falls back to CPU; pass --force-mps to use it anyway")
        return DeviceChoice(torch.device("cpu"), torch.float32, "auto: MPS found, fell back to CPU")
    return DeviceChoice(torch.device("cpu"), torch.float32, "auto: no GPU found")
