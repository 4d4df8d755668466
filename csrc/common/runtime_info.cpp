// What the compiled library does at run time, for m1ops.build_info(): read
// through ctypes (a plain C symbol, not an op), so it never enters a graph.
#include <string>

#include "common/cpu_runtime.h"

extern "C" const char* m1_runtime_info() {
  static const std::string info = std::string("{\"cpu_gemm\": \"") + m1::cpu::gemm_backend() +
#if defined(__x86_64__)
                                  "\", \"cpu_multiversion\": \"x86-64-v3 + baseline\"}";
#else
                                  "\", \"cpu_multiversion\": \"none\"}";
#endif
  return info.c_str();
}
