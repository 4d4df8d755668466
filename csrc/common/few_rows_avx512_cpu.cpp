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
// when the CPU has it (avx512::cpu_has()); the rest of the library stays portable.
#include "common/few_rows_gemm.h"

#include "common/avx512.h"

namespace m1::cpu {

#if defined(M1_AVX512_KERNELS)
namespace {

using avx512::tile_nt;

// A rows per block and B rows per tile: 4 x 4 accumulators, R + M loads per 16 FMAs. In L2, 2
// threads: 370 GFLOP/s at 4 x 4, against 205 for 8 rows x 3 and 145 for the portable kernel.
// With one or two rows of A the weight stream alone bounds the kernel, and one B row at a time
// streams best: a sequence of twelve [6144, 1024] bf16 weights (the model's pattern: 6-12 MB each,
// one after the other), 2 threads, GB/s in one run: 1 row of A against 8 B rows with the next tile
// prefetched 49, against 1 B row 53, against 1 B row with 2 accumulators on alternate 16-p slices
// 58-59 (fp32 weights, portable kernel, same bytes: 62-65); 2 rows of A: 8 B rows 35, 1 B row 39.
constexpr int64_t kRowsOfA = 4;
constexpr int rows_of_b(int64_t m) { return m <= 2 ? 1 : 4; }

template <typename T, int M>
void tile_rows(int r, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb, float* c, int64_t ldc,
               const T* next) {
  if (r == 4) return tile_nt<T, M, 4>(k, a, lda, b, ldb, c, ldc, next);
  return tile_nt<T, M, 1, M == 1 ? 2 : 1>(k, a, lda, b, ldb, c, ldc, nullptr);
}

// One block of M <= 4 A rows against r in {1, 4} B rows.
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
  if (!avx512::cpu_has()) throw std::logic_error("m1: gemm_nt_few_rows_avx512 needs AVX-512");
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
