// AVX-512 pieces shared by the CPU GEMM micro-kernels (moe/moe_gemm_avx512_cpu.cpp,
// common/few_rows_avx512_cpu.cpp): the target attributes those functions are
// compiled with, the run-time CPU check that guards every call into them, and
// the sum of a vector's 16 lanes. The rest of the library stays portable.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define M1_AVX512_KERNELS 1
#include <immintrin.h>
#define M1_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define M1_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

namespace m1::avx512 {

// Whether this CPU runs AVX-512 F/BW/VL/DQ code (checked once).
inline bool cpu_has() {
#if defined(M1_AVX512_KERNELS)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

// ... and the AVX512-BF16 dot products (vdpbf16ps: Intel Cooper Lake / Sapphire Rapids and later,
// AMD Zen 4 and later).
inline bool cpu_has_bf16() {
#if defined(M1_AVX512_KERNELS)
  static const bool has = cpu_has() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

#if defined(M1_AVX512_KERNELS)
// Every lane. Intrinsics that have one take their masked form with it: GCC 12's unmasked ones
// (and _mm512_reduce_add_ps) pass _mm512_undefined_*() and draw -W(maybe-)uninitialized from its
// own header.
constexpr __mmask16 kAll = 0xFFFF;

// Sum of the 16 lanes.
M1_TARGET_AVX512 inline float hsum(__m512 v) {
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0x4E));  // + the other 256-bit half
  v = _mm512_add_ps(v, _mm512_mask_shuffle_f32x4(v, kAll, v, v, 0xB1));  // + the neighbouring 128-bit lane
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, 0x4E));        // + the other 64 bits of each lane
  v = _mm512_add_ps(v, _mm512_mask_permute_ps(v, kAll, v, 0xB1));        // + the neighbouring 32 bits
  return _mm512_cvtss_f32(v);
}
#endif

}  // namespace m1::avx512
