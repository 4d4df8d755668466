// "NT" GEMMs with AVX-512 (see moe_gemm_avx512_cpu.h).
//
// C[i, j] = sum_p A[i, p] B[j, p], both operands with p contiguous: the
// layout of x rows against weight rows (w_gate_up [2F, D], w_down [D, F]), so
// no operand is repacked. Each 4 x 4 tile of C keeps 16 zmm accumulators; one
// step loads 32 consecutive p of 4 A rows and 4 B rows (8 x 64 B) and issues
// 16 vdpbf16ps (each: 16 lanes x 2 bf16 products summed into fp32), then the
// 16 lanes of each accumulator are summed at the end of the tile. The p tail
// (k % 32) uses masked loads. Panels of 48 A rows (48 x k x 2 B, L2) pass
// over each 4-row block of B (4 x k x 2 B, L1). The fp32 kernel is the same
// with 16 p per step and vfmadd231ps (avx512::tile_nt, common/avx512.h).
//
// Compiled for the AVX-512 targets by function attributes, called only after
// avx512::cpu_has_bf16() / avx512::cpu_has() said yes; the rest of the library
// stays portable.
#include "moe/moe_gemm_avx512_cpu.h"

#include <algorithm>
#include <stdexcept>

#include "common/avx512.h"

namespace m1::moe {

#if defined(M1_AVX512_KERNELS)
namespace {

constexpr int kTile = 4;         // rows of A and of B per tile
constexpr int64_t kPanel = 48;   // rows of A per pass over the B blocks

using avx512::hsum;

template <int MR, int NR>
M1_TARGET_AVX512_BF16 void tile_bf16(int64_t k, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb,
                                      float* c, int64_t ldc, const uint16_t* next_b) {
  __m512 acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 32 <= k; p += 32) {
    if (next_b) {  // the next B block's rows, one 64-byte line each per step
#pragma GCC unroll 4
      for (int j = 0; j < kTile; ++j) _mm_prefetch(reinterpret_cast<const char*>(next_b + j * ldb + p), _MM_HINT_T0);
    }
    __m512i av[MR], bv[NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) av[i] = _mm512_loadu_si512(a + i * lda + p);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_loadu_si512(b + j * ldb + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)av[i], (__m512bh)bv[j]);
  }
  if (p < k) {  // 1 .. 31 remaining: masked loads read zeros past the end
    const __mmask32 mask = _cvtu32_mask32((1u << (k - p)) - 1u);
    __m512i av[MR], bv[NR];
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) av[i] = _mm512_maskz_loadu_epi16(mask, a + i * lda + p);
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) bv[j] = _mm512_maskz_loadu_epi16(mask, b + j * ldb + p);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)av[i], (__m512bh)bv[j]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = hsum(acc[i][j]);
}

template <typename E>
using TileFn = void (*)(int64_t, const E*, int64_t, const E*, int64_t, float*, int64_t, const E*);

// The fp32 tile: common/avx512.h's (the few-rows GEMM's), fp32 on both sides.
template <int MR, int NR>
constexpr TileFn<float> tile_f32 = avx512::tile_nt<float, MR, NR>;

// kBf16Tiles[MR - 1][NR - 1], kF32Tiles[MR - 1][NR - 1]
constexpr TileFn<uint16_t> kBf16Tiles[kTile][kTile] = {
    {tile_bf16<1, 1>, tile_bf16<1, 2>, tile_bf16<1, 3>, tile_bf16<1, 4>},
    {tile_bf16<2, 1>, tile_bf16<2, 2>, tile_bf16<2, 3>, tile_bf16<2, 4>},
    {tile_bf16<3, 1>, tile_bf16<3, 2>, tile_bf16<3, 3>, tile_bf16<3, 4>},
    {tile_bf16<4, 1>, tile_bf16<4, 2>, tile_bf16<4, 3>, tile_bf16<4, 4>},
};
constexpr TileFn<float> kF32Tiles[kTile][kTile] = {
    {tile_f32<1, 1>, tile_f32<1, 2>, tile_f32<1, 3>, tile_f32<1, 4>},
    {tile_f32<2, 1>, tile_f32<2, 2>, tile_f32<2, 3>, tile_f32<2, 4>},
    {tile_f32<3, 1>, tile_f32<3, 2>, tile_f32<3, 3>, tile_f32<3, 4>},
    {tile_f32<4, 1>, tile_f32<4, 2>, tile_f32<4, 3>, tile_f32<4, 4>},
};

// Panels of kPanel A rows against 4-row blocks of B, tile by tile.
template <typename E>
void run_tiles(const TileFn<E> (&tiles)[kTile][kTile], int64_t m, int64_t n, int64_t k, const E* a, int64_t lda,
               const E* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t i0 = 0; i0 < m; i0 += kPanel) {
    const int64_t i1 = std::min(m, i0 + kPanel);
    for (int64_t j = 0; j < n; j += kTile) {
      const int nr = int(std::min<int64_t>(kTile, n - j));
      // The first tile of the panel prefetches the next full block of B (from memory:
      // weights are read once per call), the others find this one in L1.
      const E* next_b = j + 2 * kTile <= n ? b + (j + kTile) * ldb : nullptr;
      for (int64_t i = i0; i < i1; i += kTile) {
        const int mr = int(std::min<int64_t>(kTile, i1 - i));
        tiles[mr - 1][nr - 1](k, a + i * lda, lda, b + j * ldb, ldb, c + i * ldc + j, ldc, i == i0 ? next_b : nullptr);
      }
    }
  }
}

}  // namespace

void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                  int64_t ldc) {
  if (!avx512::cpu_has_bf16()) throw std::logic_error("m1 fused_moe: gemm_nt_bf16 needs AVX512-BF16");
  run_tiles(kBf16Tiles, m, n, k, reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb,
            c, ldc);
}

void gemm_nt_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc) {
  if (!avx512::cpu_has()) throw std::logic_error("m1 fused_moe: gemm_nt_f32 needs AVX-512");
  run_tiles(kF32Tiles, m, n, k, a, lda, b, ldb, c, ldc);
}

#else  // not x86-64 GCC/Clang: no AVX-512 paths

void gemm_nt_bf16(int64_t, int64_t, int64_t, const bf16*, int64_t, const bf16*, int64_t, float*, int64_t) {
  throw std::logic_error("m1 fused_moe: gemm_nt_bf16 needs AVX512-BF16");
}

void gemm_nt_f32(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t) {
  throw std::logic_error("m1 fused_moe: gemm_nt_f32 needs AVX-512");
}

#endif

}  // namespace m1::moe
