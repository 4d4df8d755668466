// The fused gate/up grouped dual GEMM of the CUDA MoE forward (moe_gate_up.h):
// one CTA per (expert, M-tile, N-tile) work item of moe_tiles.h, two
// accumulators (gate and up) sharing one A tile, SiLU * up and the routing
// weight in the epilogue.
//
// Shapes: BM = 64 expert rows, BN = 64 columns of each of gate and up, BK
// along D; P expert-sorted rows in all, F gate (and up) columns, D = K.
//
// bfloat16 / float16 (tensor cores, CuTe SM80 m16n8k16 atoms, fp32
// accumulation; the sm_80 code also runs on sm_90):
//   128 threads = 2 x 2 warps; each warp holds a quarter of both 64 x 64
//   accumulators (2 x 4 m16n8 atoms, interleaved with the other warps').
//   Per BK = 32 step, each thread loads 2 16-byte vectors of each of
//     A = x[token of sorted slot row0 + r, k0 ..]   (the row gather: xs is never built)
//     G = W_gate_up[e][col0 + n, k0 ..],  U = W_gate_up[e][F + col0 + n, k0 ..]
//   into registers (the next step's loads are in flight during this step's
//   MMAs) and stores them to one of two shared-memory stages (one barrier per
//   step), rows padded to BK + 8 elements (80 B: 16-byte aligned vector
//   stores, rows start on staggered banks):
//     smem 2 stages x 3 x 64 x 40 x 2 B = 30 KB (static).
//   Tails: rows r >= the tile's rows, columns n >= the tile's cols and K
//   vectors at k >= D load zeros (D is a multiple of 8, so a 16-byte vector
//   is all in or all out), and the epilogue writes only r < rows, n < cols.
//   Alignment (16-byte vectors of x and W_gate_up) is checked by
//   gate_up_fused_supported before the launch; the caller falls back to the
//   unfused path when it fails.
// float32 (exact fp32, SIMT FFMA, no TF32, no alignment requirement):
//   256 threads = 16 x 16, each 4 x 4 of both accumulators (rows ty + 16 i,
//   columns tx + 16 j); BK = 16; tiles stored k-major with one pad column:
//     smem 3 x 16 x 65 x 4 B = 12.2 KB (static).
//   Same tails (scalar predicated loads, zeros outside).
//
// Epilogue (both): for r < rows, n < cols, p = row0 + r, c = col0 + n:
//   act[p, c] = w[sorted_slots[p]] * silu(g) * u   from the fp32 accumulators
//   gate_up[p, c] = g, gate_up[p, F + c] = u       when requested (the backward's h)
#include <cute/tensor.hpp>

#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/sm80_mma.cuh"
#include "moe/moe_gate_up.h"
#include "moe/moe_tiles.h"

