// AVX-512 pieces shared by the CPU GEMM micro-kernels (moe/moe_gemm_avx512_cpu.cpp,
// common/few_rows_avx512_cpu.cpp): the target attributes those functions are
// compiled with, the run-time CPU check that guards every call into them, the
// sum of a vector's 16 lanes and the fp32-FMA tile of an "NT" GEMM. The rest
// of the library stays portable.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

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

// 16 consecutive values widened to fp32; the masked form reads only the first `mask` lanes.
M1_TARGET_AVX512 inline __m512 widen(const float* p) { return _mm512_loadu_ps(p); }
M1_TARGET_AVX512 inline __m512 widen(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

M1_TARGET_AVX512 inline __m512 bf16_bits(__m256i h) {  // bf16 -> fp32: the 16 bits become the high half
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, h), 16));
}
M1_TARGET_AVX512 inline __m512 widen(const bf16* p) {
  return bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
M1_TARGET_AVX512 inline __m512 widen(const bf16* p, __mmask16 mask) {
  return bf16_bits(_mm256_maskz_loadu_epi16(mask, p));
}

M1_TARGET_AVX512 inline __m512 widen(const fp16* p) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
M1_TARGET_AVX512 inline __m512 widen(const fp16* p, __mmask16 mask) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_maskz_loadu_epi16(mask, p));
}

// One step of tile_nt (below): 16 p at p into the M x R accumulators; `mask` selects the k % 16 tail
// (masked loads give zeros past the end).
template <typename T, int M, int R>
M1_TARGET_AVX512 M1_INLINE void nt_step(__m512 (&acc)[M][R], const float* __restrict a, int64_t lda,
                                        const T* __restrict b, int64_t ldb, int64_t p, __mmask16 mask) {
  __m512 bv[R];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) bv[j] = mask == kAll ? widen(b + j * ldb + p) : widen(b + j * ldb + p, mask);
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i) {
    const __m512 av = mask == kAll ? _mm512_loadu_ps(a + i * lda + p) : _mm512_maskz_loadu_ps(mask, a + i * lda + p);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
  }
}

// One tile of an "NT" GEMM: C[i, j] = sum_p A[i, p] B[j, p] for M rows of A (fp32) and R rows of B
// (T widened in registers), p contiguous in both, fp32 FMAs on 16 p per step, masked loads for the
// k % 16 tail, the 16 lanes of each of the M x R accumulators summed at the end. U > 1 keeps U
// accumulators per (i, j) on interleaved 16-p slices, for tiles with too few independent FMA
// chains to stream (1 x 1: one dependent FMA per 16 values, about 28 GB/s of bf16 per core at 4
// cycles each; see common/few_rows_avx512_cpu.cpp). With `next` (the rows of the following tile,
// same stride), every step prefetches the lines of each of them that the step after this tile
// will read: R rows read side by side are R streams 4-8 KB apart, which the hardware prefetcher
// follows less well (fp32 [32000, 1024] against 8 rows of A, 2 threads: 28 GB/s without, 36 with).
template <typename T, int M, int R, int U = 1>
M1_TARGET_AVX512 void tile_nt(int64_t k, const float* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                              float* __restrict c, int64_t ldc, const T* next) {
  constexpr int64_t kLine = 64 / sizeof(T);  // B values per cache line
  constexpr int64_t kStep = 16 * U;
  __m512 acc[U][M][R];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[u][i][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + kStep <= k; p += kStep) {
    if (next) {
#pragma GCC unroll 8
      for (int64_t q = p; q < p + kStep; q += 16)
        if (q % kLine == 0)
#pragma GCC unroll 8
          for (int j = 0; j < R; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldb + q), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) nt_step<T, M, R>(acc[u], a, lda, b, ldb, p + 16 * u, kAll);
  }
  for (; p + 16 <= k; p += 16) nt_step<T, M, R>(acc[0], a, lda, b, ldb, p, kAll);
  if (p < k) nt_step<T, M, R>(acc[0], a, lda, b, ldb, p, __mmask16((1u << (k - p)) - 1u));  // 1 .. 15 left
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      __m512 sum = acc[0][i][j];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][i][j]);
      c[i * ldc + j] = hsum(sum);
    }
}
#endif

}  // namespace m1::avx512
