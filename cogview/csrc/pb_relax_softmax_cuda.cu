// CUDA kernels of the PB-relax masked softmax (CogView, section 2.4); see
// pb_relax_softmax.h for the math, the row layout and the masking rules.
//
// Rows up to kMaxWarpRowLength keys: one warp per row, lane l handling keys l, l + 32, ...
// (coalesced), warp shuffles for the max and the sums. The forward holds the row in
// registers (kPerLane values per lane), so it reads it once and writes it once.
// Longer rows: one block per row, block-wide reductions through shared memory, the row
// read again from global memory (L2) for the sum and for the output.
// fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <type_traits>

#include "pb_relax_softmax.h"

namespace cogview {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpRowsPerBlock = 4;     // rows (warps) per block of the warp kernels
constexpr int kMaxWarpRowLength = 2048;  // 64 values per lane; longer rows take a block each
constexpr int kBlockThreads = 512;       // threads per row in the block kernels
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return static_cast<acc_t>(-INFINITY);
}

// __expf: the hardware exp2 approximation (exp(-inf) = 0); fp64 keeps the exact exp.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    value = op(value, __shfl_xor_sync(kFullMask, value, offset));
  }
  return value;
}

// Reduces over the whole block; every thread gets the result. `shared` holds kWarpSize values.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T identity, T* shared) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  value = warp_reduce(value, op);
  __syncthreads();  // `shared` may still be read by the previous reduction
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = lane < num_warps ? shared[lane] : identity;
  return warp_reduce(value, op);  // each warp folds the per-warp partials itself
}

template <typename acc_t>
__device__ __forceinline__ const acc_t* key_bias_row(const PBRelaxRows& g, int64_t row) {
  return g.key_bias == nullptr ? nullptr : static_cast<const acc_t*>(g.key_bias) + (row / g.lq) * g.lk;
}

// ---------------------------------------------------------------------------
// Warp per row.

template <typename scalar_t, typename acc_t, int kPerLane>
__global__ void __launch_bounds__(kWarpSize* kWarpRowsPerBlock)
    forward_warp_kernel(const scalar_t* __restrict__ scores, scalar_t* __restrict__ probs,
                        const PBRelaxRows g, const int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x;
  const int64_t lk = g.lk;
  const int64_t n = pb_relax_visible_keys(row, g);
  const scalar_t* s = scores + row * lk;  // [lk]
  scalar_t* p = probs + row * lk;         // [lk]
  const acc_t* bias = key_bias_row<acc_t>(g, row);
  const acc_t alpha = static_cast<acc_t>(g.alpha);

  acc_t x[kPerLane];  // keys lane, lane + 32, ...
  acc_t row_max = neg_inf<acc_t>();
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = lane + k * kWarpSize;
    x[k] = neg_inf<acc_t>();
    if (j < n) {
      x[k] = static_cast<acc_t>(s[j]);
      if (bias != nullptr) x[k] += bias[j];
    }
    row_max = MaxOp()(row_max, x[k]);
  }
  row_max = warp_reduce(row_max, MaxOp());
  if (row_max == neg_inf<acc_t>()) {  // no visible key: zeros, not NaN
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t j = lane + k * kWarpSize;
      if (j < lk) p[j] = static_cast<scalar_t>(0);
    }
    return;
  }
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    x[k] = fast_exp((x[k] - row_max) * alpha);  // masked and padded keys: exp(-inf) = 0
    sum += x[k];
  }
  const acc_t inv_sum = acc_t(1) / warp_reduce(sum, SumOp());
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = lane + k * kWarpSize;
    if (j < lk) p[j] = static_cast<scalar_t>(x[k] * inv_sum);
  }
}

// Holding both P and dP in registers would double the register use of the forward (255 per
// thread at 2048 keys) and starve the SM of warps, so the second pass reads the row again;
// the warp read it a moment before, so that read is served by L1/L2, not DRAM.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarpSize* kWarpRowsPerBlock)
    backward_warp_kernel(const scalar_t* __restrict__ grad_probs,
                         const scalar_t* __restrict__ probs, scalar_t* __restrict__ grad_scores,
                         const PBRelaxRows g, const int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int lane = threadIdx.x;
  const int64_t lk = g.lk;
  const int64_t n = pb_relax_visible_keys(row, g);  // P is 0 past the causal prefix
  const scalar_t* dp = grad_probs + row * lk;
  const scalar_t* p = probs + row * lk;
  scalar_t* ds = grad_scores + row * lk;
  const acc_t alpha = static_cast<acc_t>(g.alpha);

  acc_t dot = 0;
  for (int64_t j = lane; j < n; j += kWarpSize) {
    dot += static_cast<acc_t>(p[j]) * static_cast<acc_t>(dp[j]);
  }
  dot = warp_reduce(dot, SumOp());
  for (int64_t j = lane; j < lk; j += kWarpSize) {
    ds[j] = j < n ? static_cast<scalar_t>(alpha * static_cast<acc_t>(p[j]) *
                                          (static_cast<acc_t>(dp[j]) - dot))
                  : static_cast<scalar_t>(0);
  }
}

