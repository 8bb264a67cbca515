"""``precision: auto``: the autocast precision chosen by the hardware.

- CUDA: ``bf16-mixed`` where the GPU supports bf16, else ``16-mixed``.
- CPU: ``bf16-mixed`` only where the CPU has native bf16 matrix instructions (AVX512-BF16 or
  AMX-BF16, cogview.cpu.native_bf16); else ``32-true``. Without them bf16 matmuls are emulated
  and run tens of times slower than fp32 (measured on an AVX2 CPU: 1.2 vs 82.7 GFLOP/s).
- anything else (e.g. MPS): ``32-true``.

The choice and its reason are logged once per process. An explicit precision always wins;
asking for bf16 (or fp16) on a CPU without native support logs a warning with the slowdown
measured on this machine by a short matmul probe (cached for the process).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from cogview import cpu

log = logging.getLogger("cogview.precision")

AUTO = "auto"
# Lightning's names for the 16-bit autocast precisions, and the dtypes they run in.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Every 16-bit precision Lightning runs, autocast or true half.
HALF_DTYPES = {**AUTOCAST_DTYPES, "bf16-true": torch.bfloat16, "16-true": torch.float16}
# Other spellings Lightning accepts for the same precisions.
ALIASES = {"bf16": "bf16-mixed", "16": "16-mixed", 16: "16-mixed", "32": "32-true", 32: "32-true"}
_said: set[str] = set()  # messages already logged in this process


def _once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def device_type(device: torch.device | str | None) -> str:
    """``cpu``/``cuda``/... for a device, a device string or a Lightning accelerator name
    (``gpu`` and ``cuda`` mean CUDA; ``auto`` means CUDA when one is visible)."""
    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "gpu":
        return "cuda"
    try:
        return torch.device(device).type
    except RuntimeError:  # an accelerator name torch has no device for (e.g. "tpu")
        return str(device)


@functools.lru_cache(maxsize=None)
def matmul_gflops(dtype: torch.dtype, size: int = 256, seconds: float = 0.05) -> float:
    """GFLOP/s of a [size x size] @ [size x size] CPU matmul in ``dtype`` (the probe behind
    the slowdown warning; about 0.1 s on a CPU without native bf16)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or runs >= 200:
            return 2 * size ** 3 * runs / elapsed / 1e9


def cpu_slowdown(dtype: torch.dtype) -> tuple[float, float, float]:
    """(fp32 GFLOP/s, ``dtype`` GFLOP/s, slowdown factor) measured by the matmul probe."""
    fp32, low = matmul_gflops(torch.float32), matmul_gflops(dtype)
    return fp32, low, fp32 / max(low, 1e-9)


def _cpu_lacks_native(dtype: torch.dtype) -> bool:
    native = cpu.native_bf16() if dtype == torch.bfloat16 else cpu.native_fp16()
    if native is None:  # flags unreadable (not Linux): let the probe tell
        return cpu_slowdown(dtype)[2] > 2.0
    return not native


def auto_precision(device: torch.device | str | None = None) -> tuple[str, str]:
    """(precision, reason) that ``precision: auto`` resolves to on ``device``."""
    kind = device_type(device)
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name()} supports bf16"
        return "16-mixed", f"{torch.cuda.get_device_name()} has no bf16 support"
    if kind == "cpu":
        level = cpu.cpu_isa_level() or "unknown ISA"
        if _cpu_lacks_native(torch.bfloat16):
            return "32-true", f"CPU has no native bf16 ({level}; no AVX512-BF16/AMX-BF16)"
        return "bf16-mixed", "CPU has native bf16 (AVX512-BF16/AMX-BF16)"
    return "32-true", f"no 16-bit autocast chosen for {kind}"


def resolve_precision(precision: str | int | None, device: torch.device | str | None = None) -> str:
    """The precision to run: ``auto`` (or None) becomes the hardware's choice, logged once with
    its reason; anything else is returned as given (Lightning aliases normalised), with a
    warning when it asks a CPU for 16-bit autocast it has no native instructions for."""
    if precision is None or str(precision) == AUTO:
        chosen, reason = auto_precision(device)
        _once(logging.INFO, f"precision auto -> {chosen}: {reason}")
        return chosen
    chosen = ALIASES.get(precision, str(precision))
    dtype = HALF_DTYPES.get(chosen)
    if dtype is not None and device_type(device) == "cpu":
        warn_if_emulated(dtype, f"precision={chosen}")
    return chosen


def warn_if_emulated(dtype: torch.dtype, what: str) -> None:
    """Warns (once per process) when ``what`` makes a CPU without native ``dtype`` matrix
    instructions compute in ``dtype``, quoting the slowdown measured here."""
    if dtype not in (torch.bfloat16, torch.float16) or not _cpu_lacks_native(dtype):
        return
    fp32, low, factor = cpu_slowdown(dtype)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    _once(logging.WARNING,
          f"{what} on a CPU without native {name} ({cpu.cpu_model()}, "
          f"{cpu.cpu_isa_level() or 'unknown ISA'}): {name} matmuls measured {factor:.0f}x slower "
          f"than fp32 here ({low:.1f} vs {fp32:.1f} GFLOP/s); precision=auto picks 32-true")
