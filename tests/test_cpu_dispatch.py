"""Runs right on every x86 CPU: ISA-safe kernel dispatch and precision chosen by the hardware.

The dispatch tests run fresh interpreters (ATen and cogview._C choose their CPU build once
per process) with ATEN_CPU_CAPABILITY set, and read back which builds of cogview._C were
entered: a build is entered only when both ATen and the CPU itself allow it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogview import cpu, precision
from cogview.modules.pb_relax import has_kernel

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "cogview" / "conf"
LEVELS = cpu.ISA_LEVELS
CPU_LEVEL = cpu.cpu_isa_level()
needs_x86_kernel = pytest.mark.skipif(not has_kernel("cpu") or CPU_LEVEL is None,
                                      reason="needs cogview._C on an x86 CPU with /proc/cpuinfo")

DISPATCH = """
import json, os, sys
import cogview                     # checks ATEN_CPU_CAPABILITY before any tensor op
import torch                       # loads the libraries cogview._C links against
late = sys.argv[1] if len(sys.argv) > 1 else ""
if late:                           # set after the check: only cogview._C's own guard is left
    os.environ["ATEN_CPU_CAPABILITY"] = late
from cogview import _C
info = _C.cpu_dispatch_info()
info["usable_builds"] = _C.cpu_capabilities()
print(json.dumps(info))
"""


def run_python(code: str, *args: str, env_capability: str | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if env_capability is not None:
        env["ATEN_CPU_CAPABILITY"] = env_capability
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)


def dispatch_info(env_capability: str | None = None, late: str = "") -> tuple[dict, str]:
    result = run_python(DISPATCH, late, env_capability=env_capability)
    assert result.returncode == 0, \
        f"exit {result.returncode} (-4 = SIGILL): {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def level(name: str) -> int:
    return LEVELS.index(name)


def check_never_above(info: dict, limit: str) -> None:
    """No build above ``limit`` was entered, listed as usable or made active."""
    entered = info["initialised"].split(",")
    assert all(level(name) <= level(limit) for name in entered), info
    assert all(level(name) <= level(limit) for name in info["usable_builds"]), info
    assert level(info["active"]) <= level(limit), info
    assert info["cpu"] == CPU_LEVEL, info


# ---------------------------------------------------------------------------
# cogview._C: which builds are entered


@needs_x86_kernel
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_aten_capability_bounds_the_builds_entered(capability):
    info, _ = dispatch_info(capability)
    expected = LEVELS[min(level(capability), level(CPU_LEVEL))]
    assert info["aten"] == expected and info["active"] == expected, info
    check_never_above(info, expected)
    assert "avx512" not in info["initialised"] and "avx512" not in info["usable_builds"]
    assert info["initialised"].split(",")[-1] == expected  # the selected build was filled


@needs_x86_kernel
def test_unset_capability_uses_the_best_build_the_cpu_runs():
    info, _ = dispatch_info(None)
    assert info["usable"] == min(info["aten"], CPU_LEVEL, key=level)
    check_never_above(info, CPU_LEVEL)
    assert info["active"] == info["usable"]  # every x86-64 GCC build compiles all three


@needs_x86_kernel
def test_extension_guard_holds_when_aten_asks_for_more_than_the_cpu_has():
    # ATEN_CPU_CAPABILITY=avx512 set after cogview's check: ATen reports AVX512 even on an AVX2
    # CPU; cogview._C must still stay within what CPUID reports.
    info, _ = dispatch_info(None, late="avx512")
    assert info["aten"] == "avx512", info
    assert info["usable"] == CPU_LEVEL
    check_never_above(info, CPU_LEVEL)


@needs_x86_kernel
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_kernel_tests_pass_on_the_selected_build(capability):
    """The kernel's own test file in a fresh process pinned to one build (the long-row cases
    run in the main suite)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    env["ATEN_CPU_CAPABILITY"] = capability
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         "tests/test_pb_relax_kernel.py", "-k", "not 4097 and not cuda"],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", result.stdout) and " failed" not in result.stdout
    info, _ = dispatch_info(capability)
    assert info["active"] == LEVELS[min(level(capability), level(CPU_LEVEL))]


# ---------------------------------------------------------------------------
# ATEN_CPU_CAPABILITY: bad values never reach ATen


