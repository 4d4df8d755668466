// The CUTLASS side of moe_grouped_gemm.h: kernel types and the runner that
// packs the host-built problems into the argument arrays GemmGrouped reads.
// Included by the per-dtype translation units moe_gemm_<dtype>.cu only (each
// CUTLASS kernel type costs tens of seconds of nvcc time per arch, so they are
// spread over several files that compile in parallel).
//
// Tiles (bf16/fp16, sm_80 mma.sync 16x8x16, also used on sm_90):
//   threadblock 128 x 128 x 32, 4 warps of 64 x 64, 4 stages of cp.async:
//   smem 4 x (128 x 32 + 32 x 128) x 2 B = 64 KB (opted in above 48 KB by
//   GemmGrouped::initialize). 8-element (16-byte) accesses: every leading
//   dimension and base pointer must be a multiple of 8 elements.
// float32: SIMT fp32 FMA (exact fp32, no TF32), 128 x 128 x 8, 4 stages,
//   scalar accesses (no alignment requirement).
// Scheduling: GroupScheduleMode::kDeviceOnly, a persistent grid of
//   min(total tiles, SMs x occupancy) threadblocks walking the problems.
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>
#include <cutlass/layout/matrix.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "moe/moe_grouped_gemm.h"

namespace m1::moe::gemm_detail {

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

template <typename Element, typename LayoutA, typename LayoutB, typename ElementOut>
using TensorOpGrouped = cutlass::gemm::device::GemmGrouped<typename cutlass::gemm::kernel::DefaultGemmGrouped<
    Element, LayoutA, cutlass::ComplexTransform::kNone, 8,  // A: 8 x 16-bit = 16 B per access
    Element, LayoutB, cutlass::ComplexTransform::kNone, 8,  // B
    ElementOut, RowMajor, float,                            // D row-major, fp32 accumulation
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>,  // threadblock tile
    cutlass::gemm::GemmShape<64, 64, 32>,    // warp tile (2 x 2 warps)
    cutlass::gemm::GemmShape<16, 8, 16>,     // mma.sync
    cutlass::epilogue::thread::LinearCombination<ElementOut, 128 / cutlass::sizeof_bits<ElementOut>::value, float,
                                                 float>,
    cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,  // unused by grouped kernels
    4, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel>;

template <typename LayoutA, typename LayoutB>
using SimtFp32Grouped = cutlass::gemm::device::GemmGrouped<typename cutlass::gemm::kernel::DefaultGemmGrouped<
    float, LayoutA, cutlass::ComplexTransform::kNone, 1,
    float, LayoutB, cutlass::ComplexTransform::kNone, 1,
    float, RowMajor, float,
    cutlass::arch::OpClassSimt, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 8>,  // threadblock tile
    cutlass::gemm::GemmShape<32, 64, 8>,    // warp tile (4 x 2 warps)
    cutlass::gemm::GemmShape<1, 1, 1>,      // one FMA
    cutlass::epilogue::thread::LinearCombination<float, 1, float, float>,
    cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,
    4, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel>;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("m1 fused_moe: ") + what + ": " + cudaGetErrorString(err));
}

inline void check_cutlass(cutlass::Status status, const char* what) {
  if (status != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("m1 fused_moe: CUTLASS grouped GEMM ") + what + " failed: " +
                             cutlassGetStatusString(status));
}

// Byte offsets of the argument arrays inside the device buffer: four pointer
// arrays, four leading-dimension arrays, then the problem sizes.
struct ArgsLayout {
  size_t ptr_a, ptr_b, ptr_c, ptr_d, lda, ldb, ldc, ldd, sizes, bytes;
  explicit ArgsLayout(int count) {
    const size_t n = size_t(count);
    ptr_a = 0;
    ptr_b = ptr_a + 8 * n;
    ptr_c = ptr_b + 8 * n;
    ptr_d = ptr_c + 8 * n;
    lda = ptr_d + 8 * n;
    ldb = lda + 8 * n;
    ldc = ldb + 8 * n;
    ldd = ldc + 8 * n;
    sizes = ldd + 8 * n;
    bytes = sizes + sizeof(cutlass::gemm::GemmCoord) * n;
  }
};

