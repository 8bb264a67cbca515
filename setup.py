"""Builds cogview._C, the PB-relax softmax kernel.

The C++ (CPU) path is always built. The CUDA path is added when the installed torch
was built with CUDA and nvcc is found (set COGVIEW_FORCE_CPU=1 to skip it).
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

CSRC = os.path.join("cogview", "csrc")


def extension():
    # The AVX2 / AVX-512 files build the same CPU kernels for those instruction sets
    # (set by a pragma inside each file); pb_relax_softmax.cpp picks one at run time.
    sources = [os.path.join(CSRC, f"pb_relax_softmax{part}.cpp") for part in ("", "_avx2", "_avx512")]
    cxx_flags = ["-O3", "-std=c++17"]
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("COGVIEW_FORCE_CPU", "0") != "1"
    )
    if with_cuda:
        sources.append(os.path.join(CSRC, "pb_relax_softmax_cuda.cu"))
        return CUDAExtension(
            "cogview._C",
            sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
        )
    return CppExtension("cogview._C", sources, extra_compile_args={"cxx": cxx_flags})


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
