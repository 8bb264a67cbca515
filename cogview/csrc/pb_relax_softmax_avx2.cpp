// AVX2 + FMA build of the PB-relax CPU row kernels, chosen at run time on CPUs
// that have them (see cpu_kernels() in pb_relax_softmax.cpp). The instruction set comes
// from the pragma below rather than from compiler flags because setuptools compiles all
// sources of one extension with the same flags; ATen builds its own kernels once per
// instruction set too. Only GCC on x86-64 gets this build; elsewhere the table stays empty
// and the portable build runs.
#include "pb_relax_softmax.h"

// Above the target pragma, so compiled for the baseline ISA: safe to call on any CPU. Nothing
// below the pragma runs before the dispatcher has checked the CPU.
bool cogview::cpu_avx2::compiled_in() { return PB_RELAX_ISA_BUILDS; }

#if PB_RELAX_ISA_BUILDS
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 false positive in _mm*_cvtps_ph
#include <immintrin.h>
#pragma GCC diagnostic pop
// GCC's intrinsic headers end with `#pragma GCC pop_options`, which drops the ISA macros the
// target pragma defined; sleef.h (included by ATen's vec headers) declares its vector
// functions only under them, so they are set again here.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define PB_RELAX_CPU_NAMESPACE cpu_avx2
#include "pb_relax_softmax_cpu_kernel.h"
#else
namespace cogview::cpu_avx2 {
bool fill_kernel_table(CpuKernelTable*) { return false; }
}  // namespace cogview::cpu_avx2
#endif
