// CPU row kernels of the PB-relax softmax, written once with at::vec::Vectorized and
// compiled once per instruction set. The including file defines, before any include:
//   CPU_CAPABILITY            DEFAULT | AVX2 | AVX512   (ATen's inline namespace for Vectorized)
//   CPU_CAPABILITY_<X>        for AVX2 / AVX512          (selects the intrinsics in ATen/cpu/vec)
//   PB_RELAX_CPU_NAMESPACE    cpu_default | cpu_avx2 | cpu_avx512
// and gets `cogview::PB_RELAX_CPU_NAMESPACE::fill_kernel_table`. See pb_relax_softmax.h
// for the row layout and the masking rules.
//
// Per row, forward: pass 1 takes the max of the visible scores (16-bit inputs are widened
// into a per-thread fp32 row buffer on the way), pass 2 writes exp((s - max) * alpha) and
// sums it, pass 3 scales by 1/sum and writes the output dtype. Backward: pass 1 takes
// sum(dP * P), pass 2 writes alpha * P * (dP - sum). Keys past the causal prefix are not
// read and get 0 (the next row's prefix is prefetched meanwhile). No allocation happens
// inside these loops.
#pragma once

#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // ATen's vec headers carry `#pragma unroll`
#pragma GCC diagnostic ignored "-Wpsabi"            // vector arguments of inline helpers
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "pb_relax_softmax.h"

#ifndef PB_RELAX_CPU_NAMESPACE
#error "define PB_RELAX_CPU_NAMESPACE (and CPU_CAPABILITY) before including this header"
#endif

namespace cogview {
namespace PB_RELAX_CPU_NAMESPACE {
namespace {

using at::vec::Vectorized;

// fp32 accumulation for float and the 16-bit types, fp64 for double.
template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The rows are walked in chunks of two accumulation vectors, which is exactly one
// Vectorized<BFloat16 / Half> (so 16-bit loads and stores convert in one go) and gives
// float a 2-way unroll.
template <typename scalar_t>
struct Chunk {
  using acc = acc_t<scalar_t>;
  using Vec = Vectorized<acc>;
  static constexpr int64_t kVec = Vec::size();
  static constexpr int64_t kSize = 2 * kVec;
  static constexpr bool kWidens = !std::is_same_v<scalar_t, acc>;
  static_assert(!kWidens || Vectorized<scalar_t>::size() == kSize,
                "one Vectorized<16-bit> must hold two Vectorized<float>");

  static inline void load(const scalar_t* src, Vec& lo, Vec& hi) {
    if constexpr (kWidens) {
      std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src));
    } else {
      lo = Vec::loadu(src);
      hi = Vec::loadu(src + kVec);
    }
  }
  static inline void store(scalar_t* dst, const Vec& lo, const Vec& hi) {
    if constexpr (kWidens) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst);
    } else {
      lo.store(dst);
      hi.store(dst + kVec);
    }
  }
  // Loads count < kSize elements; the remaining lanes are 0.
  static inline void load_partial(const scalar_t* src, int64_t count, Vec& lo, Vec& hi) {
    if constexpr (kWidens) {
      std::tie(lo, hi) =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(src, count));
    } else {
      lo = Vec::loadu(src, std::min(count, kVec));
      hi = count > kVec ? Vec::loadu(src + kVec, count - kVec) : Vec(acc(0));
    }
  }
  static inline void store_partial(scalar_t* dst, int64_t count, const Vec& lo, const Vec& hi) {
    if constexpr (kWidens) {
      at::vec::convert_from_float<scalar_t>(lo, hi).store(dst, count);
    } else {
      lo.store(dst, std::min(count, kVec));
      if (count > kVec) hi.store(dst + kVec, count - kVec);
    }
  }
};

