"""What this CPU can run, read without importing torch.

Two facts decide how cogview runs on a CPU:

- its vector instruction set (ISA): ``default``, ``avx2`` or ``avx512``, the levels ATen and
  ``cogview._C`` compile their kernels for. Code built for a level the CPU lacks dies with
  SIGILL, so nothing may ask for more than the CPU has;
- whether it has native bf16 / fp16 matrix instructions (AVX512-BF16, AMX-BF16 / AVX512-FP16,
  AMX-FP16). Without them a bf16 matmul is emulated and runs tens of times slower than fp32,
  which is why ``precision: auto`` picks fp32 there (cogview.precision).

``check_aten_cpu_capability()`` runs when the package is imported: an ``ATEN_CPU_CAPABILITY``
above what the CPU runs (which would make ATen itself execute AVX-512 code on an AVX2 CPU) is
lowered to the best usable level, and a value ATen does not know is dropped, each with a
warning that names the value and the fix. ATen reads the variable at its first kernel call,
so this works whenever cogview is imported before the first tensor operation.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from pathlib import Path

# ATen's x86 levels, lowest first, and the CPU flags (as /proc/cpuinfo names them) each needs:
# ATen's own test (cpuinfo) for AVX512 is avx512vl+bw+dq+fma, for AVX2 avx2+fma; cogview._C's
# builds also use avx512f and f16c.
ISA_LEVELS = ("default", "avx2", "avx512")
LEVEL_FLAGS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
ENV = "ATEN_CPU_CAPABILITY"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read.
    Linux lists only features the OS has enabled (e.g. AVX-512 state saved by XSAVE)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_isa_level(flags: frozenset[str] | None = None) -> str | None:
    """The highest ISA level the CPU runs (``default``/``avx2``/``avx512``), or None when it
    cannot be told (not x86, or no /proc/cpuinfo)."""
    flags = cpu_flags() if flags is None else flags
    if flags is None or not is_x86():
        return None
    best = "default"
    for level in ISA_LEVELS[1:]:
        if LEVEL_FLAGS[level] <= flags:
            best = level
    return best


def native_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16), False
    when it lacks them, None when its flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(f in flags for f in NATIVE_BF16_FLAGS)


def native_fp16(flags: frozenset[str] | None = None) -> bool | None:
    """Like native_bf16 for fp16 (AVX512-FP16 or AMX-FP16)."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else any(f in flags for f in NATIVE_FP16_FLAGS)


def cpu_summary() -> dict:
    """The CPU facts benchmarks and logs record beside their numbers."""
    flags = cpu_flags()
    level = cpu_isa_level(flags)
    return {
        "cpu": cpu_model(),
        "cpu_isa": level if level is not None else "unknown",
        "cpu_native_bf16": native_bf16(flags),
        "cpu_native_fp16": native_fp16(flags),
        "cpu_flags_isa": sorted(f for f in flags or ()
                                if f.startswith(("avx", "amx", "fma", "f16c"))),
    }


def check_aten_cpu_capability(environ: os._Environ | dict | None = None) -> str | None:
    """Keeps ``ATEN_CPU_CAPABILITY`` within what the CPU runs; returns the warning given, if any.

    Above the CPU's level: lowered to the CPU's best level (ATen would otherwise run, e.g.,
    AVX-512 kernels on an AVX2 CPU and die with SIGILL). Not a level ATen knows: removed, so
    ATen picks the best level itself. Non-x86 CPUs and unreadable flags leave it alone.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(ENV)
    if value is None or not is_x86():
        return None
    requested = value.strip().lower()
    if not requested:  # set but empty: the same as unset
        environ.pop(ENV)
        return None
    best = cpu_isa_level()
    if requested not in ISA_LEVELS:
        environ.pop(ENV)
        message = (f"{ENV}={value!r} is not a level ATen knows ({', '.join(ISA_LEVELS)}); "
                   f"ignoring it, so the best level this CPU runs is used"
                   f"{f' ({best})' if best else ''}. Unset it or set one of those levels.")
    elif best is not None and ISA_LEVELS.index(requested) > ISA_LEVELS.index(best):
        environ[ENV] = best
        message = (f"{ENV}={value!r} asks for {requested} code, but this CPU ({cpu_model()}) "
                   f"runs at most {best}; using {best} instead (code built for {requested} "
                   f"would die with SIGILL here). Unset it or set {ENV}={best} or lower.")
    else:
        if value != requested:
            environ[ENV] = requested  # ATen compares case-sensitively
        return None
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message
