// bf16 GEMM on CPUs with AVX512-BF16 dot products (vdpbf16ps: Intel Cooper
// Lake / Sapphire Rapids and later, AMD Zen 4 and later), for the fused-MoE
// CPU kernels. Torch-free; one thread per call (the kernels parallelise over
// tasks). On such CPUs a bf16 product runs 3-4x faster than converting to
// fp32 and calling sgemm; elsewhere the kernels keep the fp32-tile path.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace m1::moe {

// Whether this CPU can run gemm_nt_bf16 (checked once, at the first call).
bool cpu_has_bf16_dot();

// C[m, n] = A[m, k] B[n, k]^T: A and B bf16 with k contiguous (row strides
// lda, ldb), C fp32 with row stride ldc, products summed in fp32 (pairs of
// bf16 products per vdpbf16ps lane). Any m, n, k >= 0; k = 0 writes zeros.
// Throws std::logic_error when !cpu_has_bf16_dot().
void gemm_nt_bf16(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                  int64_t ldc);

}  // namespace m1::moe
