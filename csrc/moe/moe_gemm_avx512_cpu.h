// "NT" GEMMs for CPUs with AVX-512, for the fused-MoE CPU kernels:
//   gemm_nt_bf16  bf16 x bf16 with AVX512-BF16 dot products (vdpbf16ps: Intel
//                 Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later);
//   gemm_nt_f32   fp32 x fp32 with AVX-512F FMA.
// Torch-free; one thread per call (the kernels parallelise over tasks). Both
// read A rows against B rows (k contiguous in both), which is the layout of
// gathered x rows against weight rows, so nothing is repacked. On these CPUs
// they run 2-4x faster than sgemm on converted tiles (the MKL inside torch
// takes its AVX2 path on AMD); elsewhere the kernels keep the fp32-tile path.
#pragma once

#include <cstdint>

#include "common/avx512.h"
#include "common/dtype.h"

namespace m1::moe {

// Whether this CPU can run them: avx512::cpu_has_bf16() / avx512::cpu_has() (common/avx512.h).

// C[m, n] = A[m, k] B[n, k]^T: A and B bf16 with k contiguous (row strides
// lda, ldb), C fp32 with row stride ldc, products summed in fp32 (pairs of
// bf16 products per vdpbf16ps lane). Any m, n, k >= 0; k = 0 writes zeros.
// Throws std::logic_error when !avx512::cpu_has_bf16().
void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                  int64_t ldc);

// The same for float32 A and B (fp32 FMA). Throws std::logic_error when
// !avx512::cpu_has().
void gemm_nt_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc);

}  // namespace m1::moe
