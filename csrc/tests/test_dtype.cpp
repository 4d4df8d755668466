// 16-bit conversions of common/dtype.h (used by every CPU and CUDA kernel):
// exhaustive widening round trips and round-to-nearest-even narrowing, checked
// against the definition (nearest representable value, ties to even mantissa)
// rather than against the implementation's own output.
#include <cmath>
#include <initializer_list>
#include <cstdint>
#include <limits>
#include <random>

#include "common/dtype.h"
#include "tests/check.h"

using namespace m1;

namespace {

bool is_nan16_bf(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu); }
bool is_nan16_fp(uint16_t b) { return (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu); }

// Nearest-even oracle: x must round to whichever neighbour is closer; on a
// tie, to the one with an even payload. `lo`/`hi` are the two candidates.
template <typename Widen>
bool nearest_even(double x, uint16_t got, uint16_t lo, uint16_t hi, Widen widen) {
  const double dlo = std::fabs(x - widen(lo)), dhi = std::fabs(x - widen(hi));
  if (dlo < dhi) return got == lo;
  if (dhi < dlo) return got == hi;
  return got == ((lo & 1u) ? hi : lo);
}

void test_bf16() {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = bf16_to_float(bf16{uint16_t(b)});
    const uint16_t back = float_to_bf16(f).bits;
    if (is_nan16_bf(uint16_t(b))) {
      M1_EXPECT(std::isnan(f) && is_nan16_bf(back), "bf16 NaN 0x%04x", b);
    } else {
      M1_EXPECT(back == b, "bf16 round trip 0x%04x -> %g -> 0x%04x", b, f, back);
    }
  }
  // Midpoints between adjacent positive finite values, and just off them.
  auto widen = [](uint16_t x) { return double(bf16_to_float(bf16{x})); };
  for (uint32_t b = 0; b + 1 < 0x7f80u; ++b) {
    const double lo = widen(uint16_t(b)), hi = widen(uint16_t(b + 1));
    const float mid = float((lo + hi) / 2);  // exact: 8 mantissa bits + 1 fit in float
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)}) {
      const uint16_t got = float_to_bf16(x).bits;
      M1_EXPECT(nearest_even(x, got, uint16_t(b), uint16_t(b + 1), widen), "bf16(%.9g) = 0x%04x", x, got);
      M1_EXPECT(float_to_bf16(-x).bits == (got | 0x8000u), "bf16 sign symmetry at %.9g", x);
    }
  }
  M1_EXPECT(float_to_bf16(std::numeric_limits<float>::infinity()).bits == 0x7f80u, "bf16(inf)");
  M1_EXPECT(float_to_bf16(3.4028235e38f).bits == 0x7f80u, "bf16(FLT_MAX) rounds to inf");
  M1_EXPECT(is_nan16_bf(float_to_bf16(std::nanf("")).bits), "bf16(NaN) stays NaN");
}

void test_fp16() {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const float f = fp16_to_float(fp16{uint16_t(b)});
    const uint16_t back = float_to_fp16(f).bits;
    if (is_nan16_fp(uint16_t(b))) {
      M1_EXPECT(std::isnan(f) && is_nan16_fp(back), "fp16 NaN 0x%04x", b);
    } else {
      M1_EXPECT(back == b, "fp16 round trip 0x%04x -> %g -> 0x%04x", b, f, back);
    }
  }
  // Widening against the definition: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
  for (uint32_t b = 0; b < 0x7c00u; ++b) {
    const uint32_t e = b >> 10, m = b & 0x3ffu;
    const double want = e ? std::ldexp(1.0 + m / 1024.0, int(e) - 15) : std::ldexp(m / 1024.0, -14);
    M1_EXPECT(double(fp16_to_float(fp16{uint16_t(b)})) == want, "fp16 0x%04x widens to %g, want %g", b,
              fp16_to_float(fp16{uint16_t(b)}), want);
  }
  auto widen = [](uint16_t x) { return double(fp16_to_float(fp16{x})); };
  for (uint32_t b = 0; b + 1 < 0x7c00u; ++b) {  // includes subnormal -> normal boundary
    const double lo = widen(uint16_t(b)), hi = widen(uint16_t(b + 1));
    const float mid = float((lo + hi) / 2);
    for (float x : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)}) {
      const uint16_t got = float_to_fp16(x).bits;
      M1_EXPECT(nearest_even(x, got, uint16_t(b), uint16_t(b + 1), widen), "fp16(%.9g) = 0x%04x", x, got);
      M1_EXPECT(float_to_fp16(-x).bits == (got | 0x8000u), "fp16 sign symmetry at %.9g", x);
    }
  }
  // Overflow: 65504 is the largest finite half; the midpoint 65520 rounds to inf (even).
  M1_EXPECT(float_to_fp16(65519.99f).bits == 0x7bffu, "fp16(65519.99)");
  M1_EXPECT(float_to_fp16(65520.f).bits == 0x7c00u, "fp16(65520) -> inf");
  M1_EXPECT(float_to_fp16(1e10f).bits == 0x7c00u, "fp16(1e10) -> inf");
  // Underflow: half the smallest subnormal (2^-25) ties to zero; just above rounds up.
  M1_EXPECT(float_to_fp16(std::ldexp(1.f, -25)).bits == 0x0000u, "fp16(2^-25) -> 0");
  M1_EXPECT(float_to_fp16(std::nextafter(std::ldexp(1.f, -25), 1.f)).bits == 0x0001u, "fp16(2^-25+) -> 1");
  M1_EXPECT(is_nan16_fp(float_to_fp16(std::nanf("")).bits), "fp16(NaN) stays NaN");

  // Random floats over the whole fp16 range against the nearest-even oracle.
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> exponent(-26.f, 16.f);
  for (int i = 0; i < 200000; ++i) {
    const float x = std::exp2(exponent(rng));
    const uint16_t got = float_to_fp16(x).bits;
    if (got >= 0x7c00u) {
      M1_EXPECT(x >= 65520.f, "fp16(%.9g) overflowed", x);
      continue;
    }
    const uint16_t lo = widen(got) <= x ? got : uint16_t(got - 1);
    M1_EXPECT(nearest_even(x, got, lo, uint16_t(lo + 1), widen), "fp16(%.9g) = 0x%04x", x, got);
  }
}

void test_load_store() {
  M1_EXPECT(load_as<float>(bf16{0x3f80u}) == 1.f, "bf16 1.0");
  M1_EXPECT(load_as<double>(fp16{0x3c00u}) == 1.0, "fp16 1.0");
  M1_EXPECT(store_from<bf16>(1.f).bits == 0x3f80u, "store bf16 1.0");
  M1_EXPECT(store_from<fp16>(-2.0).bits == 0xc000u, "store fp16 -2.0");
  M1_EXPECT(store_from<double>(0.1f) == double(0.1f), "store double from float is exact");
}

}  // namespace

int main() {
  test_bf16();
  test_fp16();
  test_load_store();
  M1_TEST_MAIN_END();
}