// Accumulation-type rows (the key bias and the fp32 work row) in the same chunking.
template <typename acc>
inline void load_acc(const acc* src, Vectorized<acc>& lo, Vectorized<acc>& hi) {
  constexpr int64_t kVec = Vectorized<acc>::size();
  lo = Vectorized<acc>::loadu(src);
  hi = Vectorized<acc>::loadu(src + kVec);
}
template <typename acc>
inline void load_acc_partial(const acc* src, int64_t count, Vectorized<acc>& lo,
                             Vectorized<acc>& hi) {
  constexpr int64_t kVec = Vectorized<acc>::size();
  lo = Vectorized<acc>::loadu(src, std::min(count, kVec));
  hi = count > kVec ? Vectorized<acc>::loadu(src + kVec, count - kVec) : Vectorized<acc>(acc(0));
}
template <typename acc>
inline void store_acc(acc* dst, const Vectorized<acc>& lo, const Vectorized<acc>& hi) {
  lo.store(dst);
  hi.store(dst + Vectorized<acc>::size());
}
template <typename acc>
inline void store_acc_partial(acc* dst, int64_t count, const Vectorized<acc>& lo,
                              const Vectorized<acc>& hi) {
  constexpr int64_t kVec = Vectorized<acc>::size();
  lo.store(dst, std::min(count, kVec));
  if (count > kVec) hi.store(dst + kVec, count - kVec);
}

// exp_u20: ATen's fast fp32 exp (its softmax uses it too); exp(-inf) = 0.
inline Vectorized<float> vec_exp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vec_exp(const Vectorized<double>& x) { return x.exp(); }

template <typename acc>
inline acc reduce_max(const Vectorized<acc>& lo, const Vectorized<acc>& hi) {
  return at::vec::vec_reduce_all<acc>(
      [](Vectorized<acc>& a, Vectorized<acc>& b) { return at::vec::maximum(a, b); },
      at::vec::maximum(lo, hi));
}
template <typename acc>
inline acc reduce_sum(const Vectorized<acc>& lo, const Vectorized<acc>& hi) {
  return at::vec::vec_reduce_all<acc>(
      [](Vectorized<acc>& a, Vectorized<acc>& b) { return a + b; }, lo + hi);
}

// A causal row is read only up to its prefix, which breaks the sequential stream the
// hardware prefetchers follow; so while a row is computed, ask for the next row's prefix.
template <typename T>
inline void prefetch_prefix(const T* row, int64_t count) {
#if defined(__GNUC__)
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = std::min<int64_t>(count * static_cast<int64_t>(sizeof(T)), 8192);
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
#endif
}

