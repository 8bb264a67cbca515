"""The kernel on emulated CPUs without AVX-512 (and without AVX2), whatever CPU runs the tests.

Debian's qemu-user runs this interpreter as an x86-64 CPU of a chosen model, with that model's
CPUID; an instruction the model lacks is a SIGILL there, as on real hardware. qemu 7.2 emulates
no AVX-512 at all, so these runs prove that nothing in cogview._C (table filling and static
initialisation included) executes AVX-512 code on such a CPU, even on a machine that has it.
About 8-10x slower than native: ``make test-emulated`` (installs qemu-user with apt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cpu_dispatch import DISPATCH

ROOT = Path(__file__).resolve().parents[1]
QEMU = shutil.which("qemu-x86_64")
# CPU models without the features TCG cannot emulate (no warnings); Haswell: AVX2 + FMA + F16C,
# no AVX-512. SandyBridge: AVX, no AVX2 (the portable build).
CPU_MODELS = {
    "avx2": "Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid",
    "default": "SandyBridge,-pcid,-x2apic,-tsc-deadline",
}
KERNEL_TESTS = ("every_cpu_build or gradcheck or rows_without or key_mask_shapes or "
                "non_contiguous or extension_is_built or (matches_reference and 64 and float32)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.emulated,
    pytest.mark.skipif(QEMU is None, reason="needs qemu-x86_64: apt-get install qemu-user "
                       "(make test-emulated does)"),
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="emulates an x86-64 CPU"),
]


def emulated(model: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run([QEMU, "-cpu", CPU_MODELS[model], sys.executable, *args], cwd=ROOT,
                          env=env, text=True, capture_output=True, timeout=timeout)


@pytest.mark.parametrize("model", list(CPU_MODELS))
def test_dispatch_on_an_emulated_cpu(model):
    result = emulated(model, "-c", DISPATCH, timeout=300)
    assert result.returncode == 0, \
        f"exit {result.returncode} (-4/132 = SIGILL): {result.stderr[-2000:]}"
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["cpu"] == model and info["usable"] == model and info["active"] == model, info
    assert "avx512" not in info["initialised"] and "avx512" not in info["usable_builds"], info
    assert info["initialised"].split(",")[-1] == model


@pytest.mark.parametrize("model", list(CPU_MODELS))
def test_kernel_tests_pass_on_an_emulated_cpu(model):
    result = emulated(model, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                      "tests/test_pb_relax_kernel.py", "-k", KERNEL_TESTS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout) and " failed" not in result.stdout
