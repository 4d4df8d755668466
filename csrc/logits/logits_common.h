// Helpers of the FP32 logits head shared by the CPU and CUDA kernels (and
// unit-tested on the host by csrc/tests/test_logits_common.cpp).
//
// Notation: N tokens, D model dim, V vocabulary, T temperature.
//   x = hidden @ weight^T          [N, V], never stored whole
//   z = x / T,  lse = logsumexp(z),  p = exp(z - lse)
//   logprob = z[target] - lse,  entropy = -sum p log p
//
// Online log-sum-exp: an accumulator summarises a set of logits z_j by
//   m = max_j z_j,   s = sum_j exp(z_j - m),   t = sum_j exp(z_j - m) (z_j - m)
// (the empty set: m = -inf, s = t = 0). Two accumulators merge exactly (up to
// rounding) by rescaling to the larger max, so vocabulary chunks can be
// processed in any grouping. Then
//   lse = m + log s,   entropy = log s - t / s.
// t is kept relative to the running max, so the entropy is a difference of two
// O(log V) numbers rather than of two O(|z|) ones (no cancellation when the
// logits are large and the distribution is peaked).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace m1::logits {

M1_HOST_DEVICE M1_INLINE float exp_(float x) { return ::expf(x); }
M1_HOST_DEVICE M1_INLINE double exp_(double x) { return ::exp(x); }
M1_HOST_DEVICE M1_INLINE float log_(float x) { return ::logf(x); }
M1_HOST_DEVICE M1_INLINE double log_(double x) { return ::log(x); }

template <typename Acc>
struct LseAcc {
  Acc m;  // running max (-inf when empty)
  Acc s;  // sum exp(z - m)
  Acc t;  // sum exp(z - m) * (z - m)
};

template <typename Acc>
M1_HOST_DEVICE M1_INLINE LseAcc<Acc> lse_empty() {
  return {Acc(-INFINITY), Acc(0), Acc(0)};
}

// The accumulator of the union of two disjoint sets. An accumulator whose max
// is -inf holds no probability mass (empty, or only -inf logits) and is the
// identity. NaN in either input propagates.
template <typename Acc>
M1_HOST_DEVICE M1_INLINE LseAcc<Acc> lse_merge(LseAcc<Acc> a, LseAcc<Acc> b) {
  if (b.m == Acc(-INFINITY)) return a;
  if (a.m == Acc(-INFINITY)) return b;
  if (b.m > a.m) {
    const LseAcc<Acc> tmp = a;
    a = b;
    b = tmp;
  }
  // a has the larger max (or either, when NaN is involved: the result is NaN).
  const Acc d = b.m - a.m;  // <= 0
  const Acc e = exp_(d);
  return {a.m, a.s + e * b.s, a.t + e * (b.t + b.s * d)};
}

// Adds one logit to an accumulator.
template <typename Acc>
M1_HOST_DEVICE M1_INLINE LseAcc<Acc> lse_push(LseAcc<Acc> a, Acc z) {
  return lse_merge(a, LseAcc<Acc>{z, Acc(1), Acc(0)});
}

template <typename Acc>
M1_HOST_DEVICE M1_INLINE Acc lse_value(LseAcc<Acc> a) {
  return a.m + log_(a.s);
}

template <typename Acc>
M1_HOST_DEVICE M1_INLINE Acc entropy_value(LseAcc<Acc> a) {
  return log_(a.s) - a.t / a.s;
}

// Targets: ignore_index marks rows without a target (padding); any other
// value must be a vocabulary index. Kernels only ever compare a target with a
// column index, never address memory with it.
M1_HOST_DEVICE M1_INLINE bool target_valid(int64_t target, int64_t vocab, int64_t ignore_index) {
  return target == ignore_index || (target >= 0 && target < vocab);
}

// Per-row outputs from the merged accumulator and the target's logit.
template <typename Acc>
struct RowOutputs {
  Acc logprob, entropy, lse;
};

template <typename Acc>
M1_HOST_DEVICE M1_INLINE RowOutputs<Acc> row_outputs(LseAcc<Acc> a, Acc z_target, bool ignored) {
  const Acc lse = lse_value(a);
  if (ignored) return {Acc(0), Acc(0), lse};
  return {z_target - lse, entropy_value(a), lse};
}

// Backward of one row. With upstream gradients g (logprob), e (entropy) and
// l (lse) of a row whose target is t:
//   d logprob / dz_j = [j = t] - p_j
//   d entropy / dz_j = -p_j (log p_j + entropy)
//   d lse     / dz_j = p_j
// so dL/dz_j = g [j = t] + p_j (l - g - e entropy - e log p_j), and
// dL/dx_j = dL/dz_j / T. RowGrad holds the row's coefficients with 1/T folded
// in; an ignored row has no logprob or entropy gradient (g = e = 0).
template <typename Acc>
struct RowGrad {
  Acc at_target;  // g / T, added at j = t
  Acc c;          // (l - g - e * entropy) / T
  Acc e;          // e / T
};

template <typename Acc>
M1_HOST_DEVICE M1_INLINE RowGrad<Acc> row_grad(Acc g, Acc e, Acc l, Acc entropy, Acc inv_temp, bool ignored) {
  if (ignored) return {Acc(0), l * inv_temp, Acc(0)};
  return {g * inv_temp, (l - g - e * entropy) * inv_temp, e * inv_temp};
}

// dL/dx of one element: p = exp(logp), logp = z - lse.
template <typename Acc>
M1_HOST_DEVICE M1_INLINE Acc dlogit(RowGrad<Acc> r, Acc p, Acc logp, bool is_target) {
  return p * (r.c - r.e * logp) + (is_target ? r.at_target : Acc(0));
}

// Splits [0, n) into `parts` contiguous ranges whose sizes differ by at most
// one; part i is [part_begin(n, parts, i), part_begin(n, parts, i + 1)).
M1_HOST_DEVICE M1_INLINE int64_t part_begin(int64_t n, int64_t parts, int64_t i) {
  const int64_t q = n / parts, r = n % parts;
  return q * i + (i < r ? i : r);
}

// The part that holds index k (0 <= k < n).
M1_HOST_DEVICE M1_INLINE int64_t part_of(int64_t n, int64_t parts, int64_t k) {
  const int64_t q = n / parts, r = n % parts;
  const int64_t big = r * (q + 1);  // the first r parts have q + 1 items
  return k < big ? k / (q + 1) : r + (k - big) / q;
}

M1_HOST_DEVICE M1_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace m1::logits