@pytest.mark.parametrize("value,flags,expected,message", [
    ("avx512", {"avx2", "fma", "f16c"}, "avx2", "runs at most avx2"),
    ("AVX512", {"sse4_2"}, "default", "runs at most default"),
    ("avx9000", {"avx2", "fma", "f16c"}, None, "'avx9000' is not a level ATen knows"),
    ("", {"avx2", "fma", "f16c"}, None, None),
    ("AVX2", {"avx2", "fma", "f16c"}, "avx2", None),
    ("avx2", set(cpu.LEVEL_FLAGS["avx512"]), "avx2", None),
])
def test_check_aten_cpu_capability(monkeypatch, value, flags, expected, message):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    environ = {cpu.ENV: value}
    if message:
        with pytest.warns(RuntimeWarning, match=message):
            said = cpu.check_aten_cpu_capability(environ)
        assert "Unset it or set" in said
    else:
        assert cpu.check_aten_cpu_capability(environ) is None
    assert environ.get(cpu.ENV) == expected


TORCH_OPS = ("import cogview, torch; x = torch.randn(1 << 16); "
             "print(torch.backends.cpu.get_cpu_capability(), "
             "float(torch.sigmoid(x).sum() + x.exp().sum() + x.softmax(0).sum()))")


@pytest.mark.skipif(CPU_LEVEL not in ("default", "avx2"), reason="needs an x86 CPU without AVX-512")
def test_capability_above_the_cpu_is_lowered_not_sigill():
    result = run_python(TORCH_OPS, env_capability="avx512")
    assert result.returncode == 0, \
        f"exit {result.returncode} (-4 = SIGILL): {result.stderr[-2000:]}"
    assert f"runs at most {CPU_LEVEL}" in result.stderr
    assert result.stdout.split()[0] == CPU_LEVEL.upper()


@pytest.mark.skipif(CPU_LEVEL is None, reason="needs an x86 CPU with /proc/cpuinfo")
def test_garbage_capability_is_named_and_dropped():
    result = run_python(TORCH_OPS, env_capability="fastest")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ATEN_CPU_CAPABILITY='fastest' is not a level ATen knows" in result.stderr
    assert result.stdout.split()[0] in ("AVX2", "AVX512", "DEFAULT")


# ---------------------------------------------------------------------------
# What the CPU flags say


@pytest.mark.parametrize("flags,isa,bf16", [
    ({"sse4_2", "avx"}, "default", False),
    ({"avx", "avx2", "fma", "f16c"}, "avx2", False),
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}, "avx2", False),  # no DQ
    (set(cpu.LEVEL_FLAGS["avx512"]), "avx512", False),
    (set(cpu.LEVEL_FLAGS["avx512"]) | {"avx512_bf16"}, "avx512", True),
    (set(cpu.LEVEL_FLAGS["avx512"]) | {"amx_bf16", "amx_tile"}, "avx512", True),
])
def test_isa_level_and_native_bf16_from_flags(monkeypatch, flags, isa, bf16):
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    assert cpu.cpu_isa_level(frozenset(flags)) == isa
    assert cpu.native_bf16(frozenset(flags)) is bf16


def test_this_machine_is_described():
    summary = cpu.cpu_summary()
    assert summary["cpu"] and summary["cpu_isa"] in (*LEVELS, "unknown")
    flags = cpu.cpu_flags()
    if flags is not None:
        assert summary["cpu_native_bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


# ---------------------------------------------------------------------------
# precision: auto


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(precision, "_said", set())


@pytest.mark.parametrize("native,expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, caplog, fresh_log, native, expected):
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: native)
    with caplog.at_level(logging.INFO, logger="cogview.precision"):
        assert precision.resolve_precision("auto", "cpu") == expected
        assert precision.resolve_precision(None, "cpu") == expected
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines  # logged once per process
    reason = "CPU has native bf16" if native else "CPU has no native bf16"
    assert lines[0].startswith(f"precision auto -> {expected}: {reason}")


@pytest.mark.parametrize("bf16,expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_on_cuda_follows_the_gpu(monkeypatch, fresh_log, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    assert precision.auto_precision("cuda") == (
        expected, "Test GPU supports bf16" if bf16 else "Test GPU has no bf16 support")
    assert precision.resolve_precision("auto", "gpu") == expected


def test_explicit_precision_wins_and_emulated_bf16_warns_with_the_slowdown(monkeypatch, caplog,
                                                                          fresh_log):
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: False)
    rates = {torch.float32: 80.0, torch.bfloat16: 1.25}
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, *a, **k: rates[dtype])
    with caplog.at_level(logging.INFO, logger="cogview.precision"):
        assert precision.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
        assert precision.resolve_precision("bf16", "cpu") == "bf16-mixed"
        assert precision.resolve_precision(32, "cpu") == "32-true"
        assert precision.resolve_precision("bf16-mixed", "cuda") == "bf16-mixed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "precision=bf16-mixed on a CPU without native bf16" in warnings[0]
    assert "64x slower than fp32 here (1.2 vs 80.0 GFLOP/s)" in warnings[0]


