// A GEMM for a few rows of A against many rows of B (a fused-MoE expert with
// a decode-sized batch, the FP32 head while decoding): bound by reading B,
// which it reads once in its storage type. Torch-free, CPU only; hot loops are
// multiversioned (common/macros.h). Used by csrc/moe and csrc/logits.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "common/avx512.h"
#include "common/dtype.h"
#include "common/macros.h"

namespace m1::cpu {

// C[m, n] = A[m, k] B[n, k]^T for few rows of A (m <= kFewRows per block):
// A in fp32 (row stride lda), B read once in its storage type T and widened
// in registers, C fp32 (row stride ldc). With 16-bit weights this reads half
// the bytes a converted fp32 copy would, which is what a small batch is
// bound by; the M accumulator rows of 8 lanes stay in vector registers.
constexpr int64_t kFewRows = 8;

// 8 floats as one vector (GCC vector extension: AVX2 in the x86-64-v3 clone,
// two SSE halves in the baseline one), so that accumulators stay in registers.
typedef float v8sf __attribute__((vector_size(32)));
typedef uint16_t v8hu __attribute__((vector_size(16)));
typedef uint32_t v8su __attribute__((vector_size(32)));

// Loads through an out-parameter: a vector returned by value from a function
// compiled without AVX would draw GCC's ABI warning (-Wpsabi), inlined or not.
M1_INLINE void load8(const float* p, v8sf& v) { std::memcpy(&v, p, sizeof(v)); }

M1_INLINE void load8(const bf16* p, v8sf& v) {  // bf16 -> fp32: zero-extend, shift into the high half
  v8hu h;
  std::memcpy(&h, p, sizeof(h));
  const v8su w = __builtin_convertvector(h, v8su) << 16;
  std::memcpy(&v, &w, sizeof(v));
}

M1_INLINE void load8(const fp16* p, v8sf& v) {
  for (int l = 0; l < 8; ++l) v[l] = fp16_to_float(p[l]);
}

template <typename T, int M>
M1_CPU_MULTIVERSION void gemm_nt_few_rows_fixed(int64_t n, int64_t k, const float* __restrict a, int64_t lda,
                                                const T* __restrict b, int64_t ldb, float* __restrict c,
                                                int64_t ldc) {
  constexpr int V = 8;                              // lanes of one accumulator vector
  constexpr int U = M >= 4 ? 1 : (M >= 2 ? 2 : 4);  // independent sets: >= 4 FMA chains in flight
  for (int64_t j = 0; j < n; ++j) {
    const T* __restrict brow = b + j * ldb;
    v8sf acc[U][M];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) acc[u][i] = v8sf{};
    int64_t p = 0;
    for (; p + U * V <= k; p += U * V) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        v8sf bv, av;
        load8(brow + p + u * V, bv);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
          load8(a + i * lda + p + u * V, av);
          acc[u][i] += av * bv;
        }
      }
    }
    for (int i = 0; i < M; ++i) {
      v8sf t = acc[0][i];
      for (int u = 1; u < U; ++u) t += acc[u][i];
      float sum = 0.f;
      for (int l = 0; l < V; ++l) sum += t[l];
      for (int64_t q = p; q < k; ++q) sum += a[i * lda + q] * load_as<float>(brow[q]);
      c[i * ldc + j] = sum;
    }
  }
}

template <typename T>
void gemm_nt_few_rows_block(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                            float* c, int64_t ldc) {
  switch (m) {
    case 1: gemm_nt_few_rows_fixed<T, 1>(n, k, a, lda, b, ldb, c, ldc); break;
    case 2: gemm_nt_few_rows_fixed<T, 2>(n, k, a, lda, b, ldb, c, ldc); break;
    case 3: gemm_nt_few_rows_fixed<T, 3>(n, k, a, lda, b, ldb, c, ldc); break;
    case 4: gemm_nt_few_rows_fixed<T, 4>(n, k, a, lda, b, ldb, c, ldc); break;
    case 5: gemm_nt_few_rows_fixed<T, 5>(n, k, a, lda, b, ldb, c, ldc); break;
    case 6: gemm_nt_few_rows_fixed<T, 6>(n, k, a, lda, b, ldb, c, ldc); break;
    case 7: gemm_nt_few_rows_fixed<T, 7>(n, k, a, lda, b, ldb, c, ldc); break;
    case 8: gemm_nt_few_rows_fixed<T, 8>(n, k, a, lda, b, ldb, c, ldc); break;
    default: throw std::logic_error("m1: gemm_nt_few_rows_block takes 1 to 8 rows");
  }
}

// The same contract with AVX-512, several B rows per tile from 3 rows of A (common/few_rows_avx512_cpu.cpp).
// Any m; T float, bf16 or fp16. Only when avx512::cpu_has() (checked once), otherwise it throws
// std::logic_error. Weight read rate against the kernels above, [32000, 1024] out of cache, 2
// threads (Zen 5): fp32 m = 4: 49 -> 47-52 GB/s, m = 8: 14 -> 36; bf16 m = 4: 27 -> 62, m = 8:
// 12 -> 46; bf16 m = 1 on the model's sequence of 6-12 MB weights: 47 -> 58. For fp32 with m <= 2
// the portable kernel streams as fast (50-65 GB/s) and keeps it.
template <typename T>
void gemm_nt_few_rows_avx512(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                             float* c, int64_t ldc);

// Any m: the AVX-512 kernel where the CPU has it (see above); otherwise blocks of 8 rows of A against blocks of
// 16 rows of B (which stay in L1/L2 while every row block of A passes over them).
template <typename T>
void gemm_nt_few_rows(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                      float* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (m >= 3 && avx512::cpu_has()) return gemm_nt_few_rows_avx512<T>(m, n, k, a, lda, b, ldb, c, ldc);
  } else if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, fp16>) {
    if (avx512::cpu_has()) return gemm_nt_few_rows_avx512<T>(m, n, k, a, lda, b, ldb, c, ldc);
  }
  constexpr int64_t kBRows = 16;
  for (int64_t j = 0; j < n; j += kBRows)
    for (int64_t i = 0; i < m; i += kFewRows)
      gemm_nt_few_rows_block(std::min(kFewRows, m - i), std::min(kBRows, n - j), k, a + i * lda, lda, b + j * ldb,
                             ldb, c + i * ldc + j, ldc);
}

}  // namespace m1::cpu
