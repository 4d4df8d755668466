// Host tests of lightning/lightning_common.h, the decay and index helpers the
// CPU and CUDA kernels share.
#include <cmath>
#include <initializer_list>

#include "lightning/lightning_common.h"
#include "tests/check.h"

using namespace m1::lightning;

int main() {
  // decay_pow is lambda^n with lambda = exp(-slope), computed as one exp.
  for (double s : {0.0, 1e-6, 0.0439, 0.5, 2.0, 30.0}) {
    for (int64_t n : {0, 1, 2, 255, 256, 100000}) {
      M1_EXPECT(decay_pow<double>(s, n) == std::exp(-s * double(n)), "decay_pow<double>(%g, %ld)", s, long(n));
      const float f = decay_pow<float>(float(s), n);
      M1_EXPECT(f == std::exp(-float(s) * float(n)), "decay_pow<float>(%g, %ld)", s, long(n));
      M1_EXPECT(f >= 0.f && f <= 1.f, "decay in [0, 1] for s >= 0: %g", f);
      // Semigroup: lambda^(a + b) = lambda^a lambda^b up to rounding; the
      // exponent s * n carries a relative rounding of 2^-53, i.e. an absolute
      // error of ~1.1e-16 * s * n, which exp turns into that relative error.
      const double lhs = decay_pow<double>(s, n + 7), rhs = decay_pow<double>(s, n) * decay_pow<double>(s, 7);
      const double tol = 4.5e-16 * (2.0 + s * double(n + 7));
      M1_EXPECT(std::fabs(lhs - rhs) <= tol * std::fabs(lhs) + 1e-300, "semigroup at s=%g n=%ld", s, long(n));
    }
  }
  M1_EXPECT(decay_pow<float>(0.f, 1 << 30) == 1.f, "no decay at slope 0");

  M1_EXPECT(ceil_div(0, 64) == 0 && ceil_div(1, 64) == 1 && ceil_div(64, 64) == 1 && ceil_div(65, 64) == 2,
            "ceil_div");

  // Offsets enumerate a contiguous [B, H, K, V] tensor without gaps or overlaps.
  const int64_t B = 3, H = 5, K = 7, V = 11;
  int64_t expect = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h, expect += K * V)
      M1_EXPECT(state_offset(b, h, H, K, V) == expect, "state_offset(%ld, %ld)", long(b), long(h));
  // Row offsets of a strided view: q = qkv[..., :K] of a [B, H, 3K] tensor.
  const RowStrides qkv{H * 3 * K, 3 * K};
  M1_EXPECT(row_offset(qkv, 2, 4) == 2 * H * 3 * K + 4 * 3 * K, "row_offset");
  M1_TEST_MAIN_END();
}
