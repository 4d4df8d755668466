// What the compiled library does at run time, for m1ops.build_info(): read
// through ctypes (a plain C symbol, not an op), so it never enters a graph.
#include <string>

#include "common/cpu_runtime.h"
#include "common/avx512.h"
#include "lightning/prefill.h"

namespace {

// The head dims (K = V) m1.lightning_attn's CUDA kernels take, from the rule the op checks, so that
// callers can route other shapes elsewhere (m1ops.lightning.kernel_takes); empty without CUDA.
std::string cuda_lightning_head_dims() {
  std::string dims;
#if defined(M1_WITH_CUDA)
  for (int64_t d = 1; d <= m1::lightning::kMaxHeadDim; ++d) {
    if (m1::lightning::cuda_prefill_supports(d, d)) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
  }
#endif
  return "[" + dims + "]";
}

}  // namespace

extern "C" const char* m1_runtime_info() {
  static const std::string info = std::string("{\"cpu_gemm\": \"") + m1::cpu::gemm_backend() +
#if defined(__x86_64__)
                                  "\", \"cpu_multiversion\": \"x86-64-v3 + baseline\"" +
#else
                                  "\", \"cpu_multiversion\": \"none\"" +
#endif
                                  // Whether this CPU runs the AVX-512 (and AVX512-BF16) kernels of the
                                  // fused MoE, the FP32 head and the few-rows GEMM.
                                  ", \"cpu_avx512\": " + (m1::avx512::cpu_has() ? "true" : "false") +
                                  ", \"cpu_avx512_bf16\": " + (m1::avx512::cpu_has_bf16() ? "true" : "false") +
                                  ", \"lightning_max_head_dim\": " + std::to_string(m1::lightning::kMaxHeadDim) +
                                  ", \"cuda_lightning_head_dims\": " + cuda_lightning_head_dims() + "}";
  return info.c_str();
}