template <typename Gemm>
void run_grouped(const std::vector<GemmProblem>& problems, void* args_dev, cudaStream_t stream) {
  using ElementA = typename Gemm::ElementA;
  using ElementB = typename Gemm::ElementB;
  using ElementC = typename Gemm::ElementC;
  using Shape = typename Gemm::ThreadblockShape;
  const int count = int(problems.size());
  if (count == 0) return;

  const ArgsLayout layout(count);
  std::vector<uint8_t> host(layout.bytes);
  auto at = [&](size_t offset) { return host.data() + offset; };
  std::vector<cutlass::gemm::GemmCoord> problem_sizes(problems.size());
  int64_t tiles = 0;
  for (int i = 0; i < count; ++i) {
    const GemmProblem& p = problems[size_t(i)];
    if (p.m <= 0 || p.n <= 0 || p.k <= 0) throw std::invalid_argument("m1 fused_moe: empty grouped GEMM problem");
    problem_sizes.at(size_t(i)) = cutlass::gemm::GemmCoord(p.m, p.n, p.k);
    auto* a = const_cast<ElementA*>(static_cast<const ElementA*>(p.a));
    auto* b = const_cast<ElementB*>(static_cast<const ElementB*>(p.b));
    auto* d = static_cast<ElementC*>(p.d);
    std::memcpy(at(layout.ptr_a) + 8 * i, &a, 8);
    std::memcpy(at(layout.ptr_b) + 8 * i, &b, 8);
    std::memcpy(at(layout.ptr_c) + 8 * i, &d, 8);  // C is unread (beta = 0)
    std::memcpy(at(layout.ptr_d) + 8 * i, &d, 8);
    std::memcpy(at(layout.lda) + 8 * i, &p.lda, 8);
    std::memcpy(at(layout.ldb) + 8 * i, &p.ldb, 8);
    std::memcpy(at(layout.ldc) + 8 * i, &p.ldd, 8);
    std::memcpy(at(layout.ldd) + 8 * i, &p.ldd, 8);
    tiles += int64_t((p.m + Shape::kM - 1) / Shape::kM) * int64_t((p.n + Shape::kN - 1) / Shape::kN);
  }
  std::memcpy(at(layout.sizes), problem_sizes.data(), sizeof(cutlass::gemm::GemmCoord) * size_t(count));
  // From pageable memory: the copy is staged before cudaMemcpyAsync returns,
  // so `host` may go out of scope; the kernel below reads it in stream order.
  check_cuda(cudaMemcpyAsync(args_dev, host.data(), layout.bytes, cudaMemcpyHostToDevice, stream),
             "copying grouped GEMM arguments");

  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
  const int per_sm = Gemm::maximum_active_blocks();
  if (per_sm <= 0) throw std::runtime_error("m1 fused_moe: grouped GEMM kernel cannot be resident (shared memory?)");
  const int blocks = int(std::min<int64_t>(tiles, int64_t(sms) * per_sm));

  auto* dev = static_cast<uint8_t*>(args_dev);
  typename Gemm::Arguments args(
      reinterpret_cast<cutlass::gemm::GemmCoord*>(dev + layout.sizes), count, blocks,
      typename Gemm::EpilogueOutputOp::Params(1.0f, 0.0f), reinterpret_cast<ElementA**>(dev + layout.ptr_a),
      reinterpret_cast<ElementB**>(dev + layout.ptr_b), reinterpret_cast<ElementC**>(dev + layout.ptr_c),
      reinterpret_cast<ElementC**>(dev + layout.ptr_d), reinterpret_cast<int64_t*>(dev + layout.lda),
      reinterpret_cast<int64_t*>(dev + layout.ldb), reinterpret_cast<int64_t*>(dev + layout.ldc),
      reinterpret_cast<int64_t*>(dev + layout.ldd), problem_sizes.data());
  Gemm gemm;
  check_cutlass(gemm.initialize(args, nullptr, stream), "initialize");
  check_cutlass(gemm.run(stream), "launch");
}

// Runs `problems` with the tensor-op kernel of `layout` and output type (bf16, fp16).
template <typename Element>
void run_tensor_op(GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems, void* args,
                   cudaStream_t stream) {
  // The MoE path uses: kRowCol -> input dtype (h) and float (ys); kRowRow ->
  // float (dA, dxs); kColRow -> input dtype (weight gradients). Only those
  // four kernels are instantiated.
  switch (layout) {
    case GemmLayout::kRowCol:
      if (out_float) {
        run_grouped<TensorOpGrouped<Element, RowMajor, ColumnMajor, float>>(problems, args, stream);
      } else {
        run_grouped<TensorOpGrouped<Element, RowMajor, ColumnMajor, Element>>(problems, args, stream);
      }
      break;
    case GemmLayout::kRowRow:
      if (!out_float) throw std::invalid_argument("m1 fused_moe: kRowRow grouped GEMM has a float32 output only");
      run_grouped<TensorOpGrouped<Element, RowMajor, RowMajor, float>>(problems, args, stream);
      break;
    case GemmLayout::kColRow:
      if (out_float) throw std::invalid_argument("m1 fused_moe: kColRow grouped GEMM has an input-dtype output only");
      run_grouped<TensorOpGrouped<Element, ColumnMajor, RowMajor, Element>>(problems, args, stream);
      break;
  }
}

// float32: every GEMM has a float32 output; one SIMT kernel per layout.
inline void run_simt_fp32(GemmLayout layout, const std::vector<GemmProblem>& problems, void* args,
                          cudaStream_t stream) {
  switch (layout) {
    case GemmLayout::kRowCol:
      run_grouped<SimtFp32Grouped<RowMajor, ColumnMajor>>(problems, args, stream);
      break;
    case GemmLayout::kRowRow:
      run_grouped<SimtFp32Grouped<RowMajor, RowMajor>>(problems, args, stream);
      break;
    case GemmLayout::kColRow:
      run_grouped<SimtFp32Grouped<ColumnMajor, RowMajor>>(problems, args, stream);
      break;
  }
}

}  // namespace m1::moe::gemm_detail
