// Grouped GEMMs of the CUDA fused-MoE path: one launch runs one GEMM per
// expert (CUTLASS 2.x GemmGrouped, sm_80 tensor cores for bf16/fp16, fp32
// SIMT for float32; the sm_80 code also runs on sm_90).
//
//   D[m, n] = sum_k op(A)[m, k] op(B)[k, n]        fp32 accumulation, D row-major
//
// The six GEMMs of the forward and backward need three operand layouts:
//
//   kRowCol  A [M, K] row-major, B [N, K] row-major (= [K, N] column-major):
//            h = xs_e W_gate_up[e]^T, ys = act_e W_down[e]^T        (forward)
//   kRowRow  A [M, K] row-major, B [K, N] row-major:
//            dA = dys_e W_down[e], dxs = dh_e W_gate_up[e]           (data gradients)
//   kColRow  A [K, M] row-major (= [M, K] column-major), B [K, N] row-major:
//            dW_down[e] = dys_e^T aw_e, dW_gate_up[e] = dh_e^T xs_e (weight gradients)
//
// Torch-free: pointers, sizes and leading dimensions; problems are built on
// the host (the expert sizes are read back once per op, see moe_cuda.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/dtype.h"

namespace m1::moe {

enum class GemmLayout { kRowCol, kRowRow, kColRow };

struct GemmProblem {
  int m = 0, n = 0, k = 0;
  const void* a = nullptr;  // input dtype
  int64_t lda = 0;          // leading dimension (elements) in A's storage layout
  const void* b = nullptr;  // input dtype
  int64_t ldb = 0;
  void* d = nullptr;        // the output dtype, row-major
  int64_t ldd = 0;
};

// Device bytes grouped_gemm needs for `count` problems' argument arrays.
size_t grouped_gemm_args_bytes(int count);

// Runs every problem (m, n, k > 0) in one grouped launch on `stream`.
// `out_float`: D is float32, else the input dtype. bf16/fp16 need every
// leading dimension and pointer 16-byte aligned (8 elements); float32 has no
// alignment requirement. `args` is device memory of grouped_gemm_args_bytes;
// it must not be reused before the launch has run (stream order suffices).
// Throws std::runtime_error on a CUTLASS or CUDA failure.
void grouped_gemm(DType dtype, GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems,
                  void* args, cudaStream_t stream);

// The per-dtype instantiations (moe_gemm_<dtype>.cu) grouped_gemm dispatches to.
void grouped_gemm_bf16(GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems, void* args,
                       cudaStream_t stream);
void grouped_gemm_fp16(GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems, void* args,
                       cudaStream_t stream);
void grouped_gemm_fp32(GemmLayout layout, const std::vector<GemmProblem>& problems, void* args,
                       cudaStream_t stream);

}  // namespace m1::moe