template <typename scalar_t>
void forward_rows(const void* scores_ptr, void* probs_ptr, void* workspace,
                  const PBRelaxRows& g, int64_t row_begin, int64_t row_end) {
  using C = Chunk<scalar_t>;
  using acc = typename C::acc;
  using Vec = typename C::Vec;
  constexpr int64_t kVec = C::kVec;
  constexpr int64_t kSize = C::kSize;
  const acc neg_inf = -std::numeric_limits<acc>::infinity();
  const int64_t lk = g.lk;
  const auto* scores = static_cast<const scalar_t*>(scores_ptr);
  auto* probs = static_cast<scalar_t*>(probs_ptr);
  const auto* key_bias = static_cast<const acc*>(g.key_bias);
  const Vec valpha(static_cast<acc>(g.alpha));

  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* s = scores + row * lk;  // [lk]
    scalar_t* p = probs + row * lk;         // [lk]
    const acc* bias = key_bias ? key_bias + (row / g.lq) * lk : nullptr;  // [lk] or null
    // Work row for the unnormalised exps: the output itself for float/double, the
    // per-thread fp32 buffer for 16-bit types (rounding them twice would cost accuracy).
    acc* w;
    if constexpr (C::kWidens) {
      w = static_cast<acc*>(workspace);
    } else {
      w = p;
    }
    const int64_t n = pb_relax_visible_keys(row, g);
    const int64_t n_full = n - n % kSize;
    const int64_t tail = n - n_full;
    if (g.causal && row + 1 < row_end) prefetch_prefix(s + lk, pb_relax_visible_keys(row + 1, g));

    // Pass 1: x = s (+ bias); row max over the visible keys.
    Vec max_lo(neg_inf), max_hi(neg_inf);
    for (int64_t j = 0; j < n_full; j += kSize) {
      Vec lo, hi;
      C::load(s + j, lo, hi);
      if (bias) {
        Vec b_lo, b_hi;
        load_acc(bias + j, b_lo, b_hi);
        lo = lo + b_lo;
        hi = hi + b_hi;
      }
      if constexpr (C::kWidens) store_acc(w + j, lo, hi);
      max_lo = at::vec::maximum(max_lo, lo);
      max_hi = at::vec::maximum(max_hi, hi);
    }
    if (tail > 0) {
      Vec lo, hi;
      C::load_partial(s + n_full, tail, lo, hi);
      if (bias) {
        Vec b_lo, b_hi;
        load_acc_partial(bias + n_full, tail, b_lo, b_hi);
        lo = lo + b_lo;
        hi = hi + b_hi;
      }
      if constexpr (C::kWidens) store_acc_partial(w + n_full, tail, lo, hi);
      // Lanes past the row end hold 0, which must not win the max.
      max_lo = at::vec::maximum(max_lo, Vec::set(Vec(neg_inf), lo, std::min(tail, kVec)));
      if (tail > kVec) max_hi = at::vec::maximum(max_hi, Vec::set(Vec(neg_inf), hi, tail - kVec));
    }
    const acc row_max = reduce_max(max_lo, max_hi);
    if (n == 0 || row_max == neg_inf) {  // no visible key: zeros, not NaN
      std::fill(p, p + lk, scalar_t(0));
      continue;
    }

    // Pass 2: w = exp((x - max) * alpha); sum.
    const Vec vmax(row_max);
    Vec sum_lo(acc(0)), sum_hi(acc(0));
    for (int64_t j = 0; j < n_full; j += kSize) {
      Vec lo, hi;
      if constexpr (C::kWidens) {
        load_acc(w + j, lo, hi);
      } else {
        C::load(s + j, lo, hi);
        if (bias) {
          Vec b_lo, b_hi;
          load_acc(bias + j, b_lo, b_hi);
          lo = lo + b_lo;
          hi = hi + b_hi;
        }
      }
      lo = vec_exp((lo - vmax) * valpha);
      hi = vec_exp((hi - vmax) * valpha);
      store_acc(w + j, lo, hi);
      sum_lo = sum_lo + lo;
      sum_hi = sum_hi + hi;
    }
    if (tail > 0) {
      Vec lo, hi;
      if constexpr (C::kWidens) {
        load_acc_partial(w + n_full, tail, lo, hi);
      } else {
        C::load_partial(s + n_full, tail, lo, hi);
        if (bias) {
          Vec b_lo, b_hi;
          load_acc_partial(bias + n_full, tail, b_lo, b_hi);
          lo = lo + b_lo;
          hi = hi + b_hi;
        }
      }
      // Lanes past the row end would give exp(-max * alpha): zero them.
      lo = Vec::set(Vec(acc(0)), vec_exp((lo - vmax) * valpha), std::min(tail, kVec));
      hi = tail > kVec ? Vec::set(Vec(acc(0)), vec_exp((hi - vmax) * valpha), tail - kVec)
                       : Vec(acc(0));
      store_acc_partial(w + n_full, tail, lo, hi);
      sum_lo = sum_lo + lo;
      sum_hi = sum_hi + hi;
    }

    // Pass 3: p = w / sum in the output dtype; keys past the causal prefix get 0.
    const Vec vinv(acc(1) / reduce_sum(sum_lo, sum_hi));
    for (int64_t j = 0; j < n_full; j += kSize) {
      Vec lo, hi;
      load_acc(w + j, lo, hi);
      C::store(p + j, lo * vinv, hi * vinv);
    }
    if (tail > 0) {
      Vec lo, hi;
      load_acc_partial(w + n_full, tail, lo, hi);
      C::store_partial(p + n_full, tail, lo * vinv, hi * vinv);
    }
    std::fill(p + n, p + lk, scalar_t(0));
  }
}

