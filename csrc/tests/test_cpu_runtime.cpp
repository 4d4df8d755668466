// cpu_runtime: the parallel loop covers its range exactly once; sgemm (BLAS
// or the portable loop, whichever this build has) matches a naive triple loop
// in double for every transpose combination, odd sizes and alpha/beta.
#include <array>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>

#include "common/cpu_runtime.h"
#include "tests/check.h"

using namespace m1::cpu;

namespace {

void test_parallel_for() {
  for (int64_t n : {0, 1, 7, 1000, 100003}) {
    for (int64_t grain : {1, 16, 1 << 20}) {
      std::vector<std::atomic<int>> seen(size_t(n) + 1);
      parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) seen[size_t(i)]++;
      });
      int bad = 0;
      for (int64_t i = 0; i < n; ++i) bad += seen[size_t(i)] != 1;
      M1_EXPECT(bad == 0, "n=%ld grain=%ld: %d indices not visited exactly once", long(n), long(grain), bad);
    }
  }
}

void test_sgemm() {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [m, n, k] : std::initializer_list<std::array<int64_t, 3>>{
               {1, 1, 1}, {3, 5, 7}, {64, 33, 17}, {130, 257, 65}, {4, 0, 3}, {5, 6, 0}}) {
        const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
        std::vector<float> a(size_t((ta ? k : m) * lda + 1)), b(size_t((tb ? n : k) * ldb + 1)),
            c(size_t(m * ldc + 1));
        for (auto* vec : {&a, &b, &c})
          for (float& x : *vec) x = nd(rng);
        std::vector<float> c0 = c;
        const float alpha = 0.75f, beta = (m + n) % 2 ? 0.f : -1.5f;
        sgemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
        double worst = 0;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double acc = 0, mag = 0;
            for (int64_t p = 0; p < k; ++p) {
              const double x = ta ? a[p * lda + i] : a[i * lda + p];
              const double y = tb ? b[j * ldb + p] : b[p * ldb + j];
              acc += x * y;
              mag += std::fabs(x * y);
            }
            const double want = alpha * acc + (beta == 0.f ? 0.0 : beta * double(c0[i * ldc + j]));
            const double bound = 1e-6 * (alpha * mag + std::fabs(beta * c0[i * ldc + j])) + 1e-30;
            worst = std::max(worst, std::fabs(c[i * ldc + j] - want) / bound);
          }
        M1_EXPECT(worst <= 1.0, "sgemm ta=%d tb=%d m=%ld n=%ld k=%ld: error %.3g x bound", ta, tb, long(m), long(n), long(k), worst);
        // Padding columns of C (j >= n) are untouched.
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = n; j < ldc; ++j)
            M1_EXPECT(c[i * ldc + j] == c0[i * ldc + j], "sgemm wrote C[%ld, %ld] outside n", long(i), long(j));
      }
  std::printf("sgemm backend: %s\n", gemm_backend());
}

}  // namespace

int main() {
  test_parallel_for();
  test_sgemm();
  M1_TEST_MAIN_END();
}
