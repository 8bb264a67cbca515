// cogview._C: the PB-relax masked softmax (CogView, section 2.4) for CPU and CUDA.
//
//   probs = softmax((S - rowmax(S)) * alpha)      S = (Q / (alpha * sqrt(d))) K^T
//
// This file holds the Python bindings, argument checks, the key-mask layout, the
// parallel loop over rows, and the choice of CPU kernel build at run time (portable,
// AVX2 or AVX-512, like ATen's own kernels; the row kernels themselves live in
// pb_relax_softmax_cpu_kernel.h). CUDA tensors go to pb_relax_softmax_cuda.cu when the
// extension was built with CUDA (-DWITH_CUDA).

// The portable build of the row kernels is compiled here; AVX2 / AVX-512 builds come
// from pb_relax_softmax_avx2.cpp / pb_relax_softmax_avx512.cpp.
#define CPU_CAPABILITY DEFAULT
#define PB_RELAX_CPU_NAMESPACE cpu_default
#include "pb_relax_softmax_cpu_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "pb_relax_softmax.h"

namespace cogview {
namespace cpu_default {
bool compiled_in() { return true; }  // the portable build is always there
}  // namespace cpu_default

namespace {

// ---------------------------------------------------------------------------
// CPU kernel builds and the choice between them.

constexpr int kNumCpuLevels = 3;
const char* const kCpuLevelNames[kNumCpuLevels] = {"default", "avx2", "avx512"};

// The highest build this CPU can execute, read from CPUID (and the OS's saved-state bits) by
// the compiler's runtime, independently of ATen: ATEN_CPU_CAPABILITY=avx512 on a CPU without
// AVX-512 must not make us run AVX-512 code.
int cpu_hardware_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? 2 : (avx2 ? 1 : 0);
#else
  return 0;
#endif
}

struct CpuKernels {
  CpuKernelTable tables[kNumCpuLevels];
  bool compiled[kNumCpuLevels] = {false, false, false};     // built into this binary
  bool initialised[kNumCpuLevels] = {false, false, false};  // fill_kernel_table() was entered
  std::string aten_capability;  // what ATen chose (it honours ATEN_CPU_CAPABILITY)
  int aten_level = 0;
  int cpu_level = 0;            // what the CPU itself runs (CPUID)
  int usable_level = 0;         // min(aten_level, cpu_level): no build above it is ever entered
  std::atomic<int> active{0};
};

CpuKernels& cpu_kernels() {
  static CpuKernels* kernels = [] {
    auto* k = new CpuKernels();
    k->compiled[0] = cpu_default::compiled_in();
    k->compiled[1] = cpu_avx2::compiled_in();
    k->compiled[2] = cpu_avx512::compiled_in();
    // ATen's choice: its own CPU check, unless ATEN_CPU_CAPABILITY names a level (any level,
    // even one above the CPU's: ATen does not check it, hence the CPUID bound below).
    k->aten_capability = at::get_cpu_capability();
    k->aten_level = k->aten_capability == "AVX512" ? 2 : (k->aten_capability == "AVX2" ? 1 : 0);
    k->cpu_level = cpu_hardware_level();
    k->usable_level = std::min(k->aten_level, k->cpu_level);
    // Only builds the CPU can execute are entered, table filling included.
    for (int level = 0; level <= k->usable_level; ++level) {
      if (!k->compiled[level]) continue;
      k->initialised[level] = true;
      const bool filled = level == 0   ? cpu_default::fill_kernel_table(&k->tables[0])
                          : level == 1 ? cpu_avx2::fill_kernel_table(&k->tables[1])
                                       : cpu_avx512::fill_kernel_table(&k->tables[2]);
      k->compiled[level] = filled;
    }
    int level = k->usable_level;
    while (level > 0 && !k->compiled[level]) --level;
    k->active.store(level);
    return k;
  }();
  return *kernels;
}

std::vector<std::string> usable_cpu_capabilities() {
  CpuKernels& k = cpu_kernels();
  std::vector<std::string> names;
  for (int level = 0; level <= k.usable_level; ++level) {
    if (k.compiled[level]) names.emplace_back(kCpuLevelNames[level]);
  }
  return names;
}

std::string cpu_capability() { return kCpuLevelNames[cpu_kernels().active.load()]; }

// What the dispatcher saw and did: for logs, benchmarks and the ISA-safety tests.
std::map<std::string, std::string> cpu_dispatch_info() {
  CpuKernels& k = cpu_kernels();
  std::vector<std::string> compiled, initialised;
  for (int level = 0; level < kNumCpuLevels; ++level) {
    if (k.compiled[level] || k.initialised[level]) compiled.emplace_back(kCpuLevelNames[level]);
    if (k.initialised[level]) initialised.emplace_back(kCpuLevelNames[level]);
  }
  return {{"aten", kCpuLevelNames[k.aten_level]},
          {"aten_capability", k.aten_capability},
          {"cpu", kCpuLevelNames[k.cpu_level]},
          {"usable", kCpuLevelNames[k.usable_level]},
          {"active", kCpuLevelNames[k.active.load()]},
          {"compiled", c10::Join(",", compiled)},
          {"initialised", c10::Join(",", initialised)}};
}

void set_cpu_capability(const std::string& name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  CpuKernels& k = cpu_kernels();
  for (int level = 0; level < kNumCpuLevels; ++level) {
    if (lower != kCpuLevelNames[level]) continue;
    TORCH_CHECK(k.compiled[level] && level <= k.usable_level, "set_cpu_capability: '", name,
                "' cannot run here (CPU: ", kCpuLevelNames[k.cpu_level], ", ATen: ",
                k.aten_capability, "); usable on this machine: ",
                c10::Join(", ", usable_cpu_capabilities()));
    k.active.store(level);
    return;
  }
  TORCH_CHECK(false, "set_cpu_capability: unknown capability '", name,
              "'; expected one of: default, avx2, avx512");
}

int dtype_index(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kPBFloat;
    case at::kDouble: return kPBDouble;
    case at::kBFloat16: return kPBBFloat16;
    case at::kHalf: return kPBHalf;
    default: return -1;
  }
}