namespace m1::moe {
namespace {

constexpr int kBM = int(kGateUpTileM);
constexpr int kBN = int(kGateUpTileN);

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// The epilogue of element (r, n) of tile w, r < rows, n < cols.
template <typename T>
__device__ __forceinline__ void store_outputs(const GateUpParams& p, const GateUpTile& w, int r, int n, float g,
                                              float u) {
  const float weight = p.topk_weights[p.sorted_slots[w.row0 + r]];
  const GateUpOut o = gate_up_out(w, p.ffn, r, n);
  static_cast<T*>(p.act)[o.act] = store_from<T>(weight * g * sigmoid(g) * u);
  if (p.gate_up != nullptr) {
    static_cast<T*>(p.gate_up)[o.gate] = store_from<T>(g);
    static_cast<T*>(p.gate_up)[o.up] = store_from<T>(u);
  }
}

// Row r's source pointer from an offset of moe_tiles.h (null for a tail row).
template <typename T>
__device__ __forceinline__ const T* row_ptr(const T* base, int64_t offset) {
  return offset >= 0 ? base + offset : nullptr;
}

// ---------------------------------------------------------------- tensor cores (bf16, fp16)

constexpr int kMmaThreads = 128;
constexpr int kBK = 32;
constexpr int kLds = kBK + 8;  // shared-memory row stride in elements (80 B)
constexpr int kVec = 8;        // elements per 16-byte vector
constexpr int kVecsPerRow = kBK / kVec;
constexpr int kVecsPerThread = kBM * kVecsPerRow / kMmaThreads;  // per operand tile
constexpr int kTileElems = kBM * kLds;       // one operand tile in shared memory
constexpr int kStageElems = 3 * kTileElems;  // A, G, U
constexpr int kStages = 2;
static_assert(kBM == kBN, "A and B tiles share the load assignment");
static_assert(kBM * kVecsPerRow % kMmaThreads == 0, "whole vectors per thread");

template <typename T>
using Mma = Sm80Mma<T>;  // bf16 / fp16 only here: fp32 runs the SIMT kernel (exact FFMA)

// 2 x 2 warps: a 32 x 16 x 16 tile, repeated to cover 64 x 64.
template <typename T>
using TiledMma =
    decltype(cute::make_tiled_mma(typename Mma<T>::Atom{}, cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>{}));

template <typename T>
__global__ void __launch_bounds__(kMmaThreads) gate_up_mma_kernel(const GateUpParams p) {
  using namespace cute;
  using Elem = typename Mma<T>::Elem;
  static_assert(sizeof(Elem) == 2 && sizeof(T) == 2, "16-bit operands");
  // Two stages, each [A | G | U] tiles of [64, BK] (row stride kLds): 2 x 3 x 64 x 40 x 2 B = 30 KB.
  //   A: gathered x rows, G: gate rows of W_gate_up[e], U: up rows (5 KB each).
  __shared__ __align__(16) unsigned char smem_raw[kStages * kStageElems * sizeof(Elem)];
  Elem* const smem = reinterpret_cast<Elem*>(smem_raw);

  const GateUpTile w = gate_up_tile(p.expert_offsets, p.tile_offsets, p.experts, kBM, kBN, p.ffn, blockIdx.x);
  const T* x = static_cast<const T*>(p.x);
  const T* weights = static_cast<const T*>(p.w_gate_up);

  // This thread's vectors: v = threadIdx.x + i * kMmaThreads of a [64 rows, 4 vectors] tile;
  // a null source row is a tail row (zeros).
  const T* a_src[kVecsPerThread];
  const T* g_src[kVecsPerThread];
  const T* u_src[kVecsPerThread];
  int smem_off[kVecsPerThread], k_off[kVecsPerThread];
  CUTE_UNROLL
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = int(threadIdx.x) + i * kMmaThreads;
    const int r = v / kVecsPerRow;
    k_off[i] = (v % kVecsPerRow) * kVec;
    smem_off[i] = r * kLds + k_off[i];
    a_src[i] = row_ptr(x, gate_up_x_row(w, p.sorted_slots, p.topk, p.x_row_stride, r));
    g_src[i] = row_ptr(weights, gate_up_w_row(w, p.ffn, p.dim, false, r));
    u_src[i] = row_ptr(weights, gate_up_w_row(w, p.ffn, p.dim, true, r));
  }
  uint4 a_reg[kVecsPerThread], g_reg[kVecsPerThread], u_reg[kVecsPerThread];
  auto load = [&](int64_t k0) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    CUTE_UNROLL
    for (int i = 0; i < kVecsPerThread; ++i) {
      const int64_t k = k0 + k_off[i];
      const bool in_k = k < p.dim;
      a_reg[i] = a_src[i] != nullptr && in_k ? *reinterpret_cast<const uint4*>(a_src[i] + k) : zero;
      g_reg[i] = g_src[i] != nullptr && in_k ? *reinterpret_cast<const uint4*>(g_src[i] + k) : zero;
      u_reg[i] = u_src[i] != nullptr && in_k ? *reinterpret_cast<const uint4*>(u_src[i] + k) : zero;
    }
  };
  auto store = [&](Elem* stage) {
    CUTE_UNROLL
    for (int i = 0; i < kVecsPerThread; ++i) {
      *reinterpret_cast<uint4*>(stage + smem_off[i]) = a_reg[i];
      *reinterpret_cast<uint4*>(stage + kTileElems + smem_off[i]) = g_reg[i];
      *reinterpret_cast<uint4*>(stage + 2 * kTileElems + smem_off[i]) = u_reg[i];
    }
  };

