// Grouped GEMMs of fused MoE for float32 inputs (see moe_grouped_gemm.cuh):
// SIMT fp32 kernels, exact fp32 products (no TF32), one per operand layout;
// plus the dtype dispatch of grouped_gemm.
#include <stdexcept>

#include "moe/moe_grouped_gemm.cuh"

namespace m1::moe {

void grouped_gemm_fp32(GemmLayout layout, const std::vector<GemmProblem>& problems, void* args,
                       cudaStream_t stream) {
  gemm_detail::run_simt_fp32(layout, problems, args, stream);
}

size_t grouped_gemm_args_bytes(int count) { return gemm_detail::ArgsLayout(count).bytes; }

void grouped_gemm(DType dtype, GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems,
                  void* args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kBFloat16: grouped_gemm_bf16(layout, out_float, problems, args, stream); break;
    case DType::kFloat16: grouped_gemm_fp16(layout, out_float, problems, args, stream); break;
    case DType::kFloat32: grouped_gemm_fp32(layout, problems, args, stream); break;
    default: throw std::invalid_argument("m1 fused_moe: no CUDA grouped GEMM for this dtype");
  }
}

}  // namespace m1::moe
