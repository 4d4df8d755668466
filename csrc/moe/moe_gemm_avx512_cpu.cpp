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
// With many rows of A (the expert GEMMs of a prefill: 64+ in fp32, 128+ in
// bf16) an outer-product kernel instead: B is packed, 256 32-bit units of k at
// a time (an fp32 value or a bf16 pair), into panels of 32 rows transposed
// ([unit][32], 16 x 16 unit blocks transposed in registers), and a 14 x 32
// tile of C (28 zmm accumulators) takes per unit one broadcast of A per row and
// two loads of the panel: 28 FMAs (vdpbf16ps) per 16 loads and no lane sums.
// [256 | 1024 rows, 1024] x [256, 1024]^T on 2 threads (Zen 5, fp32 FMA peak
// 536 GFLOP/s) against the 4 x 4 dot-product tiles: fp32 329 -> 415 and
// 324 -> 466 GFLOP/s; bf16 (weights out of cache) 598 -> 777 and 610 -> 875.
//
// Compiled for the AVX-512 targets by function attributes, called only after
// avx512::cpu_has_bf16() / avx512::cpu_has() said yes; the rest of the library
// stays portable.
#include "moe/moe_gemm_avx512_cpu.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/avx512.h"

namespace m1::moe {

#if defined(M1_AVX512_KERNELS)
namespace {

constexpr int kTile = 4;         // rows of A and of B per tile
constexpr int64_t kPanel = 48;   // rows of A per pass over the B blocks

using avx512::hsum;
using avx512::kAll;

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

// ---------------------------------------------------------------- fp32, many rows: packed B

constexpr int kPanelRows = 32;      // B rows per packed panel: two zmm of C per row of A
constexpr int kMicroRows = 14;      // A rows per micro-tile: 28 accumulators + 2 B vectors + 1 broadcast
constexpr int64_t kDepth = 256;     // units of k per packed block: a 32 KB panel stays in L1 while A rows pass
// Fewer rows: the dot-product tiles, which need no packing. B out of cache, [m, 1024] x [256, 1024]^T,
// 2 threads, tiles vs packed GFLOP/s. fp32: m = 16: 186 vs 112, 32: 260 vs 202, 48: 289 vs 235,
// 64: 272 vs 286, 128: 291 vs 366, 256: 316 vs 430. bf16: m = 64: 638 vs 529, 96: 636 vs 628,
// 128: 598 vs 679, 256: 598 vs 777, 1024: 610 vs 875.
template <typename E>
constexpr int64_t kPackedMinRows = std::is_same_v<E, float> ? 64 : 128;

// The 16 x 16 block in r transposed in registers (r[i] holds row i; afterwards column i).
M1_TARGET_AVX512 M1_INLINE void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved
    t[2 * i] = _mm512_maskz_unpacklo_ps(kAll, r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_maskz_unpackhi_ps(kAll, r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // u[4i + q]: rows 4i .. 4i+3 of column 4L + q in each 128-bit lane L
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    u[4 * i] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, a, c));
    u[4 * i + 1] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, a, c));
    u[4 * i + 2] = _mm512_castpd_ps(_mm512_maskz_unpacklo_pd(0xFF, b, d));
    u[4 * i + 3] = _mm512_castpd_ps(_mm512_maskz_unpackhi_pd(0xFF, b, d));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes gathered across the four row groups
    t[i] = _mm512_maskz_shuffle_f32x4(kAll, u[i], u[4 + i], 0x88);
    t[4 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[i], u[4 + i], 0xDD);
    t[8 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[8 + i], u[12 + i], 0x88);
    t[12 + i] = _mm512_maskz_shuffle_f32x4(kAll, u[8 + i], u[12 + i], 0xDD);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_maskz_shuffle_f32x4(kAll, t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_maskz_shuffle_f32x4(kAll, t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_maskz_shuffle_f32x4(kAll, t[4 + i], t[12 + i], 0xDD);
  }
}

// Packed panels hold 32-bit units: one fp32 value, or a pair of consecutive bf16 values of k (the
// operand pair of one vdpbf16ps lane). Values of k per unit:
template <typename E>
constexpr int64_t kPerUnit = 4 / int64_t(sizeof(E));

// 16 units of row `row` from unit u: masked to the `width` values of k left (zeros past them).
M1_TARGET_AVX512 inline __m512 load_units(const float* row, int64_t width) {
  return _mm512_maskz_loadu_ps(__mmask16(width >= 16 ? 0xFFFFu : (1u << width) - 1u), row);
}
M1_TARGET_AVX512 inline __m512 load_units(const uint16_t* row, int64_t width) {
  const __mmask32 mask = _cvtu32_mask32(width >= 32 ? 0xFFFFFFFFu : (1u << width) - 1u);
  return _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, row));
}

// panel[u * 32 + j] = unit u of B row j for the kc values of k of this depth block and the panel's
// `rows` <= 32 rows of B (zeros past them): 16 x 16 unit blocks read row by row (sequential
// streams the prefetcher follows; gathers from weights out of cache were 19% of the fp32 GEMM) and
// transposed in registers.
template <typename E>
M1_TARGET_AVX512 void pack_panel(const E* b, int64_t ldb, int rows, int64_t kc, float* panel) {
  constexpr int64_t kBlock = 16 * kPerUnit<E>;  // values of k per 16 units
  for (int h = 0; h < kPanelRows / 16; ++h) {
    const int live = std::clamp(rows - 16 * h, 0, 16);
    const E* base = b + int64_t(16 * h) * ldb;
    for (int64_t p = 0; p < kc; p += kBlock) {
      const int64_t width = std::min(kBlock, kc - p);
      __m512 r[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) r[j] = j < live ? load_units(base + j * ldb + p, width) : _mm512_setzero_ps();
      transpose16(r);
      const int64_t units = (width + kPerUnit<E> - 1) / kPerUnit<E>;
      for (int64_t q = 0; q < units; ++q)
        _mm512_storeu_ps(panel + (p / kPerUnit<E> + q) * kPanelRows + 16 * h, r[q]);
    }
  }
}

