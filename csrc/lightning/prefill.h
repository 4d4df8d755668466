// Lightning attention prefill (blockwise forward) and its backward.
//
// Shapes: B batch, T tokens, H heads, K key dim, V value dim, N sequences
// (N = B, or the number of cu_seqlens segments when B == 1).
//
//   q, k [B, T, H, K]   v, o [B, T, H, V]   slope [H]   states [N, H, K, V]
//
// Per sequence and head, lambda = exp(-slope_h), S_0 the initial state:
//   S_t = lambda S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,   final = S_T
// Backward, with G_t the gradient flowing into S_t (G_T includes d final):
//   G_t  = scale * q_t^T do_t + lambda G_{t+1}
//   dq_t = scale * do_t S_t^T,  dk_t = G_t v_t,  dv_t = k_t G_t,  d S_0 = lambda G_1
//
// Params structs + launchers (one per device); torch-free. The glue in
// lightning_glue*.cpp validates tensors (cu_seqlens values included) and
// fills these structs.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "lightning/lightning_common.h"

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace m1::lightning {

struct PrefillParams {
  int64_t batch = 0, seqlen = 0, heads = 0, dk = 0, dv = 0;  // B, T, H, K, V
  int64_t num_seqs = 0;                                       // N
  int64_t block_size = 0;                                     // tokens per block, >= 1
  int64_t cpu_threads = 1;  // CPU kernels: threads of the pool (for splitting work), from the glue

  const void* q = nullptr;  // [B, T, H, K], in_dtype, last dim contiguous
  const void* k = nullptr;  // [B, T, H, K]
  const void* v = nullptr;  // [B, T, H, V]
  TokenStrides q_strides{}, k_strides{}, v_strides{};
  DType in_dtype = DType::kFloat32;  // q, k, v, o (and do, dq, dk, dv)

  const float* slope = nullptr;         // [H] float32
  const int64_t* cu_seqlens = nullptr;  // [N + 1] validated offsets, or nullptr (N = B)
  // States are contiguous [N, H, K, V] in state_dtype: float32, or float64
  // with float64 inputs.
  const void* initial_state = nullptr;  // read; nullptr = zeros
  DType state_dtype = DType::kFloat32;
  double scale = 1.0;

  // Forward outputs.
  void* o = nullptr;            // [B, T, H, V] contiguous, in_dtype
  void* final_state = nullptr;  // [N, H, K, V] contiguous, state_dtype

  // Backward inputs and outputs.
  const void* grad_o = nullptr;  // [B, T, H, V], in_dtype, last dim contiguous
  TokenStrides grad_o_strides{};
  const void* grad_final_state = nullptr;  // [N, H, K, V] contiguous, state_dtype, or nullptr = zeros
  void* grad_q = nullptr;                  // [B, T, H, K] contiguous, in_dtype
  void* grad_k = nullptr;                  // [B, T, H, K] contiguous, in_dtype
  void* grad_v = nullptr;                  // [B, T, H, V] contiguous, in_dtype
  void* grad_initial_state = nullptr;      // [N, H, K, V] contiguous, state_dtype
};

// Default tokens per block when the caller passes none.
constexpr int64_t kCpuDefaultBlock = 64;
constexpr int64_t kCpuMaxBlock = 4096;  // the CPU keeps a block x block score tile per thread
constexpr int64_t kMaxHeadDim = 256;    // K, V on every device

void prefill_fwd_cpu(const PrefillParams& p);
void prefill_bwd_cpu(const PrefillParams& p);

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
constexpr int64_t kCudaBlock = 64;  // the CUDA kernels' block: their MMA tile along T

// Head dims the CUDA kernels are compiled for (K == V).
M1_HOST_DEVICE M1_INLINE bool cuda_prefill_supports(int64_t dk, int64_t dv) {
  return dk == dv && (dk == 64 || dk == 128);
}

// Throw std::runtime_error on a launch failure; states are float32.
void prefill_fwd_cuda(const PrefillParams& p, cudaStream_t stream);
void prefill_bwd_cuda(const PrefillParams& p, cudaStream_t stream);
#endif

}  // namespace m1::lightning
