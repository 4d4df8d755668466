// Fused MoE on CUDA (sm_80 and later): permutation kernels, row gathers,
// grouped GEMMs (moe_grouped_gemm.h, CUTLASS), the fused gate/up dual GEMM
// (moe_gate_up.h, CuTe) and the fused elementwise passes.
//
// Shapes: T tokens, D model dim, F expert FFN dim, E experts, k choices;
// P = T * k slots in expert-sorted order (moe_permute.h, the same helpers the
// CPU kernels run).
//
// Forward:
//   1. histogram -> scan (+ expert offsets) of the slot ids, then ONE host
//      synchronisation reading back {ids outside [0, E), expert offsets}:
//      with a bad id the launcher returns its count before anything else runs
//      (the glue raises); else the tile table / grouped-GEMM problems are
//      built on the host
//   2. scatter: sorted_slots, slot_pos
//   3. act = w_p silu(x[tok p] W_gate[e]^T) (x[tok p] W_up[e]^T)
//                                                      fused dual GEMM           [P, F]  dtype
//      one CTA per (expert, 64-row tile, 64-column tile) of moe_tiles.h (the
//      tile table: prefix sums of the per-expert tile counts, built on the
//      host from the expert offsets, copied with the kernel's launch). Each
//      CTA gathers its A rows straight from x (no xs copy), multiplies them
//      with the gate rows c.. and the up rows F + c.. of W_gate_up[e] into two
//      fp32 accumulators, and its epilogue writes act (and, with
//      save_gate_up, h = [g | u] for the backward, in the dtype).
//   4. ys  = act_e W_down[e]^T                         grouped GEMM, fp32 out    [P, D]  fp32
//   5. y_t = sum_j ys[slot_pos[t k + j]]               combine, fp32 sum         [T, D]  dtype
//
// Step 3 takes every float32 input (SIMT FFMA, exact fp32) and bf16/fp16
// inputs whose x and W_gate_up rows are 16-byte vectors (gate_up_fused_supported:
// x 16-byte aligned with a row stride that is a multiple of 8; D is), unless
// the caller asks for the unfused path (MoeInputs::cuda_fused_gate_up: the
// glue's choice, by default unfused for bf16/fp16 on sm_90, where it measured
// faster). For a bf16/fp16 x that is not (a view at an odd offset), or when
// asked, step 3 is the unfused path:
//   3a. xs  = x[token of slot p]                       gather, 16-byte vectors   [P, D]  dtype
//   3b. h   = xs_e W_gate_up[e]^T                      grouped GEMM (kRowCol)    [P, 2F] dtype
//   3c. act = w_p silu(g) u                            one elementwise pass      [P, F]  dtype
// (CUTLASS's GemmGrouped cannot fuse 3c: gate column c and up column c are F
// columns apart and land in different threadblock tiles.) The fused path
// computes silu(g) u from the fp32 accumulators; the unfused one from h
// rounded to the dtype, so the two agree to bf16/fp16 rounding, not bit for
// bit. The routing weight rides in act, so the down GEMM needs no epilogue and
// the combine is a sum.
//
// Backward:
//   1-3. permutation (recomputed), xs, dys = dy[token]                            [P, D]  dtype
//   4. h: the saved pre-activations, or recomputed as in unfused step 3b
//   5. dA  = dys_e W_down[e]                           grouped GEMM (kRowRow)    [P, F]  fp32
//   6. per row p (one block): a = silu(g) u; d w[slot p] = dA . a (block sum);
//      aw = w a; dh = (w dA u silu'(g), w dA silu(g))                            [P, F], [P, 2F] dtype
//   7. dW_down[e] = dys_e^T aw_e and dW_gate_up[e] = dh_e^T xs_e: one grouped
//      launch (kColRow); experts without tokens get zeroed weight gradients
//   8. dxs = dh_e W_gate_up[e]                          grouped GEMM (kRowRow)    [P, D]  fp32
//   9. dx_t = sum_j dxs[slot_pos[t k + j]]
//
// Precision: products accumulate in fp32; h, act, aw, dh are stored in the
// input dtype (they are the next GEMM's operands); ys and dxs stay fp32 so the
// sum over k is fp32. float32 inputs use exact fp32 SIMT GEMMs.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dispatch.h"
#include "moe/moe.h"
#include "moe/moe_gate_up.h"
#include "moe/moe_grouped_gemm.h"
#include "moe/moe_permute.h"
#include "moe/moe_tiles.h"