// Rows per parallel task: about at::internal::GRAIN_SIZE elements of work each.
int64_t rows_per_task(int64_t lk) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(lk, 1)); }

void forward_cpu(const at::Tensor& scores, const at::Tensor& probs, const PBRelaxRows& g, int64_t rows) {
  const int d = dtype_index(scores.scalar_type());
  const PBRelaxForwardRowsFn fn = cpu_kernels().tables[cpu_kernels().active.load()].forward[d];
  const bool widens = d == kPBBFloat16 || d == kPBHalf;
  const void* in = scores.const_data_ptr();
  void* out = probs.data_ptr();
  at::parallel_for(0, rows, rows_per_task(g.lk), [&](int64_t begin, int64_t end) {
    // One fp32 row buffer per task (16-bit inputs only), never one per row.
    std::unique_ptr<float[]> workspace(widens ? new float[g.lk] : nullptr);
    fn(in, out, workspace.get(), g, begin, end);
  });
}

void backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs, const at::Tensor& grad_scores,
                  const PBRelaxRows& g, int64_t rows) {
  const int d = dtype_index(probs.scalar_type());
  const PBRelaxBackwardRowsFn fn = cpu_kernels().tables[cpu_kernels().active.load()].backward[d];
  const void* dp = grad_probs.const_data_ptr();
  const void* p = probs.const_data_ptr();
  void* ds = grad_scores.data_ptr();
  at::parallel_for(0, rows, rows_per_task(g.lk),
                   [&](int64_t begin, int64_t end) { fn(dp, p, ds, g, begin, end); });
}

// ---------------------------------------------------------------------------
// Argument checks and the key-mask layout.

void check_scores(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() >= 2, "pb_relax_softmax: ", what, " must have shape [..., Lq, Lk], got shape ",
              t.sizes());
  TORCH_CHECK(dtype_index(t.scalar_type()) >= 0, "pb_relax_softmax: ", what,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), "pb_relax_softmax: ", what,
              " must be on CPU or CUDA, got ", t.device());
#ifndef WITH_CUDA
  TORCH_CHECK(!t.device().is_cuda(), "pb_relax_softmax: ", what, " is on ", t.device(),
              " but cogview._C was built without CUDA; rebuild it with a CUDA-enabled torch and "
              "nvcc on PATH (make install), or use the PyTorch fallback in cogview.modules.pb_relax");
#endif
}

// The bool key mask [..., Lk] (True = keep), broadcast over the batch dims of the scores,
// as additive bias rows [outer, Lk] in the accumulation type: 0 = keep, -inf = drop.
// A mask with a singleton query dim ([..., 1, Lk], as rank-4 masks often come) is accepted too.
at::Tensor key_bias_rows(const c10::optional<at::Tensor>& key_mask, const at::Tensor& scores) {
  if (!key_mask.has_value() || !key_mask->defined()) return at::Tensor();
  at::Tensor mask = *key_mask;
  const int64_t lk = scores.size(-1);
  const auto batch = scores.sizes().slice(0, scores.dim() - 2);
  TORCH_CHECK(mask.scalar_type() == at::kBool, "pb_relax_softmax: key_mask must be a bool tensor "
              "(True = keep), got ", mask.scalar_type(), "; pass key_mask.bool()");
  TORCH_CHECK(mask.device() == scores.device(), "pb_relax_softmax: key_mask is on ", mask.device(),
              " but scores are on ", scores.device());
  if (mask.dim() == scores.dim() && mask.size(-2) == 1) mask = mask.squeeze(-2);
  bool broadcasts = mask.dim() >= 1 && mask.dim() <= static_cast<int64_t>(batch.size()) + 1 &&
                    mask.size(-1) == lk;
  for (int64_t i = 2; broadcasts && i <= mask.dim(); ++i) {
    const int64_t m = mask.size(-i);
    broadcasts = m == 1 || m == batch[batch.size() - (i - 1)];
  }
  TORCH_CHECK(broadcasts, "pb_relax_softmax: key_mask of shape ", mask.sizes(),
              " does not broadcast to the scores' batch shape ", batch, " + [Lk=", lk,
              "]; a per-sample mask [B, Lk] over scores [B, H, Lq, Lk] is passed as key_mask[:, None, :]");
  std::vector<int64_t> target(batch.begin(), batch.end());
  target.push_back(lk);
  const int64_t outer = c10::multiply_integers(batch);
  const auto acc = scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::zeros({outer, lk}, scores.options().dtype(acc))
      .masked_fill_(mask.expand(target).reshape({outer, lk}).logical_not(),
                    -std::numeric_limits<double>::infinity());
}

