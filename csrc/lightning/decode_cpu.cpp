// Lightning attention decode on the CPU.
//
// Math (per sequence b, head h; S is the [K, V] state):
//   S <- lambda_h * S + k^T v,   o = scale * q S
// Tiling: parallel over the B*H states; each state is streamed once, row by
// row: S[i, :] = lambda * S[i, :] + k_i * v;  o += (scale * q_i) * S[i, :].
// A step is memory-bound (K*V*4 flops against K*V*8 bytes of state traffic),
// so one fused pass is the whole optimisation; the row loop vectorises over V.
#include <type_traits>
#include <vector>

#include "common/cpu_runtime.h"
#include "common/dispatch.h"
#include "lightning/decode.h"

namespace m1::lightning {
namespace {

// One state pass. q already carries the scale; o is overwritten.
template <typename Acc, typename S>
M1_CPU_MULTIVERSION void decode_state_pass(S* __restrict state, const Acc* __restrict q, const Acc* __restrict k,
                                           const Acc* __restrict v, Acc lambda, int64_t dk, int64_t dv,
                                           Acc* __restrict o) {
  for (int64_t j = 0; j < dv; ++j) o[j] = Acc(0);
  for (int64_t i = 0; i < dk; ++i) {
    S* __restrict row = state + i * dv;
    const Acc ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      const Acc s = lambda * Acc(row[j]) + ki * v[j];
      row[j] = S(s);
      o[j] += qi * s;
    }
  }
}

template <typename T, typename S>
void decode_typed(const DecodeParams& p) {
  using Acc = acc_t<T>;
  const int64_t dk = p.dk, dv = p.dv;
  // About 256K state elements (1 MiB of fp32, ~20 us of streaming) per task: waking a second
  // thread costs several microseconds and far more on a loaded machine, so smaller steps (a
  // small model's whole layer) run on one thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, dk * dv));
  cpu::parallel_for(0, p.batch * p.heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> buf(2 * dk + 2 * dv);  // q, k, v, o of one (b, h) in Acc
    Acc *q = buf.data(), *k = q + dk, *v = k + dk, *o = v + dv;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads, h = bh % p.heads;
      const T* qg = static_cast<const T*>(p.q) + row_offset(p.q_strides, b, h);
      const T* kg = static_cast<const T*>(p.k) + row_offset(p.k_strides, b, h);
      const T* vg = static_cast<const T*>(p.v) + row_offset(p.v_strides, b, h);
      for (int64_t i = 0; i < dk; ++i) {
        q[i] = Acc(p.scale) * load_as<Acc>(qg[i]);
        k[i] = load_as<Acc>(kg[i]);
      }
      for (int64_t j = 0; j < dv; ++j) v[j] = load_as<Acc>(vg[j]);
      const Acc lambda = decay_pow<Acc>(Acc(p.slope[h]), 1);
      S* state = static_cast<S*>(p.state) + state_offset(b, h, p.heads, dk, dv);
      decode_state_pass<Acc, S>(state, q, k, v, lambda, dk, dv, o);
      T* og = static_cast<T*>(p.o) + bh * dv;
      for (int64_t j = 0; j < dv; ++j) og[j] = store_from<T>(o[j]);
    }
  });
}

}  // namespace

void decode_cpu(const DecodeParams& p) {
  M1_DISPATCH_DTYPE(p.in_dtype, T, {
    if (p.state_dtype == DType::kFloat32) {
      decode_typed<T, float>(p);
    } else if constexpr (std::is_same_v<T, double>) {
      decode_typed<T, double>(p);  // float64 state only with float64 inputs (checked by the glue)
    } else {
      throw std::invalid_argument("m1: float64 decode state needs float64 q, k, v");
    }
  });
}

}  // namespace m1::lightning
