// RMSNorm on the CPU (norm/rms_norm.h): one read of each row for the sum of squares, one more
// (from L1/L2) for the scaled, rounded and weighted output; rows split across threads.
#include <cmath>
#include <stdexcept>

#include "common/cpu_runtime.h"
#include "common/dispatch.h"
#include "common/macros.h"
#include "norm/rms_norm.h"

namespace m1::norm {
namespace {

// Sum of squares with 8 partial sums (vectorised in the AVX2 clone, fixed order).
template <typename T, typename Acc>
M1_CPU_MULTIVERSION Acc sum_squares(const T* __restrict x, int64_t d) {
  Acc part[8] = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int l = 0; l < 8; ++l) {
      const Acc v = load_as<Acc>(x[j + l]);
      part[l] += v * v;
    }
  for (; j < d; ++j) {
    const Acc v = load_as<Acc>(x[j]);
    part[0] += v * v;
  }
  Acc s = 0;
  for (int l = 0; l < 8; ++l) s += part[l];
  return s;
}

template <typename T, typename W, typename O>
M1_CPU_MULTIVERSION void scale_row(const T* __restrict x, const W* __restrict w, O* __restrict out, int64_t d,
                                   acc_t<T> r) {
  using Acc = acc_t<T>;
  for (int64_t j = 0; j < d; ++j) {
    const T y = store_from<T>(load_as<Acc>(x[j]) * r);
    out[j] = store_from<O>(load_as<Acc>(y) * load_as<Acc>(w[j]));
  }
}

template <typename T, typename W, typename O>
void run(const RmsNormParams& p) {
  using Acc = acc_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.weight);
  O* out = static_cast<O*>(p.out);
  const int64_t d = p.d;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));  // rows per task: ~16K values
  cpu::parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = x + i * p.ldx;
      const Acc ms = sum_squares<T, Acc>(row, d) / Acc(d);
      const Acc r = Acc(1) / std::sqrt(ms + Acc(p.eps));
      scale_row<T, W, O>(row, w, out + i * d, d, r);
    }
  });
}

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  if (p.rows == 0 || p.d == 0) return;
  if (p.weight_dtype == p.x_dtype) {
    M1_DISPATCH_DTYPE(p.x_dtype, T, run<T, T, T>(p));
    return;
  }
  if (p.weight_dtype != DType::kFloat32) throw std::invalid_argument("m1: rms_norm weight must be x's dtype or float32");
  switch (p.x_dtype) {
    case DType::kBFloat16: return run<bf16, float, float>(p);
    case DType::kFloat16: return run<fp16, float, float>(p);
    default: throw std::invalid_argument("m1: rms_norm with a float32 weight takes 16-bit x");
  }
}

}  // namespace m1::norm