namespace m1::moe {
namespace {

constexpr int kPermuteThreads = 128;  // one thread per chunk of kPermuteChunk slots
constexpr int kScanThreads = 1024;
constexpr int kRowThreads = 256;      // one block per row for the row-wise passes
constexpr int kMaxRowBlocks = 1 << 16;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("m1 fused_moe: ") + what + ": " + cudaGetErrorString(err));
}

void check_launch(const char* what) { check(cudaGetLastError(), what); }

unsigned row_blocks(int64_t rows) { return unsigned(std::min<int64_t>(rows, kMaxRowBlocks)); }

// ---------------------------------------------------------------- permutation

template <typename Id>
__global__ void __launch_bounds__(kPermuteThreads)
    histogram_kernel(const Id* ids, int64_t slots, int64_t experts, int64_t chunks, int32_t* table, int32_t* invalid) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  const int64_t bad = histogram_chunk(ids, slots, experts, chunks, c, table);
  if (bad) atomicAdd(invalid, int32_t(bad));
}

// One block: exclusive scan of the [E, chunks] count table in place (tiles of
// kScanThreads with a running carry), then expert offsets from it.
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int32_t* table, int64_t n, int64_t experts, int64_t chunks, int32_t* expert_offsets) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;  // ~ 4 KB
  __shared__ int32_t carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int32_t v = i < n ? table[i] : 0;
    int32_t excl = 0, total = 0;
    BlockScan(temp).ExclusiveSum(v, excl, total);
    if (i < n) table[i] = carry + excl;
    __syncthreads();  // every thread has read carry (and temp is free again)
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) expert_offsets_from_cursor(table, experts, chunks, carry, expert_offsets);
}

template <typename Id>
__global__ void __launch_bounds__(kPermuteThreads)
    scatter_kernel(const Id* ids, int64_t slots, int64_t experts, int64_t chunks, int32_t* table,
                   int32_t* sorted_slots, int32_t* slot_pos) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= chunks) return;
  scatter_chunk(ids, slots, experts, chunks, c, table, sorted_slots, slot_pos);
}

// ---------------------------------------------------------------- row passes

// dst[p] = src[token of sorted slot p] for p < rows; 16-byte copies when `vec`.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    gather_rows_kernel(const T* src, int64_t ld, int64_t dim, const int32_t* sorted_slots, int64_t topk,
                       int64_t rows, bool vec, T* dst) {
  for (int64_t p = blockIdx.x; p < rows; p += gridDim.x) {
    const T* in = src + slot_token(sorted_slots[p], topk) * ld;
    T* out = dst + p * dim;
    if (vec) {
      constexpr int kVec = 16 / int(sizeof(T));
      const uint4* in4 = reinterpret_cast<const uint4*>(in);
      uint4* out4 = reinterpret_cast<uint4*>(out);
      for (int64_t i = threadIdx.x; i < dim / kVec; i += blockDim.x) out4[i] = in4[i];
    } else {
      for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) out[i] = in[i];
    }
  }
}

__device__ __forceinline__ float sigmoid(float g) { return 1.f / (1.f + __expf(-g)); }

// act[p, f] = w * silu(g[p, f]) * u[p, f], h[p] = [g | u].
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    silu_mul_kernel(const T* h, const int32_t* sorted_slots, const float* topk_weights, int64_t rows, int64_t ffn,
                    T* act) {
  for (int64_t p = blockIdx.x; p < rows; p += gridDim.x) {
    const float w = topk_weights[sorted_slots[p]];
    const T* g = h + p * 2 * ffn;
    const T* u = g + ffn;
    for (int64_t f = threadIdx.x; f < ffn; f += blockDim.x) {
      const float gf = load_as<float>(g[f]);
      act[p * ffn + f] = store_from<T>(w * gf * sigmoid(gf) * load_as<float>(u[f]));
    }
  }
}

