// Vectorised element loops of the CPU logits head: exp, the log-sum-exp
// statistics of a row chunk, and the backward's dL/dx of a row chunk.
//
// Written with GCC/Clang vector extensions (8 floats): they compile to AVX2 in
// the x86-64-v3 clone of an M1_CPU_MULTIVERSION caller and to pairs of SSE
// instructions in the baseline one, without intrinsics. A scalar expf here
// would cost more than the GEMM (one exp per logit, V * N of them).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "logits/logits_common.h"

// The vector types never cross a non-inlined call, so the ABI note GCC gives
// for them (-Wpsabi) does not apply.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace m1::logits::vec {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

M1_INLINE f32x8 splat(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

M1_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

M1_INLINE void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) to about 1 ulp on [-87.3, 88]: x = k ln2 + r with |r| <= ln2 / 2
// (Cody-Waite split of ln2), e^r by the Cephes minimax polynomial, 2^k built in
// the exponent bits. Below -87.3 the result is 0 (true value < 1.2e-38); above
// 88 it is e^88 (callers pass x <= 0 up to rounding); NaN gives NaN.
M1_INLINE f32x8 exp8(f32x8 x) {
  const f32x8 lo = splat(-87.3f), hi = splat(88.f);
  const f32x8 xc = x > hi ? hi : (x < lo ? lo : x);  // NaN passes through both compares
  const f32x8 shifter = splat(12582912.f);          // 1.5 * 2^23: adding it rounds to an integer
  const f32x8 kf_shifted = xc * splat(1.44269504088896341f) + shifter;
  i32x8 k;
  std::memcpy(&k, &kf_shifted, sizeof(k));
  k -= i32x8{} + 0x4B400000;  // the integer k from the shifted float's mantissa
  const f32x8 kf = kf_shifted - shifter;
  f32x8 r = xc - kf * splat(0.693359375f);  // ln2 = 0.693359375 - 2.12194440e-4
  r = r - kf * splat(-2.12194440e-4f);
  f32x8 y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * (r * r) + r + splat(1.f);
  const i32x8 bits = (k + 127) << 23;  // 2^k, k in [-126, 127]
  f32x8 two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  const f32x8 res = y * two_k;
  return x < lo ? splat(0.f) : res;
}

// Scalar exp with the same definition, for tails and tests.
M1_INLINE float exp1(float x) {
  float buf[kLanes] = {x, x, x, x, x, x, x, x};
  float out[kLanes];
  store8(out, exp8(load8(buf)));
  return out[0];
}

// Max of the lanes; NaN if any lane is NaN.
M1_INLINE float hmax8(f32x8 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}

M1_INLINE float hsum8(f32x8 v) {
  // Pairwise, in a fixed order: the result does not depend on the caller.
  const float a = (v[0] + v[4]) + (v[2] + v[6]);
  const float b = (v[1] + v[5]) + (v[3] + v[7]);
  return a + b;
}

// Log-sum-exp statistics of z[0, n) (see logits_common.h). Two passes over a
// chunk that is in cache: the max (NaN if any z is NaN), then the exp sums
// relative to it.
M1_INLINE LseAcc<float> chunk_stats(const float* z, int64_t n) {
  f32x8 vm = splat(-INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f32x8 v = load8(z + j);
    vm = (v > vm || v != v) ? v : vm;
  }
  float m = hmax8(vm);
  for (; j < n; ++j) m = (z[j] > m || z[j] != z[j]) ? z[j] : m;
  if (m == -INFINITY) return lse_empty<float>();  // empty, or only -inf: no probability mass
  const f32x8 vmax = splat(m), vfloor = splat(-88.f);
  f32x8 vs = splat(0.f), vt = splat(0.f);
  j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f32x8 d = load8(z + j) - vmax;
    const f32x8 e = exp8(d);
    vs += e;
    vt += e * (d > vfloor ? d : vfloor);  // e == 0 below -87.3: keeps 0 * -inf out of t
  }
  float s = hsum8(vs), t = hsum8(vt);
  for (; j < n; ++j) {
    const float d = z[j] - m;
    const float e = exp1(d);
    s += e;
    t += e * (d > -88.f ? d : -88.f);
  }
  return {m, s, t};
}

// In place over a chunk of one row: z[j] -> dL/dx_j (logits_common.h dlogit),
// with p = exp(z - lse). `target_col` is the target's index inside the chunk,
// or -1 when the chunk does not hold it.
M1_INLINE void chunk_dlogits(float* z, int64_t n, float lse, RowGrad<float> g, int64_t target_col) {
  // log p is floored at -88 in the second factor, where p == 0 already: a
  // -inf logit then gives 0, not 0 * inf.
  const f32x8 vlse = splat(lse), vc = splat(g.c), ve = splat(g.e), vfloor = splat(-88.f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const f32x8 logp = load8(z + j) - vlse;
    store8(z + j, exp8(logp) * (vc - ve * (logp > vfloor ? logp : vfloor)));
  }
  for (; j < n; ++j) {
    const float logp = z[j] - lse;
    z[j] = exp1(logp) * (g.c - g.e * (logp > -88.f ? logp : -88.f));
  }
  if (target_col >= 0) z[target_col] += g.at_target;
}

// float64 versions (the gradcheck path): plain loops with std::exp.
inline LseAcc<double> chunk_stats(const double* z, int64_t n) {
  LseAcc<double> a = lse_empty<double>();
  for (int64_t j = 0; j < n; ++j) a = lse_push(a, z[j]);
  return a;
}

inline void chunk_dlogits(double* z, int64_t n, double lse, RowGrad<double> g, int64_t target_col) {
  for (int64_t j = 0; j < n; ++j) {
    const double logp = z[j] - lse;
    z[j] = dlogit(g, std::exp(logp), logp > -750.0 ? logp : -750.0, j == target_col);
  }
}

}  // namespace m1::logits::vec

#pragma GCC diagnostic pop