// One unit of k into the MR x 32 accumulators: A[i, unit] broadcast against the panel's two
// vectors; fp32 FMA, or vdpbf16ps on a bf16 pair (`half`: the last, odd value of k alone).
// Both instantiations carry the AVX512-BF16 target so that the bf16 one can inline; the fp32 one
// issues no BF16 instruction and runs wherever avx512::cpu_has() holds.
template <typename E, int MR, bool half = false>
M1_TARGET_AVX512_BF16 M1_INLINE void unit_step(__m512 (&acc)[MR][2], const E* a, int64_t lda, int64_t p,
                                                const float* units) {
  const __m512 b0 = _mm512_loadu_ps(units), b1 = _mm512_loadu_ps(units + 16);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if constexpr (std::is_same_v<E, float>) {
      const __m512 av = _mm512_set1_ps(a[i * lda + p]);
      acc[i][0] = _mm512_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(av, b1, acc[i][1]);
    } else {
      uint32_t pair = a[i * lda + p];
      if constexpr (!half) std::memcpy(&pair, a + i * lda + p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int32_t(pair));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], av, (__m512bh)b0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], av, (__m512bh)b1);
    }
  }
}

// C[0:MR, 0:cols] (+)= A[0:MR, 0:kc] panel^T, unit by unit. `accumulate`: add to C (later depth
// blocks), else overwrite.
template <typename E, int MR>
M1_TARGET_AVX512_BF16 void micro_tile(int64_t kc, const E* a, int64_t lda, const float* panel, float* c, int64_t ldc,
                                      int cols, bool accumulate) {
  constexpr int64_t kUnit = kPerUnit<E>;
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t full = kc / kUnit;
  for (int64_t u = 0; u < full; ++u) unit_step<E, MR>(acc, a, lda, u * kUnit, panel + u * kPanelRows);
  if (full * kUnit < kc) unit_step<E, MR, true>(acc, a, lda, full * kUnit, panel + full * kPanelRows);
  const __mmask16 lo = __mmask16(cols >= 16 ? 0xFFFFu : (1u << cols) - 1u);
  const __mmask16 hi = __mmask16(cols >= 32 ? 0xFFFFu : cols <= 16 ? 0u : (1u << (cols - 16)) - 1u);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    __m512 v0 = acc[i][0], v1 = acc[i][1];
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(lo, ci));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(hi, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, lo, v0);
    _mm512_mask_storeu_ps(ci + 16, hi, v1);
  }
}

template <typename E>
using MicroTile = void (*)(int64_t, const E*, int64_t, const float*, float*, int64_t, int, bool);
template <typename E, int... I>
constexpr std::array<MicroTile<E>, sizeof...(I)> micro_tiles(std::integer_sequence<int, I...>) {
  return {micro_tile<E, I + 1>...};
}
template <typename E>
constexpr std::array<MicroTile<E>, kMicroRows> kMicroTiles =
    micro_tiles<E>(std::make_integer_sequence<int, kMicroRows>{});

// Depth blocks of kDepth units: pack every panel of B for the block (ceil(n / 32) x 32 KB, L2),
// then every micro-tile of C against it; later blocks add to C.
template <typename E>
void gemm_nt_packed(int64_t m, int64_t n, int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb, float* c,
                    int64_t ldc) {
  constexpr int64_t kDepthValues = kDepth * kPerUnit<E>;
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  thread_local std::vector<float> packed;
  packed.resize(std::max<size_t>(packed.size(), size_t(panels * kDepth * kPanelRows)));
  for (int64_t p0 = 0; p0 < k; p0 += kDepthValues) {
    const int64_t kc = std::min(kDepthValues, k - p0);
    for (int64_t q = 0; q < panels; ++q)
      pack_panel(b + q * kPanelRows * ldb + p0, ldb, int(std::min<int64_t>(kPanelRows, n - q * kPanelRows)), kc,
                 packed.data() + q * kDepth * kPanelRows);
    for (int64_t q = 0; q < panels; ++q) {
      const int cols = int(std::min<int64_t>(kPanelRows, n - q * kPanelRows));
      for (int64_t i = 0; i < m; i += kMicroRows) {
        const int rows = int(std::min<int64_t>(kMicroRows, m - i));
        kMicroTiles<E>[size_t(rows - 1)](kc, a + i * lda + p0, lda, packed.data() + q * kDepth * kPanelRows,
                                         c + i * ldc + q * kPanelRows, ldc, cols, p0 > 0);
      }
    }
  }
}

}  // namespace

void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                  int64_t ldc) {
  if (!avx512::cpu_has_bf16()) throw std::logic_error("m1 fused_moe: gemm_nt_bf16 needs AVX512-BF16");
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(b);
  if (m >= kPackedMinRows<uint16_t> && k > 0) return gemm_nt_packed(m, n, k, a16, lda, b16, ldb, c, ldc);
  run_tiles(kBf16Tiles, m, n, k, reinterpret_cast<const uint16_t*>(a), lda, reinterpret_cast<const uint16_t*>(b), ldb,
            c, ldc);
}

void gemm_nt_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc) {
  if (!avx512::cpu_has()) throw std::logic_error("m1 fused_moe: gemm_nt_f32 needs AVX-512");
  if (m >= kPackedMinRows<float> && k > 0) return gemm_nt_packed(m, n, k, a, lda, b, ldb, c, ldc);
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
