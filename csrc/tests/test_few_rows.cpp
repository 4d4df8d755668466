// The few-rows GEMM of common/few_rows_gemm.h (the FP32 head while decoding,
// fused-MoE experts with few rows): the portable kernel, the AVX-512 kernel
// (where this CPU has it) and the dispatching entry point, each against a
// long-double loop on the same rounded inputs. Shapes cross every tile edge:
// m across the 4-row A blocks and the 8-row portable blocks, n across the 1/4
// B-row tiles, k across the 16-lane steps (masked tails), with padded row
// strides whose padding must stay untouched in C.
#include <cmath>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/dtype.h"
#include "common/few_rows_gemm.h"
#include "tests/check.h"

using namespace m1;

namespace {

using LD = long double;
constexpr float kSentinel = -12345.f;

template <typename T>
const char* name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, bf16>) return "bf16";
  return "fp16";
}

// Runs `gemm` on random A [m, k] (stride lda) and B [n, k] (stride ldb) and checks C [m, n]
// (stride ldc) element by element: |c - exact| <= k * 2^-23 * sum |a b| (fp32 summation of k
// products in any order, each product exact or rounded once) plus a tiny absolute term.
template <typename T, typename Gemm>
void check(const char* kernel, Gemm gemm, int64_t m, int64_t n, int64_t k, std::mt19937& rng) {
  const int64_t lda = k + 3, ldb = k + 5, ldc = n + 2;
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> a(m * lda, std::nanf(""));  // padding is NaN: reading it would show
  std::vector<T> b(n * ldb, store_from<T>(std::nanf("")));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t p = 0; p < k; ++p) a[i * lda + p] = dist(rng);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) b[j * ldb + p] = store_from<T>(dist(rng));
  std::vector<float> c(m * ldc, kSentinel);
  gemm(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc);
  double worst = 0;
  bool padding_kept = true;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      LD exact = 0, magnitude = 0;
      for (int64_t p = 0; p < k; ++p) {
        const LD t = LD(a[i * lda + p]) * LD(load_as<float>(b[j * ldb + p]));
        exact += t;
        magnitude += std::fabs(t);
      }
      const double bound = double(k) * std::ldexp(1.0, -23) * double(magnitude) + 1e-30;
      const double r = double(std::fabs(LD(c[i * ldc + j]) - exact)) / bound;
      if (!(r <= worst)) worst = r;  // a NaN sticks
    }
    for (int64_t j = n; j < ldc; ++j) padding_kept = padding_kept && c[i * ldc + j] == kSentinel;
  }
  M1_EXPECT(worst <= 1.0, "%s<%s> m=%ld n=%ld k=%ld: error at %.3g of its bound", kernel, name<T>(), long(m),
            long(n), long(k), worst);
  M1_EXPECT(padding_kept, "%s<%s> m=%ld n=%ld k=%ld wrote into C's row padding", kernel, name<T>(), long(m),
            long(n), long(k));
}

template <typename T>
void test_type(std::mt19937& rng) {
  const auto portable = [](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                           float* c, int64_t ldc) {
    for (int64_t i = 0; i < m; i += cpu::kFewRows)
      cpu::gemm_nt_few_rows_block<T>(std::min(cpu::kFewRows, m - i), n, k, a + i * lda, lda, b, ldb, c + i * ldc, ldc);
  };
  const auto avx512 = [](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                         float* c, int64_t ldc) { cpu::gemm_nt_few_rows_avx512<T>(m, n, k, a, lda, b, ldb, c, ldc); };
  const auto dispatched = [](int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const T* b, int64_t ldb,
                             float* c, int64_t ldc) { cpu::gemm_nt_few_rows<T>(m, n, k, a, lda, b, ldb, c, ldc); };
  for (int64_t m : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17}) {
    for (int64_t n : {1, 3, 4, 5, 8, 9, 13, 33}) {
      for (int64_t k : {1, 15, 16, 17, 33, 50, 100}) {  // 50: two-slice steps, one 16-step, a tail
        check<T>("portable", portable, m, n, k, rng);
        check<T>("dispatched", dispatched, m, n, k, rng);
        if (avx512::cpu_has()) check<T>("avx512", avx512, m, n, k, rng);
      }
    }
  }
  // k = 0 writes zeros; a long k (the model's hidden size) against the bound.
  std::vector<float> c(6, kSentinel);
  cpu::gemm_nt_few_rows<T>(2, 3, 0, nullptr, 0, nullptr, 0, c.data(), 3);
  bool zeros = true;
  for (float v : c) zeros = zeros && v == 0.f;
  M1_EXPECT(zeros, "%s k = 0 must write zeros", name<T>());
  check<T>("dispatched", dispatched, 3, 40, 1024, rng);
  if (avx512::cpu_has()) check<T>("avx512", avx512, 8, 40, 1024, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(20261122);
  test_type<float>(rng);
  test_type<bf16>(rng);
  test_type<fp16>(rng);
  if (!avx512::cpu_has()) {
    bool threw = false;
    try {
      cpu::gemm_nt_few_rows_avx512<float>(1, 1, 1, nullptr, 1, nullptr, 1, nullptr, 1);
    } catch (const std::logic_error&) {
      threw = true;
    }
    M1_EXPECT(threw, "gemm_nt_few_rows_avx512 without AVX-512 must throw");
    std::printf("note: this CPU has no AVX-512; only the portable kernel was checked\n");
  }
  M1_TEST_MAIN_END();
}