  auto k_major = [](Elem* ptr) {
    return make_tensor(make_smem_ptr(ptr),
                       make_layout(make_shape(Int<kBM>{}, Int<kBK>{}), make_stride(Int<kLds>{}, Int<1>{})));
  };

  TiledMma<T> mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  auto rA = make_fragment_like(thr.partition_A(k_major(smem))(_, _, 0));  // register operands of one k-slice
  auto rG = make_fragment_like(thr.partition_B(k_major(smem))(_, _, 0));
  auto rU = make_fragment_like(thr.partition_B(k_major(smem))(_, _, 0));
  auto acc_g = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // fp32
  auto acc_u = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  clear(acc_g);
  clear(acc_u);

  // Step kt fills stage kt % 2, last read in step kt - 2: every thread has
  // passed step kt - 1's barrier since, so one barrier per step suffices.
  const int64_t k_tiles = ceil_div(p.dim, kBK);
  load(0);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    Elem* const stage = smem + (kt % kStages) * kStageElems;
    store(stage);
    __syncthreads();  // the stage is complete
    if (kt + 1 < k_tiles) load((kt + 1) * kBK);  // in flight during the MMAs
    const auto tA = thr.partition_A(k_major(stage));                   // (MMA, MMA_M, MMA_K)
    const auto tG = thr.partition_B(k_major(stage + kTileElems));      // (MMA, MMA_N, MMA_K)
    const auto tU = thr.partition_B(k_major(stage + 2 * kTileElems));  // (MMA, MMA_N, MMA_K)
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tA); ++k) {
      copy(tA(_, _, k), rA);
      copy(tG(_, _, k), rG);
      copy(tU(_, _, k), rU);
      gemm(mma, rA, rG, acc_g);
      gemm(mma, rA, rU, acc_u);
    }
  }

  const auto coord = thr.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  CUTE_UNROLL
  for (int e = 0; e < size(acc_g); ++e) {
    const int r = get<0>(coord(e)), c = get<1>(coord(e));
    if (r < w.rows && c < w.cols) store_outputs<T>(p, w, r, c, acc_g(e), acc_u(e));
  }
}

// ---------------------------------------------------------------- SIMT fp32

constexpr int kSimtThreads = 256;
constexpr int kSimtSide = 16;  // 16 x 16 threads
constexpr int kSimtBK = 16;
constexpr int kSimtPerThread = kBM / kSimtSide;  // 4 rows x 4 columns of each accumulator
constexpr int kSimtLoads = kBM * kSimtBK / kSimtThreads;  // elements of each operand tile per thread
static_assert(kSimtSide * kSimtSide == kSimtThreads && kBM % kSimtSide == 0 && kBM == kBN, "SIMT tiling");
static_assert(kBM * kSimtBK % kSimtThreads == 0, "whole elements per thread");

