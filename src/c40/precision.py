"""Device and numeric precision: one policy for training, inference and the benchmarks.

Which device, which autocast dtype (and whether fp16 needs a GradScaler), which backend
settings. CUDA-only branches are kept to a line each; everything else is the CPU path too.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from c40.errors import ConfigError

# cuBLAS refuses deterministic mode unless this is set before its first handle is created
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility); ":4096:8" costs ~24 MiB of
# GPU memory per stream and nothing measurable for a net of this size.
CUBLAS_WORKSPACE = ":4096:8"
AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_device(name: str = "auto") -> torch.device:
    """auto: the first CUDA GPU when there is one, else the CPU; an unavailable GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), which makes CPU bf16 autocast pay."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `mode` (auto | bf16 | fp16 | off) on `device`; None is fp32.

    auto: bf16 on CUDA GPUs that have it natively (Ampere and later: no GradScaler, fp32's
    range), else fp16 + GradScaler; bf16 on CPUs with native bf16 (measured 1.7x faster than
    fp32 on AVX512-BF16); fp32 elsewhere (emulated bf16 measured ~10x slower on an AVX2 CPU)."""
    if mode == "off":
        return None
    if mode == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def amp_name(dtype: torch.dtype | None) -> str:
    """The config spelling of a resolved autocast dtype (what a checkpoint records)."""
    return AMP_NAMES[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The one autocast context of a run: a no-op in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Deterministic algorithms (and the cuBLAS workspace they need), or cuDNN autotuning.

    Call before the first CUDA kernel: the workspace variable is read when cuBLAS starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    # autotuning picks the fastest conv kernels for the (fixed) batch shapes; its choice may
    # vary between runs, so deterministic runs go without it
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


class _Fp32Conv2d(nn.Conv2d):
    """A Conv2d that runs in fp32 under autocast. Swapped in as the class of existing modules
    (not a patched bound `forward`): deep copies such as the EMA model keep their own weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def keep_depthwise_fp32(model: nn.Module, amp: torch.dtype | None, device: torch.device) -> int:
    """Under CPU bf16 autocast, run depthwise convs (groups == channels) in fp32; returns how many.

    oneDNN's bf16 depthwise backward is pathological: a 96-channel 3x3 stride-2 depthwise conv at
    8x8, batch 128, took 30.7 ms fwd+bwd in bf16 vs 1.0 ms in fp32 (27% of the strided net's whole
    step); stride 1 is 5.9 vs 4.5 ms. Depthwise convs are a tiny share of the FLOPs, so fp32 costs
    nothing. CUDA (cuDNN) has no such cliff: left alone there."""
    if amp != torch.bfloat16 or device.type != "cpu":
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels:
            m.__class__ = _Fp32Conv2d
            n += 1
    return n
