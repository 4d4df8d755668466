// What the compiled library does at run time, for m1ops.build_info(): read
// through ctypes (a plain C symbol, not an op), so it never enters a graph.
#include <string>

#include "common/cpu_runtime.h"
#include "common/avx512.h"

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
                                  ", \"cpu_avx512_bf16\": " + (m1::avx512::cpu_has_bf16() ? "true" : "false") + "}";
  return info.c_str();
}