// out[t] = sum_j rows[slot_pos[t k + j]] in fp32 (j in order).
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    combine_kernel(const float* rows, const int32_t* slot_pos, int64_t tokens, int64_t topk, int64_t dim, T* out) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
      float sum = 0.f;
      for (int64_t j = 0; j < topk; ++j) sum += rows[int64_t(slot_pos[t * topk + j]) * dim + d];
      out[t * dim + d] = store_from<T>(sum);
    }
  }
}

// The activation gradient of row p (see the file header), one block per row.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    act_grad_kernel(const T* h, const float* dA, const int32_t* sorted_slots, const float* topk_weights, int64_t rows,
                    int64_t ffn, T* aw, T* dh, float* grad_topk_weights) {
  using BlockReduce = cub::BlockReduce<float, kRowThreads>;
  __shared__ typename BlockReduce::TempStorage temp;  // ~ 1 KB
  for (int64_t p = blockIdx.x; p < rows; p += gridDim.x) {
    const int32_t slot = sorted_slots[p];
    const float w = topk_weights[slot];
    const T* g = h + p * 2 * ffn;
    const T* u = g + ffn;
    float dot = 0.f;
    for (int64_t f = threadIdx.x; f < ffn; f += blockDim.x) {
      const float gf = load_as<float>(g[f]), uf = load_as<float>(u[f]), da = dA[p * ffn + f];
      const float s = sigmoid(gf), silu = gf * s, a = silu * uf;
      dot += da * a;
      aw[p * ffn + f] = store_from<T>(w * a);
      dh[p * 2 * ffn + f] = store_from<T>(w * da * uf * s * (1.f + gf * (1.f - s)));
      dh[p * 2 * ffn + ffn + f] = store_from<T>(w * da * silu);
    }
    const float total = BlockReduce(temp).Sum(dot);
    if (threadIdx.x == 0) grad_topk_weights[slot] = total;
    __syncthreads();  // temp is reused by the next row
  }
}

// ---------------------------------------------------------------- workspace

// Carves aligned pieces out of one device buffer; with a null base it only
// measures (the same code computes the size the glue allocates).
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <typename X>
  X* take(int64_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    X* out = base_ ? reinterpret_cast<X*>(base_ + offset_) : nullptr;
    offset_ += size_t(std::max<int64_t>(count, 0)) * sizeof(X);
    return out;
  }
  void* bytes(size_t n) { return take<char>(int64_t(n)); }
  size_t size() const { return offset_ + 256; }

 private:
  char* base_;
  size_t offset_ = 0;
};


struct Permutation {
  int32_t* table = nullptr;          // [E * chunks]
  int32_t* header = nullptr;         // [0]: ids outside [0, E); [1 .. E + 1]: expert offsets
  int32_t* sorted_slots = nullptr;   // [P]
  int32_t* slot_pos = nullptr;       // [P]
  std::vector<int32_t> offsets;      // host copy of the expert offsets, [E + 1]

  Permutation(Carver& c, const MoeShape& s) {
    table = c.take<int32_t>(s.experts * permute_chunks(s.slots()));
    header = c.take<int32_t>(s.experts + 2);
    sorted_slots = c.take<int32_t>(s.slots());
    slot_pos = c.take<int32_t>(s.slots());
  }
  int64_t rows(int64_t e) const { return offsets[size_t(e + 1)] - offsets[size_t(e)]; }
};

