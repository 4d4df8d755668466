// Fused MoE backward on the CPU: dx, dW_gate_up, dW_down, d topk_weights.
//
// Shapes: T tokens, D model dim, F expert FFN dim, E experts, k choices;
// P = T * k slots in expert-sorted order (moe_permute.h), the same order the
// forward used (the permutation is recomputed from topk_ids: O(P)).
//
//   1. permute; gather xs[p] = x[token], dys[p] = dy[token]          [P, D] Acc
//   2. h = (G, U): the forward's saved pre-activations, or recomputed
//      with the gate_up GEMM when they were not kept                 [P, 2F]
//   3. activation tasks (expert e, FFN columns c .. c + kFfnChunk):
//        dA = dys_e Wd[e][:, c:]                    (sgemm on row blocks)
//        on the tile: a = silu(G) U;  dw_part[p, chunk] = dA . a
//                     aw[p, c:] = w a                                  [P, F]
//                     dh[p, c:] = w dA U silu'(G),  dh[p, F + c:] = w dA silu(G)   [P, 2F]
//   4. gradient tasks, one list of three kinds, all independent:
//        dW_down[e][d:, :]   = dys_e[:, d:]^T aw_e        (rows of dW_down)
//        dW_gate_up[e][r:,:] = dh_e[:, r:]^T xs_e         (rows of dW_gate_up)
//        dxs_e[:, d:]        = dh_e Wgu[e][:, d:]          (columns of dx rows)
//      experts without tokens get zero weight gradients;
//   5. combine: dx[t] = sum_j dxs[slot_pos[t k + j]]; d w[t, j] = sum over
//      chunks of dw_part (fixed order: deterministic).
//
// FLOPs with U = 2 P D F: 1 (dA) + 1 (dW_down) + 2 (dW_gate_up) + 2 (dx) = 6U,
// plus 2U when h is recomputed; the forward is 3U.
#include <algorithm>

#include "common/dispatch.h"
#include "moe/moe_cpu_common.h"

