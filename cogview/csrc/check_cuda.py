"""Compile the CUDA kernel with nvcc as a syntax and type check; no GPU needed.

    python -m cogview.csrc.check_cuda [--arch 90 --arch 80]   (run by `make check-cuda`)

Compiles cogview/csrc/pb_relax_softmax_cuda.cu to an object file in a temporary folder,
against the installed torch's headers, with the flags setup.py gives nvcc, then checks
that pb_relax_softmax.cpp compiles with -DWITH_CUDA too (its CUDA dispatch is otherwise
never compiled on CPU machines). Prints each command; exits non-zero with the compiler's
output when one fails, and exits 0 with "skipped: nvcc not found" on machines without
the CUDA toolkit.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

CSRC = Path(__file__).resolve().parent
SOURCE = CSRC / "pb_relax_softmax_cuda.cu"
HOST_SOURCE = CSRC / "pb_relax_softmax.cpp"
DEFAULT_ARCHS = ("90", "80")  # Hopper (H100/H200), Ampere (A100)
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]  # as setup.py passes them


def find_nvcc() -> str | None:
    """nvcc from PATH, else from CUDA_HOME / CUDA_PATH, else None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _common_flags() -> list[str]:
    """Defines and include dirs shared by the nvcc and the host compiler checks."""
    flags = ["-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    # CPU-only torch wheels ship c10/cuda headers but not the file CMake generates for them.
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in include_paths()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for directory in [*include_paths(), sysconfig.get_paths()["include"], str(CSRC)]:
        flags += ["-I", directory]
    return flags


def nvcc_command(nvcc: str, output: Path, archs: list[str]) -> list[str]:
    """The nvcc command line that compiles SOURCE to `output`."""
    # COMMON_NVCC_FLAGS: what torch's BuildExtension adds for every .cu (half operators off, ...).
    command = [nvcc, "-c", str(SOURCE), "-o", str(output), *COMMON_NVCC_FLAGS, *NVCC_FLAGS,
               "-Xcompiler", "-fPIC"]
    for arch in archs:
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return command + _common_flags()


def host_command() -> list[str]:
    """Syntax check of HOST_SOURCE as the CUDA build compiles it (with -DWITH_CUDA)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    return [cxx, "-fsyntax-only", "-std=c++17", str(HOST_SOURCE), *_common_flags()]


def run(command: list[str], what: str) -> bool:
    """Runs a compiler; prints the command, and its output on failure."""
    print("check_cuda:", shlex.join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout + result.stderr, file=sys.stderr)
        print(f"check_cuda: FAILED: {what} (exit status {result.returncode})", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", metavar="SM",
                        help="compute capability to compile for, e.g. 90 "
                        f"(default: {', '.join(DEFAULT_ARCHS)})")
    args = parser.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda: skipped: nvcc not found (put it on PATH or set CUDA_HOME)")
        return 0
    archs = args.arch or list(DEFAULT_ARCHS)
    with tempfile.TemporaryDirectory(prefix="cogview-check-cuda-") as tmp:
        output = Path(tmp) / "pb_relax_softmax_cuda.o"
        if not run(nvcc_command(nvcc, output, archs), f"nvcc could not compile {SOURCE.name}"):
            return 1
        size = output.stat().st_size
    if not run(host_command(), f"{HOST_SOURCE.name} does not compile with -DWITH_CUDA"):
        return 1
    print(f"check_cuda: ok: {SOURCE.name} compiles for sm_{', sm_'.join(archs)} ({size} bytes "
          f"of object code); {HOST_SOURCE.name} compiles with -DWITH_CUDA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