__global__ void __launch_bounds__(kSimtThreads) gate_up_simt_kernel(const GateUpParams p) {
  __shared__ float a_s[kSimtBK][kBM + 1];  // k-major: a_s[k][r]    16 x 65 x 4 B = 4.1 KB
  __shared__ float g_s[kSimtBK][kBN + 1];  // g_s[k][n]              4.1 KB
  __shared__ float u_s[kSimtBK][kBN + 1];  // u_s[k][n]              4.1 KB

  const GateUpTile w = gate_up_tile(p.expert_offsets, p.tile_offsets, p.experts, kBM, kBN, p.ffn, blockIdx.x);
  const float* x = static_cast<const float*>(p.x);
  const float* weights = static_cast<const float*>(p.w_gate_up);
  const int tx = int(threadIdx.x) % kSimtSide, ty = int(threadIdx.x) / kSimtSide;

  // Loads: element v = threadIdx.x + i * kSimtThreads of a [64 rows, 16 k] tile (k fastest: coalesced rows).
  const float* a_src[kSimtLoads];
  const float* g_src[kSimtLoads];
  const float* u_src[kSimtLoads];
  int ld_r[kSimtLoads], ld_k[kSimtLoads];
  for (int i = 0; i < kSimtLoads; ++i) {
    const int v = int(threadIdx.x) + i * kSimtThreads;
    const int r = v / kSimtBK;
    ld_r[i] = r;
    ld_k[i] = v % kSimtBK;
    a_src[i] = row_ptr(x, gate_up_x_row(w, p.sorted_slots, p.topk, p.x_row_stride, r));
    g_src[i] = row_ptr(weights, gate_up_w_row(w, p.ffn, p.dim, false, r));
    u_src[i] = row_ptr(weights, gate_up_w_row(w, p.ffn, p.dim, true, r));
  }
  float a_reg[kSimtLoads], g_reg[kSimtLoads], u_reg[kSimtLoads];
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int i = 0; i < kSimtLoads; ++i) {
      const int64_t k = k0 + ld_k[i];
      const bool in_k = k < p.dim;
      a_reg[i] = a_src[i] != nullptr && in_k ? a_src[i][k] : 0.f;
      g_reg[i] = g_src[i] != nullptr && in_k ? g_src[i][k] : 0.f;
      u_reg[i] = u_src[i] != nullptr && in_k ? u_src[i][k] : 0.f;
    }
  };

  float acc_g[kSimtPerThread][kSimtPerThread] = {}, acc_u[kSimtPerThread][kSimtPerThread] = {};
  const int64_t k_tiles = ceil_div(p.dim, kSimtBK);
  load(0);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kSimtLoads; ++i) {
      a_s[ld_k[i]][ld_r[i]] = a_reg[i];
      g_s[ld_k[i]][ld_r[i]] = g_reg[i];
      u_s[ld_k[i]][ld_r[i]] = u_reg[i];
    }
    __syncthreads();
    if (kt + 1 < k_tiles) load((kt + 1) * kSimtBK);
#pragma unroll
    for (int k = 0; k < kSimtBK; ++k) {
      float a[kSimtPerThread], g[kSimtPerThread], u[kSimtPerThread];
#pragma unroll
      for (int i = 0; i < kSimtPerThread; ++i) {
        a[i] = a_s[k][ty + kSimtSide * i];
        g[i] = g_s[k][tx + kSimtSide * i];
        u[i] = u_s[k][tx + kSimtSide * i];
      }
#pragma unroll
      for (int i = 0; i < kSimtPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kSimtPerThread; ++j) {
          acc_g[i][j] = fmaf(a[i], g[j], acc_g[i][j]);
          acc_u[i][j] = fmaf(a[i], u[j], acc_u[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kSimtPerThread; ++i) {
    const int r = ty + kSimtSide * i;
#pragma unroll
    for (int j = 0; j < kSimtPerThread; ++j) {
      const int c = tx + kSimtSide * j;
      if (r < w.rows && c < w.cols) store_outputs<float>(p, w, r, c, acc_g[i][j], acc_u[i][j]);
    }
  }
}

template <typename T>
void launch_typed(const GateUpParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    gate_up_simt_kernel<<<unsigned(p.tiles), kSimtThreads, 0, stream>>>(p);
  } else {
    gate_up_mma_kernel<T><<<unsigned(p.tiles), kMmaThreads, 0, stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("m1 fused_moe: gate/up kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void gate_up_silu_cuda(const GateUpParams& p, DType dtype, cudaStream_t stream) {
  if (!gate_up_fused_supported(dtype, p.x, p.x_row_stride, p.w_gate_up, p.dim))
    throw std::invalid_argument("m1 fused_moe: fused gate/up kernel needs 16-byte aligned rows of x and w_gate_up");
  if (p.tiles == 0) return;
  if (p.tiles > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("m1 fused_moe: too many gate/up tiles for one grid");
  M1_DISPATCH_DTYPE_NO_DOUBLE(dtype, T, launch_typed<T>(p, stream));
}

}  // namespace m1::moe