// ---------------------------------------------------------------------------
// Block per row.

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    forward_block_kernel(const scalar_t* __restrict__ scores, scalar_t* __restrict__ probs,
                         const PBRelaxRows g) {
  __shared__ acc_t shared[kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t lk = g.lk;
  const int64_t n = pb_relax_visible_keys(row, g);
  const scalar_t* s = scores + row * lk;
  scalar_t* p = probs + row * lk;
  const acc_t* bias = key_bias_row<acc_t>(g, row);
  const acc_t alpha = static_cast<acc_t>(g.alpha);
  auto score = [&](int64_t j) {
    const acc_t x = static_cast<acc_t>(s[j]);
    return bias == nullptr ? x : x + bias[j];
  };

  acc_t row_max = neg_inf<acc_t>();
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) row_max = MaxOp()(row_max, score(j));
  row_max = block_reduce(row_max, MaxOp(), neg_inf<acc_t>(), shared);
  if (row_max == neg_inf<acc_t>()) {  // same value in every thread: the block leaves together
    for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) p[j] = static_cast<scalar_t>(0);
    return;
  }
  acc_t sum = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sum += fast_exp((score(j) - row_max) * alpha);
  const acc_t inv_sum = acc_t(1) / block_reduce(sum, SumOp(), acc_t(0), shared);
  for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) {
    p[j] = j < n ? static_cast<scalar_t>(fast_exp((score(j) - row_max) * alpha) * inv_sum)
                 : static_cast<scalar_t>(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    backward_block_kernel(const scalar_t* __restrict__ grad_probs,
                          const scalar_t* __restrict__ probs, scalar_t* __restrict__ grad_scores,
                          const PBRelaxRows g) {
  __shared__ acc_t shared[kWarpSize];
  const int64_t row = blockIdx.x;
  const int64_t lk = g.lk;
  const int64_t n = pb_relax_visible_keys(row, g);
  const scalar_t* dp = grad_probs + row * lk;
  const scalar_t* p = probs + row * lk;
  scalar_t* ds = grad_scores + row * lk;
  const acc_t alpha = static_cast<acc_t>(g.alpha);

  acc_t dot = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    dot += static_cast<acc_t>(p[j]) * static_cast<acc_t>(dp[j]);
  }
  dot = block_reduce(dot, SumOp(), acc_t(0), shared);
  for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) {
    ds[j] = j < n ? static_cast<scalar_t>(alpha * static_cast<acc_t>(p[j]) *
                                          (static_cast<acc_t>(dp[j]) - dot))
                  : static_cast<scalar_t>(0);
  }
}

// ---------------------------------------------------------------------------
// Launchers.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls launch(std::integral_constant<int, kPerLane>) with the smallest power of two
// kPerLane such that 32 * kPerLane >= lk (lk <= kMaxWarpRowLength).
template <typename Launch>
void with_values_per_lane(int64_t lk, Launch&& launch) {
  const int64_t per_lane = ceil_div(lk, kWarpSize);
  if (per_lane <= 1) return launch(std::integral_constant<int, 1>());
  if (per_lane <= 2) return launch(std::integral_constant<int, 2>());
  if (per_lane <= 4) return launch(std::integral_constant<int, 4>());
  if (per_lane <= 8) return launch(std::integral_constant<int, 8>());
  if (per_lane <= 16) return launch(std::integral_constant<int, 16>());
  if (per_lane <= 32) return launch(std::integral_constant<int, 32>());
  return launch(std::integral_constant<int, 64>());
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "pb_relax_softmax (CUDA): ", blocks,
              " thread blocks exceed the grid limit; split the batch into smaller calls");
}

}  // namespace

void pb_relax_softmax_forward_cuda(const at::Tensor& scores, const at::Tensor& probs,
                                   const PBRelaxRows& g) {
  const c10::cuda::CUDAGuard device_guard(scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = scores.numel() / g.lk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "pb_relax_softmax_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = scores.const_data_ptr<scalar_t>();
    scalar_t* out = probs.mutable_data_ptr<scalar_t>();
    if (g.lk <= kMaxWarpRowLength) {
      const int64_t blocks = ceil_div(rows, kWarpRowsPerBlock);
      check_grid(blocks);
      with_values_per_lane(g.lk, [&](auto per_lane) {
        forward_warp_kernel<scalar_t, acc_t, decltype(per_lane)::value>
            <<<static_cast<unsigned>(blocks), dim3(kWarpSize, kWarpRowsPerBlock), 0, stream>>>(
                in, out, g, rows);
      });
    } else {
      check_grid(rows);
      forward_block_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(in, out, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pb_relax_softmax_backward_cuda(const at::Tensor& grad_probs, const at::Tensor& probs,
                                    const at::Tensor& grad_scores, const PBRelaxRows& g) {
  const c10::cuda::CUDAGuard device_guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = probs.numel() / g.lk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(),
                                  "pb_relax_softmax_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = grad_probs.const_data_ptr<scalar_t>();
    const scalar_t* p = probs.const_data_ptr<scalar_t>();
    scalar_t* ds = grad_scores.mutable_data_ptr<scalar_t>();
    if (g.lk <= kMaxWarpRowLength) {
      const int64_t blocks = ceil_div(rows, kWarpRowsPerBlock);
      check_grid(blocks);
      backward_warp_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(blocks), dim3(kWarpSize, kWarpRowsPerBlock), 0, stream>>>(
              dp, p, ds, g, rows);
    } else {
      check_grid(rows);
      backward_block_kernel<scalar_t, acc_t>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(dp, p, ds, g);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cogview