namespace m1::moe {
namespace {

using namespace cpu_detail;

constexpr int64_t kFfnChunk = 128;  // FFN columns per activation task
constexpr int64_t kRowChunk = 128;  // rows of dW_down / dW_gate_up per task
constexpr int64_t kDimChunk = 128;  // dx columns per task
constexpr int64_t kRowBlock = 256;  // rows per sgemm inside an activation task

// The activation-gradient epilogue on a [rows, n] tile (see the file header).
// g, u: pre-activations (row stride ld_h, storage H); da: dA tile (row stride
// n); dg, du: the gate and up halves of dh (row stride ld_dh).
template <typename H, typename Acc>
M1_INLINE Acc act_grad_one(H g_, H u_, Acc dA, Acc wi, Acc& aw, Acc& dg, Acc& du) {
  const Acc g = load_as<Acc>(g_), u = load_as<Acc>(u_);
  const Acc s = sigmoid(g), silu = g * s, a = silu * u;
  aw = wi * a;
  dg = wi * dA * u * s * (Acc(1) + g * (Acc(1) - s));
  du = wi * dA * silu;
  return dA * a;
}

template <typename H, typename Acc>
M1_CPU_MULTIVERSION void act_grad_rows(const H* __restrict g, const H* __restrict u, int64_t ld_h,
                                       const Acc* __restrict da, int64_t rows, int64_t n, const Acc* __restrict w,
                                       Acc* __restrict aw, int64_t ld_aw, Acc* __restrict dg, Acc* __restrict du,
                                       int64_t ld_dh, Acc* __restrict dw_part, int64_t ld_part) {
  constexpr int V = 8;  // the dot product in 8 lanes: a float sum only vectorises when split by hand
  for (int64_t i = 0; i < rows; ++i) {
    const Acc wi = w[i];
    const H* gi = g + i * ld_h;
    const H* ui = u + i * ld_h;
    const Acc* dai = da + i * n;
    Acc* awi = aw + i * ld_aw;
    Acc* dgi = dg + i * ld_dh;
    Acc* dui = du + i * ld_dh;
    Acc lanes[V] = {};
    int64_t j = 0;
    for (; j + V <= n; j += V)
      for (int l = 0; l < V; ++l)
        lanes[l] += act_grad_one(gi[j + l], ui[j + l], dai[j + l], wi, awi[j + l], dgi[j + l], dui[j + l]);
    Acc dot = Acc(0);
    for (int l = 0; l < V; ++l) dot += lanes[l];
    for (; j < n; ++j) dot += act_grad_one(gi[j], ui[j], dai[j], wi, awi[j], dgi[j], dui[j]);
    dw_part[i * ld_part] = dot;
  }
}

template <typename T>
void backward_typed(const BackwardParams& p) {
  using Acc = acc_t<T>;
  const MoeInputs& in = p.in;
  const int64_t T_ = in.shape.tokens, D = in.shape.dim, F = in.shape.ffn, E = in.shape.experts;
  const int64_t k = in.shape.topk, P = in.shape.slots();
  const T* w_gate_up = static_cast<const T*>(in.w_gate_up);
  const T* w_down = static_cast<const T*>(in.w_down);
  constexpr bool kConvert = !std::is_same_v<T, Acc>;

  const Permutation perm = permute(in);
  // The weight gradients are E x (3 D F) elements even when few tokens came.
  const bool parallel = 2.0 * double(P) * double(D) * double(F) + 3.0 * double(E) * double(D) * double(F) >
                        kParallelFlops;
  const std::vector<Acc> w = gather_weights<Acc>(in, perm);
  const int64_t ffn_chunks = (F + kFfnChunk - 1) / kFfnChunk;
  const Scratch bufs({bytes_of<Acc>(P * D), bytes_of<Acc>(P * D), bytes_of<Acc>(p.gate_up ? 0 : P * 2 * F),
                      bytes_of<Acc>(P * F), bytes_of<Acc>(P * 2 * F), bytes_of<Acc>(P * ffn_chunks),
                      bytes_of<Acc>(P * D)});
  Acc* const xs = bufs.get<Acc>(0);       // [P, D] gathered rows of x
  Acc* const dys = bufs.get<Acc>(1);      // [P, D] gathered rows of dy
  Acc* const h_acc = bufs.get<Acc>(2);    // [P, 2F] recomputed pre-activations (when not saved)
  Acc* const aw = bufs.get<Acc>(3);       // [P, F] w silu(g) u
  Acc* const dh = bufs.get<Acc>(4);       // [P, 2F] gradient of the pre-activations
  Acc* const dw_part = bufs.get<Acc>(5);  // [P, FFN chunks] partial d topk_weights
  Acc* const dxs = bufs.get<Acc>(6);      // [P, D] per-slot dx rows
  gather_rows(static_cast<const T*>(in.x), in.x_row_stride, D, perm, k, xs);
  gather_rows(static_cast<const T*>(p.grad_y), p.grad_y_row_stride, D, perm, k, dys);

  // 2. pre-activations: saved (storage T) or recomputed here (Acc).
  if (!p.gate_up) {
    const std::vector<Task> tasks = make_tasks(perm, E, F, kFfnChunk, false);
    run_tasks(
        int64_t(tasks.size()), parallel, [&] { return Buffer<Acc>(kConvert ? 2 * kFfnChunk * D : 0); },
        [&](int64_t i, Buffer<Acc>& scratch) {
          const int64_t e = tasks[i].expert, c = tasks[i].chunk * kFfnChunk, n = std::min(kFfnChunk, F - c);
          const T* we = w_gate_up + e * 2 * F * D;
          const auto [wg, ldg] = block_as<T, Acc>(we + c * D, D, n, D, scratch.get());
          const auto [wu, ldu] = block_as<T, Acc>(we + (F + c) * D, D, n, D, scratch.get() + n * D);
          const int64_t r = perm.expert_offsets[e], m = perm.rows(e);
          gemm<Acc>(false, true, m, n, D, xs + r * D, D, wg, ldg, Acc(0), h_acc + r * 2 * F + c, 2 * F);
          gemm<Acc>(false, true, m, n, D, xs + r * D, D, wu, ldu, Acc(0), h_acc + r * 2 * F + F + c,
                    2 * F);
        });
  }

  // 3. dA = dy W_down and the activation gradients on the tile.
  const std::vector<Task> act_tasks = make_tasks(perm, E, F, kFfnChunk, false);
  run_tasks(
      int64_t(act_tasks.size()), parallel,
      [&] { return Buffer<Acc>((kConvert ? D * kFfnChunk : 0) + kRowBlock * kFfnChunk); },
      [&](int64_t i, Buffer<Acc>& scratch) {
        const int64_t e = act_tasks[i].expert, chunk = act_tasks[i].chunk, c = chunk * kFfnChunk;
        const int64_t n = std::min(kFfnChunk, F - c);
        // Wd[e][:, c:c+n] is a [D, n] block with row stride F.
        const auto [wd, ldd] = block_as<T, Acc>(w_down + e * D * F + c, F, D, n, scratch.get());
        Acc* da = scratch.get() + (kConvert ? D * kFfnChunk : 0);
        const int64_t begin = perm.expert_offsets[e], end = perm.expert_offsets[e + 1];
        for (int64_t r = begin; r < end; r += kRowBlock) {
          const int64_t m = std::min(kRowBlock, end - r);
          gemm<Acc>(false, false, m, n, D, dys + r * D, D, wd, ldd, Acc(0), da, n);
          Acc* aw_r = aw + r * F + c;
          Acc* dg = dh + r * 2 * F + c;
          Acc* du = dg + F;
          Acc* part = dw_part + r * ffn_chunks + chunk;
          if (p.gate_up) {
            const T* h = static_cast<const T*>(p.gate_up) + r * 2 * F;
            act_grad_rows(h + c, h + F + c, 2 * F, da, m, n, w.data() + r, aw_r, F, dg, du, 2 * F, part, ffn_chunks);
          } else {
            const Acc* h = h_acc + r * 2 * F;
            act_grad_rows(h + c, h + F + c, 2 * F, da, m, n, w.data() + r, aw_r, F, dg, du, 2 * F, part, ffn_chunks);
          }
        }
      });
  // 4. weight gradients and dx rows.
  const int64_t down_chunks = (D + kRowChunk - 1) / kRowChunk;
  const int64_t gu_chunks = (2 * F + kRowChunk - 1) / kRowChunk;
  const int64_t dx_chunks = (D + kDimChunk - 1) / kDimChunk;
  struct GradTask {
    int32_t kind, expert, chunk;
  };
  std::vector<GradTask> grad_tasks;
  {
    const std::vector<Task> busy = make_tasks(perm, E, 1, 1, true);  // every expert, busiest first
    for (const Task& t : busy) {
      for (int64_t c = 0; c < gu_chunks; ++c) grad_tasks.push_back({1, t.expert, int32_t(c)});
      for (int64_t c = 0; c < down_chunks; ++c) grad_tasks.push_back({0, t.expert, int32_t(c)});
      if (perm.rows(t.expert) > 0)
        for (int64_t c = 0; c < dx_chunks; ++c) grad_tasks.push_back({2, t.expert, int32_t(c)});
    }
  }
  T* gw_down = static_cast<T*>(p.grad_w_down);
  T* gw_gate_up = static_cast<T*>(p.grad_w_gate_up);
  const int64_t scratch_size = kConvert ? std::max({kRowChunk * F, kRowChunk * D, 2 * F * kDimChunk}) : 0;
  run_tasks(
      int64_t(grad_tasks.size()), parallel, [&] { return Buffer<Acc>(scratch_size); },
      [&](int64_t i, Buffer<Acc>& scratch) {
        const GradTask task = grad_tasks[i];
        const int64_t e = task.expert, r = perm.expert_offsets[e], m = perm.rows(e);
        if (task.kind == 0) {  // dW_down[e] rows d .. d + n: [n, F] = dys_e[:, d:]^T aw_e
          const int64_t d = task.chunk * kRowChunk, n = std::min(kRowChunk, D - d);
          T* out = gw_down + e * D * F + d * F;
          Acc* acc = kConvert ? scratch.get() : reinterpret_cast<Acc*>(out);
          gemm<Acc>(true, false, n, F, m, dys + r * D + d, D, aw + r * F, F, Acc(0), acc, F);
          if constexpr (kConvert) store_block<T, Acc>(acc, F, n, F, out, F);
        } else if (task.kind == 1) {  // dW_gate_up[e] rows q .. q + n: [n, D] = dh_e[:, q:]^T xs_e
          const int64_t q = task.chunk * kRowChunk, n = std::min(kRowChunk, 2 * F - q);
          T* out = gw_gate_up + e * 2 * F * D + q * D;
          Acc* acc = kConvert ? scratch.get() : reinterpret_cast<Acc*>(out);
          gemm<Acc>(true, false, n, D, m, dh + r * 2 * F + q, 2 * F, xs + r * D, D, Acc(0), acc, D);
          if constexpr (kConvert) store_block<T, Acc>(acc, D, n, D, out, D);
        } else {  // dxs_e[:, d:d+n] = dh_e Wgu[e][:, d:d+n]
          const int64_t d = task.chunk * kDimChunk, n = std::min(kDimChunk, D - d);
          const auto [wgu, ldw] = block_as<T, Acc>(w_gate_up + e * 2 * F * D + d, D, 2 * F, n, scratch.get());
          gemm<Acc>(false, false, m, n, 2 * F, dh + r * 2 * F, 2 * F, wgu, ldw, Acc(0), dxs + r * D + d,
                    D);
        }
      });

  // 5. combine per token, fixed order.
  T* dx = static_cast<T*>(p.grad_x);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, k * D));
  cpu::parallel_for(0, T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> row(static_cast<size_t>(D));
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), Acc(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t pos = perm.slot_pos[t * k + j];
        const Acc* src = dxs + pos * D;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        Acc dwt = Acc(0);
        for (int64_t c = 0; c < ffn_chunks; ++c) dwt += dw_part[pos * ffn_chunks + c];
        if (in.weight_dtype == DType::kFloat64) {
          static_cast<double*>(p.grad_topk_weights)[t * k + j] = double(dwt);
        } else {
          static_cast<float*>(p.grad_topk_weights)[t * k + j] = float(dwt);
        }
      }
      for (int64_t d = 0; d < D; ++d) dx[t * D + d] = store_from<T>(row[d]);
    }
  });
}

}  // namespace

void backward_cpu(const BackwardParams& p) {
  M1_DISPATCH_DTYPE(p.in.dtype, T, backward_typed<T>(p));
}

}  // namespace m1::moe
