// Lightning attention prefill, backward, on the CPU.
//
// Two kinds of work item, scheduled together (longest first):
//   dq    (sequence, head, K-column tile): the forward's causal pass with
//         (X, Y, Z, S) = (do, v, k, S^T), blocks in order, the state
//         recomputed on the way (nothing is saved by the forward);
//   dk dv (sequence, head): blocks in reverse order carrying R, the gradient
//         flowing into the state at the end of the block (d final_state for
//         the last block), and per block of n tokens, with
//         P = (Q K^T) * scale * lambda^(i-j) [j <= i] and dP likewise from dO V^T:
//           dK = dP^T Q + (lambda^(n-1-j) V) R^T
//           dV = P^T dO + (lambda^(n-1-j) K) R
//           R <- lambda^n R + (scale * lambda^(i+1) Q)^T dO
//         and d initial_state = R after the first block.
// Memory: the gradients plus O(block^2 + K V) scratch per thread.
#include <type_traits>

#include "common/dispatch.h"
#include "lightning/prefill_cpu_pass.h"

namespace m1::lightning {
namespace {

using cpu_detail::CausalPass;
using cpu_detail::DecayTables;
using cpu_detail::Scratch;
using cpu_detail::Task;
using cpu_detail::Tile;
using cpu_detail::TokenInput;
using cpu_detail::gemm;

enum TaskKind { kDq = 0, kDkDv = 1 };

// The reverse pass of one (sequence, head): dk, dv and d initial_state.
template <typename T, typename S>
void dkdv_pass(const PrefillParams& p, int64_t seq_index, int64_t h, Scratch<acc_t<T>>& scratch) {
  using Acc = acc_t<T>;
  const SeqSpan seq = sequence_span(p.cu_seqlens, seq_index, p.seqlen);
  const int64_t bs = cpu_detail::effective_block(p.block_size, seq.len), K = p.dk, V = p.dv, H = p.heads;
  const TokenInput<T> q{static_cast<const T*>(p.q), p.q_strides}, k{static_cast<const T*>(p.k), p.k_strides};
  const TokenInput<T> v{static_cast<const T*>(p.v), p.v_strides};
  const TokenInput<T> dout{static_cast<const T*>(p.grad_o), p.grad_o_strides};
  const TokenStrides dk_st{p.seqlen * H * K, H * K, K}, dv_st{p.seqlen * H * V, H * V, V};

  // Scratch: q, k, kd, qd [bs, K]; v, do, vd [bs, V]; dk [bs, K], dv [bs, V]; p, dp [bs, bs]; r [K, V].
  Acc* qb = scratch.get(5 * bs * K + 4 * bs * V + 2 * bs * bs + K * V);
  Acc *kb = qb + bs * K, *kd = kb + bs * K, *qd = kd + bs * K, *dkb = qd + bs * K;
  Acc *vb = dkb + bs * K, *dob = vb + bs * V, *vd = dob + bs * V, *dvb = vd + bs * V;
  Acc *pm = dvb + bs * V, *dpm = pm + bs * bs, *r = dpm + bs * bs;
  DecayTables<Acc> dec;
  dec.fill(p.slope[h], p.scale, bs);

  const int64_t state_off = state_offset(seq_index, h, H, K, V);
  bool zero_r = p.grad_final_state == nullptr;
  if (!zero_r) cpu_detail::load_state<S, Acc>(static_cast<const S*>(p.grad_final_state) + state_off, V, 1, K, V, r);

  for (int64_t blk = num_blocks(seq.len, bs) - 1; blk >= 0; --blk) {
    const BlockSpan bk = block_span(seq.len, bs, blk);
    const int64_t n = bk.len, t0 = seq.start + bk.start;
    const Tile<Acc> qt = cpu_detail::load_tile<T, Acc>(q, seq.batch, t0, h, 0, n, K, qb);
    const Tile<Acc> kt = cpu_detail::load_tile<T, Acc>(k, seq.batch, t0, h, 0, n, K, kb);
    const Tile<Acc> vt = cpu_detail::load_tile<T, Acc>(v, seq.batch, t0, h, 0, n, V, vb);
    const Tile<Acc> dot = cpu_detail::load_tile<T, Acc>(dout, seq.batch, t0, h, 0, n, V, dob);
    T* dk_dst = static_cast<T*>(p.grad_k) + token_offset(dk_st, seq.batch, t0, h);
    T* dv_dst = static_cast<T*>(p.grad_v) + token_offset(dv_st, seq.batch, t0, h);
    Acc *dko = dkb, *dvo = dvb;
    int64_t ldk = K, ldv = V;
    if constexpr (std::is_same_v<T, Acc>) dko = dk_dst, ldk = dk_st.token, dvo = dv_dst, ldv = dv_st.token;

    gemm(false, true, n, n, K, Acc(1), qt.p, qt.ld, kt.p, kt.ld, Acc(0), pm, bs);     // Q K^T
    cpu_detail::mask_decay<Acc>(pm, bs, n, dec.rsd.data(), bs);                       // P
    gemm(false, true, n, n, V, Acc(1), dot.p, dot.ld, vt.p, vt.ld, Acc(0), dpm, bs);  // dO V^T
    cpu_detail::mask_decay<Acc>(dpm, bs, n, dec.rsd.data(), bs);                      // dP

    gemm(true, false, n, K, n, Acc(1), dpm, bs, qt.p, qt.ld, Acc(0), dko, ldk);  // dK = dP^T Q
    gemm(true, false, n, V, n, Acc(1), pm, bs, dot.p, dot.ld, Acc(0), dvo, ldv);  // dV = P^T dO
    if (!zero_r) {
      const Acc* key_decay = dec.key_decay(n);
      cpu_detail::scaled_copy_rows<Acc>(vt, n, V, key_decay, vd);
      cpu_detail::scaled_copy_rows<Acc>(kt, n, K, key_decay, kd);
      gemm(false, true, n, K, V, Acc(1), vd, V, r, V, Acc(1), dko, ldk);   // + Vd R^T
      gemm(false, false, n, V, K, Acc(1), kd, K, r, V, Acc(1), dvo, ldv);  // + Kd R
    }
    cpu_detail::scaled_copy_rows<Acc>(qt, n, K, dec.qd.data(), qd);
    const Acc block_decay = zero_r ? Acc(0) : dec.d[size_t(block_decay_exponent(n))];
    gemm(true, false, K, V, n, Acc(1), qd, K, dot.p, dot.ld, block_decay, r, V);  // R = lambda^n R + Qd^T dO
    zero_r = false;
    if constexpr (!std::is_same_v<T, Acc>) {
      cpu_detail::store_rows<T, Acc>(dko, ldk, n, K, dk_dst, dk_st.token);
      cpu_detail::store_rows<T, Acc>(dvo, ldv, n, V, dv_dst, dv_st.token);
    }
  }
  S* d_init = static_cast<S*>(p.grad_initial_state) + state_off;
  for (int64_t e = 0; e < K * V; ++e) d_init[e] = zero_r ? S(0) : S(r[e]);
}

template <typename T, typename S>
void bwd_typed(const PrefillParams& p) {
  using Acc = acc_t<T>;
  const int64_t H = p.heads, K = p.dk, V = p.dv;
  if (p.num_seqs == 0 || H == 0) return;

  double total = 0;
  for (int64_t n = 0; n < p.num_seqs; ++n) total += double(sequence_span(p.cu_seqlens, n, p.seqlen).len) * H;
  std::vector<Task> tasks;
  for (int64_t n = 0; n < p.num_seqs; ++n) {
    const int64_t len = sequence_span(p.cu_seqlens, n, p.seqlen).len;
    for (int64_t h = 0; h < H; ++h) {
      // dk dv: two score tiles and five state-sized products per block; dq: one pass of the forward's cost.
      tasks.push_back(Task{kDkDv, n, h, 0, V, double(len) * double(2 * (K + V) + 3 * K) * 1.0 + double(K * V)});
      if (K == 0) continue;
      const int64_t tiles = total > 0 ? cpu_detail::column_tiles(double(len) / total, p.cpu_threads, K) : 1;
      const int64_t width = ceil_div(K, tiles);
      for (int64_t c0 = 0; c0 < K; c0 += width) {
        const int64_t cols = std::min(width, K - c0);
        tasks.push_back(Task{kDq, n, h, c0, cols, double(len) * double(V + cols) + double(V * cols)});
      }
    }
  }

  cpu_detail::run_tasks<Acc>(std::move(tasks), [&](const Task& task, Scratch<Acc>& scratch) {
    if (task.kind == kDkDv) {
      dkdv_pass<T, S>(p, task.seq, task.head, scratch);
      return;
    }
    CausalPass<T, S> pass;  // dq = scale * do S^T through the forward's pass with (do, v, k, S^T)
    pass.x = TokenInput<T>{static_cast<const T*>(p.grad_o), p.grad_o_strides};
    pass.y = TokenInput<T>{static_cast<const T*>(p.v), p.v_strides};
    pass.z = TokenInput<T>{static_cast<const T*>(p.k), p.k_strides};
    pass.out = static_cast<T*>(p.grad_q);
    pass.out_st = TokenStrides{p.seqlen * H * K, H * K, K};
    pass.dim = V;
    pass.c0 = task.c0;
    pass.cols = task.cols;
    if (p.initial_state != nullptr) {  // S^T[r, c] = S[c0 + c, r]
      pass.state_in = static_cast<const S*>(p.initial_state) + state_offset(task.seq, task.head, H, K, V) + task.c0 * V;
      pass.in_rs = 1, pass.in_cs = V;
    }
    pass.set_sequence_head(p, task.seq, task.head);
    pass.run(scratch);
  });
}

}  // namespace

void prefill_bwd_cpu(const PrefillParams& p) {
  M1_DISPATCH_DTYPE(p.in_dtype, T, {
    if (p.state_dtype == DType::kFloat32) {
      bwd_typed<T, float>(p);
    } else if constexpr (std::is_same_v<T, double>) {
      bwd_typed<T, double>(p);
    } else {
      throw std::invalid_argument("m1: float64 lightning states need float64 q, k, v");
    }
  });
}

}  // namespace m1::lightning