// ---------------------------------------------------------------------------
// The ops.

at::Tensor pb_relax_softmax_forward(const at::Tensor& scores, double alpha, bool causal,
                                    const c10::optional<at::Tensor>& key_mask) {
  check_scores(scores, "scores");
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "pb_relax_softmax: alpha must be a positive finite "
              "number, got ", alpha, " (CogView uses 32)");
  const at::Tensor input = scores.contiguous();
  at::Tensor probs = at::empty_like(input, at::MemoryFormat::Contiguous);
  const at::Tensor bias = key_bias_rows(key_mask, input);  // keeps the bias alive for the call
  PBRelaxRows g;
  g.lq = input.size(-2);
  g.lk = input.size(-1);
  g.causal = causal;
  g.alpha = alpha;
  g.key_bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  if (input.numel() == 0) return probs;
  const int64_t rows = input.numel() / g.lk;
  if (input.is_cuda()) {
#ifdef WITH_CUDA
    pb_relax_softmax_forward_cuda(input, probs, g);
#endif
  } else {
    forward_cpu(input, probs, g, rows);
  }
  return probs;
}

at::Tensor pb_relax_softmax_backward(const at::Tensor& grad_probs, const at::Tensor& probs,
                                     double alpha, bool causal) {
  check_scores(probs, "probs");
  TORCH_CHECK(grad_probs.sizes() == probs.sizes(), "pb_relax_softmax backward: grad_probs has shape ",
              grad_probs.sizes(), " but probs has shape ", probs.sizes());
  TORCH_CHECK(grad_probs.scalar_type() == probs.scalar_type() && grad_probs.device() == probs.device(),
              "pb_relax_softmax backward: grad_probs (", grad_probs.scalar_type(), ", ", grad_probs.device(),
              ") must match probs (", probs.scalar_type(), ", ", probs.device(), ")");
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "pb_relax_softmax: alpha must be a positive finite "
              "number, got ", alpha);
  const at::Tensor dp = grad_probs.contiguous();
  const at::Tensor p = probs.contiguous();
  at::Tensor grad_scores = at::empty_like(p, at::MemoryFormat::Contiguous);
  PBRelaxRows g;
  g.lq = p.size(-2);
  g.lk = p.size(-1);
  g.causal = causal;
  g.alpha = alpha;
  if (p.numel() == 0) return grad_scores;
  const int64_t rows = p.numel() / g.lk;
  if (p.is_cuda()) {
#ifdef WITH_CUDA
    pb_relax_softmax_backward_cuda(dp, p, grad_scores, g);
#endif
  } else {
    backward_cpu(dp, p, grad_scores, g, rows);
  }
  return grad_scores;
}

bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace cogview

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "PB-relax masked softmax kernels (CogView 2.4); use cogview.modules.pb_relax instead.";
  m.def("pb_relax_softmax_forward", &cogview::pb_relax_softmax_forward, py::arg("scores"),
        py::arg("alpha"), py::arg("causal"), py::arg("key_mask") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        "probs = softmax((scores - rowmax) * alpha) over the last dim, masked (causal: query i of "
        "Lq sees keys j <= i + Lk - Lq; key_mask: bool [..., Lk], True = keep). Rows without a "
        "visible key are 0.");
  m.def("pb_relax_softmax_backward", &cogview::pb_relax_softmax_backward, py::arg("grad_probs"),
        py::arg("probs"), py::arg("alpha"), py::arg("causal"),
        py::call_guard<py::gil_scoped_release>(),
        "grad_scores = alpha * probs * (grad_probs - sum(grad_probs * probs, -1)).");
  m.def("with_cuda", &cogview::with_cuda, "True when the CUDA kernels were compiled in.");
  m.def("cpu_capability", &cogview::cpu_capability,
        "The CPU kernel build in use: default, avx2 or avx512.");
  m.def("cpu_capabilities", &cogview::usable_cpu_capabilities,
        "The CPU kernel builds this machine can run.");
  m.def("cpu_dispatch_info", &cogview::cpu_dispatch_info,
        "How the CPU build was chosen: aten (ATen's level, after ATEN_CPU_CAPABILITY), cpu (what "
        "CPUID reports), usable (the lower of the two), active, compiled (builds in this binary), "
        "initialised (builds whose code has been entered; never above usable).");
  m.def("set_cpu_capability", &cogview::set_cpu_capability, py::arg("name"),
        "Pick the CPU kernel build (for tests and benchmarks); see cpu_capabilities().");
}
