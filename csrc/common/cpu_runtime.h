// The two services CPU kernels need from a runtime: a parallel loop and an
// fp32 GEMM on tiles. Kernel code calls only these, so it stays torch-free.
//
// Inside the extension (M1_WITH_ATEN, set by setup.py) parallel_for is
// at::parallel_for: one thread pool with torch, honouring torch.set_num_threads,
// no oversubscription. In the standalone CMake library it is OpenMP (or serial).
//
// sgemm is the Fortran-BLAS sgemm_ of the process when one is loaded (inside
// torch: the MKL or OpenBLAS that libtorch_cpu exports), else a portable
// blocked loop. gemm_backend() names which one runs, so the choice is visible.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(M1_WITH_ATEN)
#include <ATen/Parallel.h>
#elif defined(_OPENMP)
#include <omp.h>
#endif

namespace m1::cpu {

// Calls fn(chunk_begin, chunk_end) over [begin, end), in parallel when the range
// holds more than `grain` items. fn must be safe to run concurrently.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  if (begin >= end) return;
#if defined(M1_WITH_ATEN)
  at::parallel_for(begin, end, grain, fn);
#elif defined(_OPENMP)
  const int64_t n = end - begin;
  if (n <= grain || omp_in_parallel() || omp_get_max_threads() == 1) {
    fn(begin, end);
    return;
  }
#pragma omp parallel
  {
    const int64_t threads = std::min<int64_t>(omp_get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
    const int64_t tid = omp_get_thread_num();
    const int64_t chunk = (n + threads - 1) / threads;
    const int64_t lo = begin + tid * chunk;
    if (tid < threads && lo < end) fn(lo, std::min(end, lo + chunk));
  }
#else
  (void)grain;
  fn(begin, end);
#endif
}

// Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C, op(X) = X or X^T.
// A is [m, k] (or [k, m] when trans_a), B is [k, n] (or [n, k] when trans_b);
// lda/ldb/ldc are row strides in elements. Single-threaded when called inside
// parallel_for (BLAS libraries detect the enclosing parallel region).
void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The same in float64 (BLAS dgemm_ when loaded, else the portable loop): for
// the float64 paths that gradcheck runs.
void dgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
           int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

// "blas (sgemm_)" or "portable loop".
const char* gemm_backend();

}  // namespace m1::cpu