def test_native_bf16_cpu_gets_no_warning(monkeypatch, caplog, fresh_log):
    monkeypatch.setattr(cpu, "native_bf16", lambda flags=None: True)
    with caplog.at_level(logging.WARNING, logger="cogview.precision"):
        precision.resolve_precision("bf16-mixed", "cpu")
    assert not caplog.records


def test_matmul_probe_measures_both_dtypes():
    fp32, bf16, factor = precision.cpu_slowdown(torch.bfloat16)
    assert fp32 > 0 and bf16 > 0 and factor == pytest.approx(fp32 / bf16)
    if cpu.native_bf16() is False and CPU_LEVEL == "avx2":
        assert factor > 2  # emulated bf16 on AVX2: tens of times slower, never close to fp32


def compose_config(directory: Path, name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from cogview.training import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(directory), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_configs_default_to_auto_and_the_trainer_gets_the_choice(monkeypatch, tmp_path, fresh_log):
    from cogview.training import build_trainer

    train = compose_config(CONF_DIR, "train", [
        "logger=none", f"output_dir={tmp_path}", "trainer.enable_progress_bar=false"])
    assert train.trainer.precision == "auto"
    assert compose_config(CONF_DIR, "app", []).precision == "auto"
    assert compose_config(CONF_DIR / "inference", "infer",
                          ["task=t2i", "ckpt=x"]).precision == "auto"
    for native, expected in ((False, "32-true"), (True, "bf16-mixed")):
        monkeypatch.setattr(cpu, "native_bf16", lambda flags=None, n=native: n)
        assert build_trainer(train).precision == expected
    explicit = compose_config(CONF_DIR, "train", [
        "logger=none", f"output_dir={tmp_path}", "precision=32-true"])
    assert build_trainer(explicit).precision == "32-true"  # explicit wins over native bf16


# ---------------------------------------------------------------------------
# The binary: instruction-set code only where the dispatcher guards it

ISA_NAMESPACES = {"avx2": ("cpu_avx2::", "::AVX2::"), "avx512": ("cpu_avx512::", "::AVX512::")}


def disassembled_functions(path: str) -> dict[str, list[str]]:
    """{demangled function name: instructions} of a shared object, by objdump."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], text=True,
                          capture_output=True, check=True).stdout
    functions, current = {}, None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            current = functions.setdefault(header.group(1), [])
        elif current is not None and "\t" in line:
            current.append(line.split("\t", 1)[1].strip())
    return functions


@pytest.mark.skipif(not has_kernel("cpu") or CPU_LEVEL is None or shutil.which("objdump") is None,
                    reason="needs cogview._C on x86 and objdump (binutils)")
def test_vector_code_lives_only_in_the_guarded_builds():
    """AVX/AVX2 code (VEX) only in the avx2/avx512 builds' namespaces, AVX-512 code (zmm, mask
    registers) only in the avx512 build's: shared inline functions and static initialisers
    (run at load time, before any check) are baseline code, so loading the extension and the
    portable build can never execute an instruction a CPU lacks."""
    from cogview import _C

    evex = re.compile(r"%zmm|%k[0-7]|\{%k")
    leaks = []
    for name, instructions in disassembled_functions(_C.__file__).items():
        uses_avx512 = any(evex.search(i) for i in instructions)
        uses_vex = uses_avx512 or any(i.startswith("v") for i in instructions)
        allowed = ISA_NAMESPACES["avx512"] + (() if uses_avx512 else ISA_NAMESPACES["avx2"])
        if uses_vex and not any(marker in name for marker in allowed):
            leaks.append(f"{name[:160]} ({'AVX-512' if uses_avx512 else 'AVX'})")
    assert not leaks, "vector code outside the guarded builds:\n" + "\n".join(leaks)