template <typename scalar_t>
void backward_rows(const void* grad_probs_ptr, const void* probs_ptr, void* grad_scores_ptr,
                   const PBRelaxRows& g, int64_t row_begin, int64_t row_end) {
  using C = Chunk<scalar_t>;
  using acc = typename C::acc;
  using Vec = typename C::Vec;
  constexpr int64_t kSize = C::kSize;
  const int64_t lk = g.lk;
  const auto* grad_probs = static_cast<const scalar_t*>(grad_probs_ptr);
  const auto* probs = static_cast<const scalar_t*>(probs_ptr);
  auto* grad_scores = static_cast<scalar_t*>(grad_scores_ptr);
  const Vec valpha(static_cast<acc>(g.alpha));

  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* dp = grad_probs + row * lk;  // [lk]
    const scalar_t* p = probs + row * lk;        // [lk]
    scalar_t* ds = grad_scores + row * lk;       // [lk]
    // P is 0 past the causal prefix, so the prefix alone carries the whole row.
    const int64_t n = pb_relax_visible_keys(row, g);
    const int64_t n_full = n - n % kSize;
    const int64_t tail = n - n_full;
    if (g.causal && row + 1 < row_end) {
      const int64_t next = pb_relax_visible_keys(row + 1, g);
      prefetch_prefix(p + lk, next);
      prefetch_prefix(dp + lk, next);
    }

    // Pass 1: dot = sum_j dP_j * P_j (padded lanes load 0 and add nothing).
    Vec dot_lo(acc(0)), dot_hi(acc(0));
    for (int64_t j = 0; j < n_full; j += kSize) {
      Vec p_lo, p_hi, dp_lo, dp_hi;
      C::load(p + j, p_lo, p_hi);
      C::load(dp + j, dp_lo, dp_hi);
      dot_lo = at::vec::fmadd(p_lo, dp_lo, dot_lo);
      dot_hi = at::vec::fmadd(p_hi, dp_hi, dot_hi);
    }
    if (tail > 0) {
      Vec p_lo, p_hi, dp_lo, dp_hi;
      C::load_partial(p + n_full, tail, p_lo, p_hi);
      C::load_partial(dp + n_full, tail, dp_lo, dp_hi);
      dot_lo = at::vec::fmadd(p_lo, dp_lo, dot_lo);
      dot_hi = at::vec::fmadd(p_hi, dp_hi, dot_hi);
    }
    const Vec vdot(reduce_sum(dot_lo, dot_hi));

    // Pass 2: dS = alpha * P * (dP - dot).
    for (int64_t j = 0; j < n_full; j += kSize) {
      Vec p_lo, p_hi, dp_lo, dp_hi;
      C::load(p + j, p_lo, p_hi);
      C::load(dp + j, dp_lo, dp_hi);
      C::store(ds + j, valpha * p_lo * (dp_lo - vdot), valpha * p_hi * (dp_hi - vdot));
    }
    if (tail > 0) {
      Vec p_lo, p_hi, dp_lo, dp_hi;
      C::load_partial(p + n_full, tail, p_lo, p_hi);
      C::load_partial(dp + n_full, tail, dp_lo, dp_hi);
      C::store_partial(ds + n_full, tail, valpha * p_lo * (dp_lo - vdot),
                       valpha * p_hi * (dp_hi - vdot));
    }
    std::fill(ds + n, ds + lk, scalar_t(0));
  }
}

}  // namespace

bool fill_kernel_table(CpuKernelTable* table) {
  table->forward[kPBFloat] = &forward_rows<float>;
  table->forward[kPBDouble] = &forward_rows<double>;
  table->forward[kPBBFloat16] = &forward_rows<c10::BFloat16>;
  table->forward[kPBHalf] = &forward_rows<c10::Half>;
  table->backward[kPBFloat] = &backward_rows<float>;
  table->backward[kPBDouble] = &backward_rows<double>;
  table->backward[kPBBFloat16] = &backward_rows<c10::BFloat16>;
  table->backward[kPBHalf] = &backward_rows<c10::Half>;
  return true;
}

}  // namespace PB_RELAX_CPU_NAMESPACE
}  // namespace cogview
