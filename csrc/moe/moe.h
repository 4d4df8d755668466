// Fused MoE (DESIGN 3.2): params structs and launchers, torch-free.
//
//   T tokens, D model dim, F expert FFN dim, E experts, k choices per token.
//
//   h_tj = W_gate_up[e] x_t                 [2F]  (rows 0..F-1 gate g, F..2F-1 up u)
//   a_tj = silu(g) * u                      [F]
//   y_t  = sum_j w_tj W_down[e] a_tj        [D]   e = topk_ids[t, j], w = topk_weights[t, j]
//
// Backward, with dy_t the gradient of y_t and dA_tj = W_down[e]^T dy_t:
//
//   d w_tj       = dA_tj . a_tj
//   dg, du       = w_tj dA_tj * u * silu'(g),  w_tj dA_tj * silu(g)      dh = [dg, du]
//   dW_down[e]  += (w_tj dy_t) a_tj^T          dW_gate_up[e] += dh x_t^T
//   dx_t        += sum_j W_gate_up[e]^T dh_tj
//
// The glue validates every tensor (shapes, dtypes, devices, ids in [0, E))
// and fills these structs; the kernels see raw pointers only.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace m1::moe {

struct MoeShape {
  int64_t tokens = 0, dim = 0, ffn = 0, experts = 0, topk = 0;  // T, D, F, E, k
  int64_t slots() const { return tokens * topk; }
};

// The GEMM path of the CPU kernels. kAuto: m1's AVX-512 kernels where the CPU
// has them (bfloat16: AVX512-BF16 dot products; float32: AVX-512 FMA), fp32
// tiles through sgemm otherwise; kFp32Tiles: always the portable path (the
// tests force it to cover both paths on one machine; the glue passes kAuto).
enum class CpuGemm { kAuto, kFp32Tiles };

// Inputs shared by the forward and the backward.
struct MoeInputs {
  MoeShape shape;
  DType dtype = DType::kFloat32;  // x, w_gate_up, w_down, y and every gradient but d topk_weights

  const void* x = nullptr;       // [T, D], last dim contiguous
  int64_t x_row_stride = 0;      // elements between rows of x
  const void* w_gate_up = nullptr;  // [E, 2F, D] contiguous
  const void* w_down = nullptr;     // [E, D, F] contiguous
  const void* topk_weights = nullptr;  // [T, k] contiguous, weight_dtype
  DType weight_dtype = DType::kFloat32;  // float32 (float64 with float64 x)
  const void* topk_ids = nullptr;      // [T, k] contiguous, int32 or int64
  bool ids_int64 = true;
  CpuGemm cpu_gemm = CpuGemm::kAuto;   // CPU kernels only
  // CUDA forward step 3 (moe_cuda.cu): the fused gate/up kernel where it supports the inputs (true),
  // or the unfused path (false). The torch glue sets it (M1_MOE_GATE_UP, moe_glue_cuda.cpp).
  bool cuda_fused_gate_up = true;
};

struct ForwardParams {
  MoeInputs in;
  void* y = nullptr;  // [T, D] contiguous, dtype, written
  // [T * k, 2F] contiguous, dtype, rows in expert-sorted order (moe_permute.h):
  // the gate/up pre-activations kept for the backward. Null: not kept.
  void* gate_up = nullptr;
};

struct BackwardParams {
  MoeInputs in;
  const void* grad_y = nullptr;  // [T, D], dtype, last dim contiguous
  int64_t grad_y_row_stride = 0;
  // The forward's saved pre-activations ([T * k, 2F], dtype, expert-sorted
  // rows), or null: then they are recomputed (one more gate_up GEMM).
  const void* gate_up = nullptr;
  void* grad_x = nullptr;            // [T, D] contiguous, dtype, written
  void* grad_w_gate_up = nullptr;    // [E, 2F, D] contiguous, dtype, written
  void* grad_w_down = nullptr;       // [E, D, F] contiguous, dtype, written
  void* grad_topk_weights = nullptr; // [T, k] contiguous, weight_dtype, written
};

// CPU kernels. Throw std::invalid_argument if an id is outside [0, E) (the
// glue checks first; the kernels check again and never index with one).
void forward_cpu(const ForwardParams& p);
void backward_cpu(const BackwardParams& p);

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
// CUDA launchers (moe_cuda.cu): float32, bfloat16, float16; every pointer on
// one device; bf16/fp16 need D and F to be multiples of 8 (16-byte rows for
// the tensor-core GEMMs; the glue checks). `workspace` is device memory of
// the size the *_workspace_bytes function gives (save_gate_up / gate_up_given:
// whether p.gate_up is set; the forward's size depends on the inputs' layout
// too: the fused gate/up path needs no gathered copy of x). They synchronise the stream once, to read the
// expert sizes back, and return the number of ids outside [0, E): when it is
// not zero nothing was written to the outputs. Throw std::runtime_error on a
// CUDA or CUTLASS failure.
size_t forward_cuda_workspace_bytes(const MoeInputs& in, bool save_gate_up);
size_t backward_cuda_workspace_bytes(const MoeShape& s, DType dtype, bool gate_up_given);
int64_t forward_cuda(const ForwardParams& p, void* workspace, cudaStream_t stream);
int64_t backward_cuda(const BackwardParams& p, void* workspace, cudaStream_t stream);
#endif

}  // namespace m1::moe
