// Torch glue of the fused-MoE ops on CUDA: validate, allocate outputs and the
// kernels' workspace on the inputs' device (through the caching allocator),
// launch on the current stream, turn a bad-id count into a ValueError.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <tuple>

#include "common/torch_utils.h"
#include "moe/moe_checks.h"

namespace m1::moe {
namespace {

constexpr const char* kForward = "m1.fused_moe";
constexpr const char* kBackward = "m1.fused_moe_backward";

// The tensor-core GEMMs move 16-byte rows: bf16/fp16 need D and F to be
// multiples of 8 and the tensors they read in place (the weights, saved
// pre-activations) 16-byte aligned. x and grad_y: any layout (the forward's
// fused gate/up kernel reads x in place when its rows are 16-byte vectors and
// gathers it first otherwise; see moe_cuda.cu).
void check_cuda_layout(const char* op, const MoeInputs& in, std::initializer_list<NamedTensor> read_in_place) {
  if (in.dtype == DType::kFloat32) return;
  TORCH_CHECK_VALUE(in.shape.dim % 8 == 0 && in.shape.ffn % 8 == 0, op,
                    ": on CUDA, bfloat16/float16 experts need D and F to be multiples of 8 (16-byte rows), got D = ",
                    in.shape.dim, ", F = ", in.shape.ffn);
  for (const NamedTensor& t : read_in_place) {
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.second->data_ptr()) % 16 == 0, op, ": on CUDA, '", t.first,
                      "' must start on a 16-byte boundary (a view at an odd offset? call .clone())");
  }
}

// Forward step 3 (moe_cuda.cu): M1_MOE_GATE_UP=fused takes the fused gate/up kernel wherever it
// supports the inputs, =unfused the CUTLASS grouped GEMM + elementwise pass; unset or =auto:
// unfused for bf16/fp16 on sm_90 and newer, fused otherwise. On an H100 the fused kernel (SM80 MMA
// atoms, 64 x 64 tiles) ran at 0.70-0.93x of the unfused path for T = 512..16384 (D = 1024,
// F = 1536, E = 32, k = 2; bench/bench_moe_cuda.py), and the CUDA MoE tests passed with this
// default there. float32 measured 0.73-0.78x too but keeps the fused kernel until its tests have run
// on the unfused path on a GPU; sm_80 is not measured. Read on every call, so that a process can switch.
bool cuda_fused_gate_up(const char* op, DType dtype, const at::Device& device) {
  const char* env = std::getenv("M1_MOE_GATE_UP");
  const std::string mode = env ? env : "auto";
  if (mode == "fused") return true;
  if (mode == "unfused") return false;
  TORCH_CHECK_VALUE(mode == "auto", op, ": M1_MOE_GATE_UP must be 'auto', 'fused' or 'unfused', got '", mode, "'");
  if (dtype == DType::kFloat32) return true;
  int major = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
  TORCH_CHECK(err == cudaSuccess, op, ": reading the compute capability: ", cudaGetErrorString(err));
  return major < 9;
}

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> fused_moe_cuda(const at::Tensor& x, const at::Tensor& w_gate_up,
                                                  const at::Tensor& w_down, const at::Tensor& topk_weights,
                                                  const at::Tensor& topk_ids, bool save_gate_up) {
  ForwardParams p;
  p.in = make_moe_inputs(kForward, x, w_gate_up, w_down, topk_weights, topk_ids);
  check_cuda_layout(kForward, p.in, {{"w_gate_up", &w_gate_up}, {"w_down", &w_down}});
  const c10::cuda::CUDAGuard guard(x.device());
  p.in.cuda_fused_gate_up = cuda_fused_gate_up(kForward, p.in.dtype, x.device());
  const MoeShape& s = p.in.shape;
  at::Tensor y = at::empty({s.tokens, s.dim}, x.options());
  at::Tensor gate_up = at::empty({save_gate_up ? s.slots() : 0, 2 * s.ffn}, x.options());
  p.y = y.data_ptr();
  p.gate_up = save_gate_up ? gate_up.data_ptr() : nullptr;
  at::Tensor ws = workspace(x, forward_cuda_workspace_bytes(p.in, save_gate_up));
  const int64_t bad = forward_cuda(p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream());
  if (bad != 0) throw_invalid_ids(kForward, bad, s.experts);
  return {y, gate_up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, const std::optional<at::Tensor>& gate_up) {
  BackwardParams p;
  p.in = make_moe_inputs(kBackward, x, w_gate_up, w_down, topk_weights, topk_ids);
  const at::Tensor grad_y_c = prepare_grad_y(kBackward, grad_y, x, p);
  check_gate_up(kBackward, gate_up, x, p.in.shape);
  check_cuda_layout(kBackward, p.in, {{"w_gate_up", &w_gate_up}, {"w_down", &w_down}});
  if (gate_up.has_value()) check_cuda_layout(kBackward, p.in, {{"gate_up", &*gate_up}});
  const c10::cuda::CUDAGuard guard(x.device());
  const MoeShape& s = p.in.shape;
  at::Tensor grad_x = at::empty({s.tokens, s.dim}, x.options());
  at::Tensor grad_w_gate_up = at::empty(w_gate_up.sizes(), w_gate_up.options());
  at::Tensor grad_w_down = at::empty(w_down.sizes(), w_down.options());
  at::Tensor grad_topk_weights = at::empty(topk_weights.sizes(), topk_weights.options());
  p.gate_up = gate_up.has_value() ? gate_up->data_ptr() : nullptr;
  p.grad_x = grad_x.data_ptr();
  p.grad_w_gate_up = grad_w_gate_up.data_ptr();
  p.grad_w_down = grad_w_down.data_ptr();
  p.grad_topk_weights = grad_topk_weights.data_ptr();
  at::Tensor ws = workspace(x, backward_cuda_workspace_bytes(s, p.in.dtype, gate_up.has_value()));
  const int64_t bad = backward_cuda(p, ws.data_ptr(), c10::cuda::getCurrentCUDAStream());
  if (bad != 0) throw_invalid_ids(kBackward, bad, s.experts);
  return {grad_x, grad_w_gate_up, grad_w_down, grad_topk_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CUDA, m) {
  m.impl("fused_moe", &fused_moe_cuda);
  m.impl("fused_moe_backward", &fused_moe_backward_cuda);
}

}  // namespace m1::moe
