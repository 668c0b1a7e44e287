"""Which torch device a run uses, in which precision, and how many CPU threads torch may take.

``pick_device`` checks a requested device *before* any work starts: one that does not exist here
(``cuda`` on a machine without a GPU, ``cuda:3`` on a machine with one, a misspelling) is a
ValueError naming it, which the tasks never retry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then the CPU; any other name must exist on this machine."""
    if name in ("", "auto", None):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r} is not a torch device ({e}); use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} asked for, but torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Let torch use ``n`` intra-op threads inside the block; restore the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX), where bf16 autocast is a real speed-up."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older or newer torch without these probes: stay in fp32
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a step, or None for plain fp32.

    ``auto``: bf16 on CUDA GPUs that have it (else fp16, with a GradScaler) and on CPUs with native
    bf16; fp32 elsewhere (MPS, older CPUs, where bf16 would be emulated and slower).
    """
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
