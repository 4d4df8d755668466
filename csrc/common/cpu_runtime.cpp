// See cpu_runtime.h. Torch-free: the BLAS is found by symbol, not by header.
#include "common/cpu_runtime.h"

#include <climits>
#include <stdexcept>

#include "common/macros.h"

// Fortran BLAS entry points. Declared weak so that the library links without a
// BLAS; inside torch, libtorch_cpu (a dependency of the extension) exports them.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));

namespace m1::cpu {
namespace {

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

// C = alpha * op(A) op(B) + beta * C, row-major, one row of C at a time so the
// inner loop is a contiguous axpy over n (vectorised in the AVX2 clone).
template <typename T>
M1_CPU_MULTIVERSION void gemm_portable(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                                       const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                                       int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    T* __restrict crow = c + i * ldc;
    if (beta == T(0)) {
      for (int64_t j = 0; j < n; ++j) crow[j] = T(0);
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) crow[j] *= beta;
    }
    for (int64_t p = 0; p < k; ++p) {
      const T aip = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
      if (!trans_b) {
        const T* __restrict brow = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) crow[j] += aip * brow[j];
      } else {
        for (int64_t j = 0; j < n; ++j) crow[j] += aip * b[j * ldb + p];
      }
    }
  }
}

// The Fortran BLAS call for row-major operands, or the portable loop when the
// process has no BLAS or a size does not fit its 32-bit integers.
template <typename T, typename Blas>
void gemm_dispatch(Blas* blas, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (blas != nullptr && fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc)) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the
    // operands and dimensions, keep the transpose flags.
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k);
    // BLAS requires leading dimensions >= 1 even for empty operands.
    const int ilda = std::max(1, int(lda)), ildb = std::max(1, int(ldb)), ildc = std::max(1, int(ldc));
    blas(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
    return;
  }
  gemm_portable<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace

void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_dispatch<float>(&sgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void dgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
           int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_dispatch<double>(&dgemm_, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

const char* gemm_backend() { return &sgemm_ != nullptr ? "blas (sgemm_)" : "portable loop"; }

}  // namespace m1::cpu
