// The few-rows GEMM of common/few_rows_gemm.h with AVX-512 (see there for the
// contract): C[m, n] = A[m, k] B[n, k]^T, A fp32, B float/bf16/fp16 widened in
// registers, fp32 products and sums.
//
// The portable kernel keeps M accumulators for one row of B at a time, so every
// step loads M rows of A for a single B vector: at M = 8 it is load-bound at
// about 16 GB/s of weights (fp32, 2 threads), a third of what memory delivers.
// Here a tile holds R rows of B against up to 4 rows of A (M x R zmm
// accumulators, R B loads + M A loads per M x R FMAs; more A rows are more
// blocks over the same B tile, from L1), and prefetches the next tile. The 16
// lanes of each accumulator are summed once per tile.
//
// Compiled for AVX-512 by function attributes (common/avx512.h) and called only
// when the CPU has it (few_rows_avx512()); the rest of the library stays portable.
#include "common/few_rows_gemm.h"

#include "common/avx512.h"

namespace m1::cpu {

bool few_rows_avx512() { return avx512::cpu_has(); }

#if defined(M1_AVX512_KERNELS)
namespace {

using avx512::kAll;

// 16 consecutive B values widened to fp32; the masked form reads only the first `mask` lanes.
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

// C[0..M, 0..R] of one tile: M rows of A against R rows of B. With `next` (the rows of the following
// tile, same stride), every step prefetches the line of each of them that the step after this tile
// will read: R rows read side by side are R streams 4-8 KB apart, which the hardware prefetcher
// follows less well (fp32 [32000, 1024] against 8 rows of A, 2 threads: 28 GB/s without, 36 with).
template <typename T, int M, int R>
M1_TARGET_AVX512 void tile(int64_t k, const float* __restrict a, int64_t lda, const T* __restrict b, int64_t ldb,
                           float* __restrict c, int64_t ldc, const T* next) {
  constexpr int64_t kLine = 64 / sizeof(T);  // B values per cache line
  __m512 acc[M][R];
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    if (next && p % kLine == 0) {
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * ldb + p), _MM_HINT_T0);
    }
    __m512 bv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) bv[j] = widen(b + j * ldb + p);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + p);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  if (p < k) {  // 1 .. 15 remaining: masked loads give zeros past the end
    const __mmask16 mask = __mmask16((1u << (k - p)) - 1u);
    __m512 bv[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) bv[j] = widen(b + j * ldb + p, mask);
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      const __m512 av = _mm512_maskz_loadu_ps(mask, a + i * lda + p);
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) c[i * ldc + j] = avx512::hsum(acc[i][j]);
}

// A rows per block and B rows per tile: 4 x 4 (or 2 x 8) accumulators, R + M loads per 16 FMAs. In L2,
// 2 threads: 370 GFLOP/s at 4 x 4, against 205 for 8 rows x 3 and 145 for the portable kernel.
constexpr int64_t kRowsOfA = 4;
constexpr int rows_of_b(int64_t m) { return m <= 2 ? 8 : 4; }

template <typename T, int M>
void tile_rows(int r, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
               const T* next) {
  if (r == 8) {
    if constexpr (M <= 2) return tile<T, M, 8>(k, a, lda, b, ldb, c, ldc, next);
  }
  if (r == 4) return tile<T, M, 4>(k, a, lda, b, ldb, c, ldc, next);
  return tile<T, M, 1>(k, a, lda, b, ldb, c, ldc, next);
}

// One block of M <= 4 A rows against r in {1, 4, 8 (M <= 2)} B rows.
template <typename T>
void block(int M, int r, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
           const T* next) {
  switch (M) {
    case 1: return tile_rows<T, 1>(r, k, a, lda, b, ldb, c, ldc, next);
    case 2: return tile_rows<T, 2>(r, k, a, lda, b, ldb, c, ldc, next);
    case 3: return tile_rows<T, 3>(r, k, a, lda, b, ldb, c, ldc, next);
    default: return tile_rows<T, 4>(r, k, a, lda, b, ldb, c, ldc, next);
  }
}

}  // namespace

template <typename T>
void gemm_nt_few_rows_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                             float* c, int64_t ldc) {
  if (!few_rows_avx512()) throw std::logic_error("m1: gemm_nt_few_rows_avx512 needs AVX-512");
  // B tile outermost: its r rows (r x k values) stay in L1 while every block of A rows passes over
  // them; the first block prefetches the next tile. Full tiles of R rows, then single rows.
  const int R = rows_of_b(m);
  auto pass = [&](int64_t j, int r, const T* next) {
    for (int64_t i = 0; i < m; i += kRowsOfA)
      block<T>(int(std::min(kRowsOfA, m - i)), r, k, a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc,
               i == 0 ? next : nullptr);
  };
  int64_t j = 0;
  for (; j + R <= n; j += R) pass(j, R, j + 2 * R <= n ? b + (j + R) * ldb : nullptr);
  for (; j < n; ++j) pass(j, 1, nullptr);
}

#else  // not x86-64 GCC/Clang

template <typename T>
void gemm_nt_few_rows_avx512(int64_t, int64_t, int64_t, const float*, int64_t, const T*, int64_t, float*, int64_t) {
  throw std::logic_error("m1: gemm_nt_few_rows_avx512 needs AVX-512");
}

#endif

template void gemm_nt_few_rows_avx512<float>(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                                             float*, int64_t);
template void gemm_nt_few_rows_avx512<bf16>(int64_t, int64_t, int64_t, const float*, int64_t, const bf16*, int64_t,
                                            float*, int64_t);
template void gemm_nt_few_rows_avx512<fp16>(int64_t, int64_t, int64_t, const float*, int64_t, const fp16*, int64_t,
                                            float*, int64_t);

}  // namespace m1::cpu
