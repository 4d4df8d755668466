// Lightning attention prefill, forward, on the CPU.
//
// Work items are (sequence, head, value-column tile); each loops over its
// sequence's blocks carrying the fp32 state (the causal pass of
// prefill_cpu_pass.h: four GEMMs on tiles per block via BLAS, the decay mask
// in between). Memory is the output plus O(block^2 + K V) scratch per thread.
#include "lightning/prefill_cpu_pass.h"

#include <type_traits>

#include "common/dispatch.h"

namespace m1::lightning {
namespace {

using cpu_detail::CausalPass;
using cpu_detail::Task;
using cpu_detail::TokenInput;

template <typename T, typename S>
void fwd_typed(const PrefillParams& p) {
  using Acc = acc_t<T>;
  const int64_t H = p.heads, K = p.dk, V = p.dv;
  if (V == 0 || p.num_seqs == 0 || H == 0) return;  // nothing to compute: every output is empty

  double total = 0;
  for (int64_t n = 0; n < p.num_seqs; ++n) total += double(sequence_span(p.cu_seqlens, n, p.seqlen).len) * H;
  std::vector<Task> tasks;
  for (int64_t n = 0; n < p.num_seqs; ++n) {
    const int64_t len = sequence_span(p.cu_seqlens, n, p.seqlen).len;
    const int64_t tiles = total > 0 ? cpu_detail::column_tiles(double(len) / total, p.cpu_threads, V) : 1;
    const int64_t width = ceil_div(V, tiles);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c0 = 0; c0 < V; c0 += width) {
        const int64_t cols = std::min(width, V - c0);
        tasks.push_back(Task{0, n, h, c0, cols, double(len) * double(K + cols) + double(K * cols)});
      }
  }

  cpu_detail::run_tasks<Acc>(std::move(tasks), [&](const Task& task, cpu_detail::Scratch<Acc>& scratch) {
    CausalPass<T, S> pass;
    pass.x = TokenInput<T>{static_cast<const T*>(p.q), p.q_strides};
    pass.y = TokenInput<T>{static_cast<const T*>(p.k), p.k_strides};
    pass.z = TokenInput<T>{static_cast<const T*>(p.v), p.v_strides};
    pass.out = static_cast<T*>(p.o);
    pass.out_st = TokenStrides{p.seqlen * H * V, H * V, V};
    pass.dim = K;
    pass.c0 = task.c0;
    pass.cols = task.cols;
    const int64_t state_off = state_offset(task.seq, task.head, H, K, V) + task.c0;
    if (p.initial_state != nullptr) {
      pass.state_in = static_cast<const S*>(p.initial_state) + state_off;
      pass.in_rs = V, pass.in_cs = 1;
    }
    pass.state_out = static_cast<S*>(p.final_state) + state_off;
    pass.out_rs = V;
    pass.set_sequence_head(p, task.seq, task.head);
    pass.run(scratch);
  });
}

}  // namespace

void prefill_fwd_cpu(const PrefillParams& p) {
  M1_DISPATCH_DTYPE(p.in_dtype, T, {
    if (p.state_dtype == DType::kFloat32) {
      fwd_typed<T, float>(p);
    } else if constexpr (std::is_same_v<T, double>) {
      fwd_typed<T, double>(p);  // float64 states only with float64 inputs (checked by the glue)
    } else {
      throw std::invalid_argument("m1: float64 lightning states need float64 q, k, v");
    }
  });
}

}  // namespace m1::lightning
