// Shared declarations of the PB-relax masked softmax kernel (CogView, section 2.4).
//
//   probs = softmax((S - rowmax(S)) * alpha)      S = (Q / (alpha * sqrt(d))) K^T
//
// The scores S arrive already scaled down by 1/alpha, so the row maximum is taken
// on small numbers (that is what keeps fp16 finite); the multiply by alpha, the exp
// and the normalisation run in fp32 (fp64 for double input).
//
// Layout seen by every kernel: scores viewed as rows [outer * Lq, Lk], contiguous.
// Row r is query i = r % Lq of batch entry b = r / Lq.
//   causal:   query i sees keys j <= i + (Lk - Lq) (the queries are the last Lq
//             positions, as when decoding with a KV cache), so a row's visible keys
//             are a prefix [0, n) of the row; keys past it get probability 0.
//   key mask: passed as an additive bias row per batch entry, [outer, Lk] in the
//             accumulation type, 0 where the key is kept and -inf where it is
//             dropped. Row r reads bias row r / Lq. It is materialised once per
//             call from the bool mask (outer * Lk elements, 1/Lq of the scores),
//             which keeps the inner loops a plain vector add and lets one layout
//             serve the CPU and the CUDA kernels alike.
// A row without any visible key gets all-zero probabilities (and gradients).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PB_RELAX_HOST_DEVICE __host__ __device__
#else
#define PB_RELAX_HOST_DEVICE
#endif

namespace cogview {

// Geometry and parameters shared by all rows of one call.
struct PBRelaxRows {
  int64_t lq = 1;                   // queries per batch entry
  int64_t lk = 1;                   // keys per row (the softmax length)
  bool causal = false;
  double alpha = 32.0;
  const void* key_bias = nullptr;   // [outer, lk] of the accumulation type, or nullptr
};

// Number of leading keys row `row` may attend to (its causal prefix).
PB_RELAX_HOST_DEVICE inline int64_t pb_relax_visible_keys(int64_t row, const PBRelaxRows& g) {
  if (!g.causal) return g.lk;
  const int64_t n = row % g.lq + (g.lk - g.lq) + 1;
  return n < 0 ? 0 : (n > g.lk ? g.lk : n);
}

// ---------------------------------------------------------------------------
// CPU: row kernels compiled once per instruction set (see pb_relax_softmax_cpu_kernel.h)
// and picked at run time, like ATen's own CPU kernels.

// Index of a dtype in CpuKernelTable.
enum PBRelaxDtype : int { kPBFloat = 0, kPBDouble = 1, kPBBFloat16 = 2, kPBHalf = 3, kPBNumDtypes = 4 };

// Rows [row_begin, row_end) of the forward. `workspace` holds lk accumulation-type
// elements for 16-bit inputs (unused, may be null, for float and double).
using PBRelaxForwardRowsFn = void (*)(const void* scores, void* probs, void* workspace,
                                      const PBRelaxRows& g, int64_t row_begin, int64_t row_end);
// Rows [row_begin, row_end) of the backward: grad_scores = alpha * P * (dP - sum(dP * P)).
using PBRelaxBackwardRowsFn = void (*)(const void* grad_probs, const void* probs,
                                       void* grad_scores, const PBRelaxRows& g,
                                       int64_t row_begin, int64_t row_end);

struct CpuKernelTable {
  PBRelaxForwardRowsFn forward[kPBNumDtypes] = {};
  PBRelaxBackwardRowsFn backward[kPBNumDtypes] = {};
};

// The AVX2 / AVX-512 builds are made by GCC on x86-64 (target pragmas); elsewhere only the
// portable build exists.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PB_RELAX_ISA_BUILDS 1
#else
#define PB_RELAX_ISA_BUILDS 0
#endif

// compiled_in() says whether a build's instruction set was compiled into this binary; it is
// compiled for the baseline ISA (before the file's target pragma), so any CPU may call it.
// fill_kernel_table() fills `table`; it is compiled for the build's instruction set, so the
// dispatcher calls it only when the CPU runs that set (and ATen allows it).
namespace cpu_default { bool compiled_in(); bool fill_kernel_table(CpuKernelTable* table); }
namespace cpu_avx2 { bool compiled_in(); bool fill_kernel_table(CpuKernelTable* table); }
namespace cpu_avx512 { bool compiled_in(); bool fill_kernel_table(CpuKernelTable* table); }

}  // namespace cogview

// ---------------------------------------------------------------------------
// CUDA launchers (pb_relax_softmax_cuda.cu), built only with -DWITH_CUDA.
#ifdef WITH_CUDA
namespace at { class Tensor; }

namespace cogview {
// scores, probs: contiguous CUDA tensors holding rows [rows, g.lk]; g.key_bias
// points to device memory. Runs on the current stream of the scores' device.
void pb_relax_softmax_forward_cuda(const at::Tensor& scores, const at::Tensor& probs,
                                   const PBRelaxRows& g);
void pb_relax_softmax_backward_cuda(const at::Tensor& grad_probs, const at::Tensor& probs,
                                    const at::Tensor& grad_scores, const PBRelaxRows& g);
}  // namespace cogview
#endif