// Steps 1-2 of the forward and backward. Returns the number of ids outside
// [0, E); when it is not zero nothing past the histogram has run.
template <typename Id>
int64_t permute_typed(const MoeInputs& in, Permutation& perm, cudaStream_t stream) {
  const int64_t slots = in.shape.slots(), experts = in.shape.experts, chunks = permute_chunks(slots);
  const Id* ids = static_cast<const Id*>(in.topk_ids);
  check(cudaMemsetAsync(perm.header, 0, sizeof(int32_t), stream), "clearing the invalid-id count");
  const unsigned chunk_blocks = unsigned((chunks + kPermuteThreads - 1) / kPermuteThreads);
  if (chunks > 0) {
    histogram_kernel<Id><<<chunk_blocks, kPermuteThreads, 0, stream>>>(ids, slots, experts, chunks, perm.table,
                                                                       perm.header);
    check_launch("histogram kernel");
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(perm.table, experts * chunks, experts, chunks, perm.header + 1);
  check_launch("scan kernel");
  std::vector<int32_t> header(static_cast<size_t>(experts + 2));
  check(cudaMemcpyAsync(header.data(), perm.header, header.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream),
        "reading back the expert offsets");
  check(cudaStreamSynchronize(stream), "waiting for the expert offsets");
  if (header[0] != 0) return header[0];
  perm.offsets.assign(header.begin() + 1, header.end());
  if (chunks > 0) {
    scatter_kernel<Id><<<chunk_blocks, kPermuteThreads, 0, stream>>>(ids, slots, experts, chunks, perm.table,
                                                                     perm.sorted_slots, perm.slot_pos);
    check_launch("scatter kernel");
  }
  return 0;
}

int64_t permute(const MoeInputs& in, Permutation& perm, cudaStream_t stream) {
  return in.ids_int64 ? permute_typed<int64_t>(in, perm, stream) : permute_typed<int32_t>(in, perm, stream);
}

template <typename T>
void gather_rows(const T* src, int64_t ld, int64_t dim, const Permutation& perm, int64_t topk, int64_t rows, T* dst,
                 cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  const bool vec = (dim * int64_t(sizeof(T))) % 16 == 0 && (ld * int64_t(sizeof(T))) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0;
  gather_rows_kernel<T><<<row_blocks(rows), kRowThreads, 0, stream>>>(src, ld, dim, perm.sorted_slots, topk, rows,
                                                                      vec, dst);
  check_launch("gather kernel");
}

template <typename T>
void combine(const float* rows, const Permutation& perm, const MoeShape& s, T* out, cudaStream_t stream) {
  if (s.tokens == 0 || s.dim == 0) return;
  combine_kernel<T><<<row_blocks(s.tokens), kRowThreads, 0, stream>>>(rows, perm.slot_pos, s.tokens, s.topk, s.dim,
                                                                      out);
  check_launch("combine kernel");
}

// One problem per expert with rows: make(e, first row, rows).
template <typename Make>
std::vector<GemmProblem> per_expert(const Permutation& perm, int64_t experts, const Make& make) {
  std::vector<GemmProblem> problems;
  for (int64_t e = 0; e < experts; ++e)
    if (perm.rows(e) > 0) problems.push_back(make(e, int64_t(perm.offsets[size_t(e)]), perm.rows(e)));
  return problems;
}

// h = xs_e W_gate_up[e]^T for every expert (forward step 4).
template <typename T>
void gate_up_gemm(const MoeInputs& in, const Permutation& perm, const T* xs, T* h, void* args, cudaStream_t stream) {
  const int64_t D = in.shape.dim, F = in.shape.ffn;
  const T* w = static_cast<const T*>(in.w_gate_up);
  const auto problems = per_expert(perm, in.shape.experts, [&](int64_t e, int64_t r, int64_t m) {
    return GemmProblem{int(m), int(2 * F), int(D), xs + r * D, D, w + e * 2 * F * D, D, h + r * 2 * F, 2 * F};
  });
  grouped_gemm(in.dtype, GemmLayout::kRowCol, false, problems, args, stream);
}

// Whether forward step 3 is the fused dual GEMM (see the file header).
bool fused_gate_up(const MoeInputs& in) {
  return in.cuda_fused_gate_up && gate_up_fused_supported(in.dtype, in.x, in.x_row_stride, in.w_gate_up, in.shape.dim);
}

template <typename T>
struct ForwardBuffers {
  Permutation perm;
  bool fused;             // step 3 fused (the pieces marked "unfused" are then not carved)
  int64_t* tile_offsets;  // fused: [E + 1] (moe_tiles.h)
  void* args_gate_up;     // unfused
  void* args_down;
  T* xs;                  // unfused
  T* h;                   // unfused, when the pre-activations do not go to the gate_up output
  T* act;
  float* ys;

  ForwardBuffers(Carver& c, const MoeInputs& in, bool h_is_output)
      : perm(c, in.shape),
        fused(fused_gate_up(in)),
        tile_offsets(fused ? c.take<int64_t>(in.shape.experts + 1) : nullptr),
        args_gate_up(fused ? nullptr : c.bytes(grouped_gemm_args_bytes(int(in.shape.experts)))),
        args_down(c.bytes(grouped_gemm_args_bytes(int(in.shape.experts)))),
        xs(fused ? nullptr : c.take<T>(in.shape.slots() * in.shape.dim)),
        h(fused || h_is_output ? nullptr : c.take<T>(in.shape.slots() * 2 * in.shape.ffn)),
        act(c.take<T>(in.shape.slots() * in.shape.ffn)),
        ys(c.take<float>(in.shape.slots() * in.shape.dim)) {}
};

// Forward step 3, fused: the tile table to the device, then the dual GEMM.
// h_out: the gate_up output, or null.
template <typename T>
void fused_gate_up_step(const MoeInputs& in, const ForwardBuffers<T>& b, T* h_out, cudaStream_t stream) {
  const MoeShape& s = in.shape;
  std::vector<int64_t> tiles(static_cast<size_t>(s.experts + 1));
  const int64_t total = build_tile_offsets(b.perm.offsets.data(), s.experts, kGateUpTileM,
                                           ceil_div(s.ffn, kGateUpTileN), tiles.data());
  // From pageable memory: staged before cudaMemcpyAsync returns (as in moe_grouped_gemm.cuh).
  check(cudaMemcpyAsync(b.tile_offsets, tiles.data(), tiles.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream),
        "copying the gate/up tile table");
  GateUpParams g;
  g.dim = s.dim;
  g.ffn = s.ffn;
  g.experts = s.experts;
  g.topk = s.topk;
  g.x = in.x;
  g.x_row_stride = in.x_row_stride;
  g.w_gate_up = in.w_gate_up;
  g.topk_weights = static_cast<const float*>(in.topk_weights);
  g.sorted_slots = b.perm.sorted_slots;
  g.expert_offsets = b.perm.header + 1;
  g.tile_offsets = b.tile_offsets;
  g.tiles = total;
  g.act = b.act;
  g.gate_up = h_out;
  gate_up_silu_cuda(g, in.dtype, stream);
}

template <typename T>
int64_t forward_typed(const ForwardParams& p, void* workspace, cudaStream_t stream) {
  const MoeInputs& in = p.in;
  const MoeShape& s = in.shape;
  const int64_t P = s.slots(), D = s.dim, F = s.ffn;
  Carver carver(workspace);
  ForwardBuffers<T> b(carver, in, p.gate_up != nullptr);
  if (const int64_t bad = permute(in, b.perm, stream)) return bad;

  if (P > 0 && F > 0 && D > 0) {
    if (b.fused) {
      fused_gate_up_step<T>(in, b, static_cast<T*>(p.gate_up), stream);
    } else {
      T* h = p.gate_up ? static_cast<T*>(p.gate_up) : b.h;
      gather_rows(static_cast<const T*>(in.x), in.x_row_stride, D, b.perm, s.topk, P, b.xs, stream);
      gate_up_gemm<T>(in, b.perm, b.xs, h, b.args_gate_up, stream);
      silu_mul_kernel<T><<<row_blocks(P), kRowThreads, 0, stream>>>(
          h, b.perm.sorted_slots, static_cast<const float*>(in.topk_weights), P, F, b.act);
      check_launch("silu * up kernel");
    }
    const T* w_down = static_cast<const T*>(in.w_down);
    const auto problems = per_expert(b.perm, s.experts, [&](int64_t e, int64_t r, int64_t m) {
      return GemmProblem{int(m), int(D), int(F), b.act + r * F, F, w_down + e * D * F, F, b.ys + r * D, D};
    });
    grouped_gemm(in.dtype, GemmLayout::kRowCol, true, problems, b.args_down, stream);
  } else if (P > 0 && D > 0) {
    // F = 0: every expert outputs zero.
    check(cudaMemsetAsync(b.ys, 0, size_t(P * D) * sizeof(float), stream), "zeroing expert outputs");
  }
  combine(b.ys, b.perm, s, static_cast<T*>(p.y), stream);
  return 0;
}

template <typename T>
struct BackwardBuffers {
  Permutation perm;
  void* args_gate_up;
  void* args_da;
  void* args_dw;  // 2E problems: dW_down and dW_gate_up in one launch
  void* args_dx;
  T* xs;
  T* dys;
  T* h;  // null when the forward's are given
  float* da;
  T* aw;
  T* dh;
  float* dxs;

  BackwardBuffers(Carver& c, const MoeShape& s, bool h_given)
      : perm(c, s),
        args_gate_up(c.bytes(grouped_gemm_args_bytes(int(s.experts)))),
        args_da(c.bytes(grouped_gemm_args_bytes(int(s.experts)))),
        args_dw(c.bytes(grouped_gemm_args_bytes(int(2 * s.experts)))),
        args_dx(c.bytes(grouped_gemm_args_bytes(int(s.experts)))),
        xs(c.take<T>(s.slots() * s.dim)),
        dys(c.take<T>(s.slots() * s.dim)),
        h(h_given ? nullptr : c.take<T>(s.slots() * 2 * s.ffn)),
        da(c.take<float>(s.slots() * s.ffn)),
        aw(c.take<T>(s.slots() * s.ffn)),
        dh(c.take<T>(s.slots() * 2 * s.ffn)),
        dxs(c.take<float>(s.slots() * s.dim)) {}
};

template <typename T>
int64_t backward_typed(const BackwardParams& p, void* workspace, cudaStream_t stream) {
  const MoeInputs& in = p.in;
  const MoeShape& s = in.shape;
  const int64_t P = s.slots(), D = s.dim, F = s.ffn, E = s.experts;
  Carver carver(workspace);
  BackwardBuffers<T> b(carver, s, p.gate_up != nullptr);
  if (const int64_t bad = permute(in, b.perm, stream)) return bad;
  const T* w_gate_up = static_cast<const T*>(in.w_gate_up);
  const T* w_down = static_cast<const T*>(in.w_down);
  T* gw_gate_up = static_cast<T*>(p.grad_w_gate_up);
  T* gw_down = static_cast<T*>(p.grad_w_down);

  // Experts without tokens get zero weight gradients (every expert when F or D is 0).
  for (int64_t e = 0; e < E; ++e) {
    if (b.perm.rows(e) > 0 && F > 0 && D > 0) continue;
    check(cudaMemsetAsync(gw_gate_up + e * 2 * F * D, 0, size_t(2 * F * D) * sizeof(T), stream), "zeroing dW_gate_up");
    check(cudaMemsetAsync(gw_down + e * D * F, 0, size_t(D * F) * sizeof(T), stream), "zeroing dW_down");
  }
  if (P > 0 && F > 0 && D > 0) {
    gather_rows(static_cast<const T*>(in.x), in.x_row_stride, D, b.perm, s.topk, P, b.xs, stream);
    gather_rows(static_cast<const T*>(p.grad_y), p.grad_y_row_stride, D, b.perm, s.topk, P, b.dys, stream);
    const T* h = static_cast<const T*>(p.gate_up);
    if (!h) {
      gate_up_gemm<T>(in, b.perm, b.xs, b.h, b.args_gate_up, stream);
      h = b.h;
    }
    // dA = dys_e W_down[e]: W_down[e] is [K = D, N = F] row-major.
    grouped_gemm(in.dtype, GemmLayout::kRowRow, true, per_expert(b.perm, E, [&](int64_t e, int64_t r, int64_t m) {
                   return GemmProblem{int(m), int(F), int(D), b.dys + r * D, D, w_down + e * D * F, F, b.da + r * F, F};
                 }),
                 b.args_da, stream);
    act_grad_kernel<T><<<row_blocks(P), kRowThreads, 0, stream>>>(
        h, b.da, b.perm.sorted_slots, static_cast<const float*>(in.topk_weights), P, F, b.aw, b.dh,
        static_cast<float*>(p.grad_topk_weights));
    check_launch("activation-gradient kernel");
    // Weight gradients: [D, F] = dys_e^T aw_e and [2F, D] = dh_e^T xs_e (K = the expert's rows).
    std::vector<GemmProblem> dw;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r = b.perm.offsets[size_t(e)], m = b.perm.rows(e);
      if (m == 0) continue;
      dw.push_back({int(D), int(F), int(m), b.dys + r * D, D, b.aw + r * F, F, gw_down + e * D * F, F});
      dw.push_back({int(2 * F), int(D), int(m), b.dh + r * 2 * F, 2 * F, b.xs + r * D, D, gw_gate_up + e * 2 * F * D, D});
    }
    grouped_gemm(in.dtype, GemmLayout::kColRow, false, dw, b.args_dw, stream);
    // dxs = dh_e W_gate_up[e]: W_gate_up[e] is [K = 2F, N = D] row-major.
    grouped_gemm(in.dtype, GemmLayout::kRowRow, true, per_expert(b.perm, E, [&](int64_t e, int64_t r, int64_t m) {
                   return GemmProblem{int(m), int(D), int(2 * F), b.dh + r * 2 * F, 2 * F, w_gate_up + e * 2 * F * D, D,
                                      b.dxs + r * D, D};
                 }),
                 b.args_dx, stream);
  } else if (P > 0) {
    // F = 0 or D = 0: y did not depend on anything but zeros.
    check(cudaMemsetAsync(b.dxs, 0, size_t(P * D) * sizeof(float), stream), "zeroing dx rows");
    check(cudaMemsetAsync(p.grad_topk_weights, 0, size_t(P) * sizeof(float), stream), "zeroing d topk_weights");
  }
  combine(b.dxs, b.perm, s, static_cast<T*>(p.grad_x), stream);
  return 0;
}

}  // namespace

size_t forward_cuda_workspace_bytes(const MoeInputs& in, bool save_gate_up) {
  Carver c(nullptr);
  M1_DISPATCH_DTYPE_NO_DOUBLE(in.dtype, T, { ForwardBuffers<T> b(c, in, save_gate_up); });
  return c.size();
}

size_t backward_cuda_workspace_bytes(const MoeShape& s, DType dtype, bool gate_up_given) {
  Carver c(nullptr);
  M1_DISPATCH_DTYPE_NO_DOUBLE(dtype, T, { BackwardBuffers<T> b(c, s, gate_up_given); });
  return c.size();
}

int64_t forward_cuda(const ForwardParams& p, void* workspace, cudaStream_t stream) {
  int64_t bad = 0;
  M1_DISPATCH_DTYPE_NO_DOUBLE(p.in.dtype, T, bad = forward_typed<T>(p, workspace, stream));
  return bad;
}

int64_t backward_cuda(const BackwardParams& p, void* workspace, cudaStream_t stream) {
  int64_t bad = 0;
  M1_DISPATCH_DTYPE_NO_DOUBLE(p.in.dtype, T, bad = backward_typed<T>(p, workspace, stream));
  return bad;
}

}  // namespace m1::moe
