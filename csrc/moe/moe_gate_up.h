// The fused gate/up step of the CUDA MoE forward (moe_gate_up_cuda.cu):
// a grouped dual GEMM with the row gather in its A load and SiLU * up and the
// routing weight in its epilogue. Torch-free.
//
//   g   = x[token of slot p] W_gate[e]^T      W_gate[e] = rows 0..F-1 of W_gate_up[e]    [F]
//   u   = x[token of slot p] W_up[e]^T        W_up[e]   = rows F..2F-1                  [F]
//   act[p] = w_p silu(g) u                    input dtype                              [P, F]
//   gate_up[p] = [g | u]                      input dtype, only when requested         [P, 2F]
//
// for every expert-sorted position p of expert e (moe_permute.h), w_p the
// routing weight of the slot at p. One CTA per (expert, 64-row tile, 64-column
// tile) item of moe_tiles.h; both products accumulate in fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "moe/moe_tiles.h"

namespace m1::moe {

// The work-item tile: BM expert rows x BN gate (and BN up) columns.
constexpr int64_t kGateUpTileM = 64;
constexpr int64_t kGateUpTileN = 64;

struct GateUpParams {
  int64_t dim = 0, ffn = 0, experts = 0, topk = 0;  // D, F, E, k

  const void* x = nullptr;        // [T, D], dtype, last dim contiguous
  int64_t x_row_stride = 0;       // elements
  const void* w_gate_up = nullptr;  // [E, 2F, D] contiguous, dtype
  const float* topk_weights = nullptr;    // [T * k]
  const int32_t* sorted_slots = nullptr;  // [P] (moe_permute.h)
  const int32_t* expert_offsets = nullptr;  // [E + 1], device
  const int64_t* tile_offsets = nullptr;    // [E + 1], device (build_tile_offsets)
  int64_t tiles = 0;                        // tile_offsets[E]: the grid

  void* act = nullptr;      // [P, F] contiguous, dtype, written
  void* gate_up = nullptr;  // [P, 2F] contiguous, dtype, written; or null
};

// Whether the fused kernel takes these inputs. float32: always (scalar
// loads). bfloat16 / float16: the tensor-core path reads x and W_gate_up in
// 16-byte vectors, so both must start on 16-byte boundaries with 16-byte rows
// (D and x's row stride multiples of 8); otherwise the caller keeps the
// unfused path (gather, CUTLASS GEMM, elementwise pass).
inline bool gate_up_fused_supported(DType dtype, const void* x, int64_t x_row_stride, const void* w_gate_up,
                                    int64_t dim) {
  if (dtype == DType::kFloat32) return true;
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  return rows_are_16b_vectors(reinterpret_cast<uintptr_t>(x), x_row_stride, dim, 2) &&
         rows_are_16b_vectors(reinterpret_cast<uintptr_t>(w_gate_up), dim, dim, 2);
}

// Launches the grid of p.tiles CTAs on `stream` (nothing when p.tiles is 0).
// Throws std::invalid_argument for a dtype without a kernel or inputs that
// gate_up_fused_supported rejects, std::runtime_error on a launch failure.
void gate_up_silu_cuda(const GateUpParams& p, DType dtype, cudaStream_t stream);

}  // namespace m1::moe
