// Grouped GEMMs of fused MoE for fp16 inputs (see moe_grouped_gemm.cuh): the
// four CUTLASS kernels the forward and backward use, compiled in their own
// translation unit so that the dtypes build in parallel.
#include "moe/moe_grouped_gemm.cuh"

namespace m1::moe {

void grouped_gemm_fp16(GemmLayout layout, bool out_float, const std::vector<GemmProblem>& problems, void* args,
                       cudaStream_t stream) {
  gemm_detail::run_tensor_op<cutlass::half_t>(layout, out_float, problems, args, stream);
}

}  // namespace m1::moe
