// Every m1 op schema, in one place (TORCH_LIBRARY(m1, m)). Implementations
// register beside their kernels: TORCH_LIBRARY_IMPL(m1, CPU, m) in the CPU
// glue, TORCH_LIBRARY_IMPL(m1, CUDA, m) in the CUDA glue, so an op whose CUDA
// kernel was not built has no CUDA impl and the dispatcher says so.
// Fake (meta) impls and autograd are registered in Python (m1ops/<family>.py).
//
// Importing m1ops._C loads this library, which runs the static registrations;
// the module itself is empty (no pybind).
#include <Python.h>
#include <torch/library.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "m1 kernels; ops live in torch.ops.m1", -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(m1, m) {
  // Lightning attention, one decode step (DESIGN 3.1): state <- exp(-slope) * state + k^T v,
  // returns scale * q @ state. q, k: [B, H, K]; v: [B, H, V]; slope: [H] float32;
  // state: [B, H, K, V] float32, updated in place; returns o: [B, H, V] in v's dtype.
  m.def("lightning_attn_decode(Tensor q, Tensor k, Tensor v, Tensor slope, Tensor(a!) state, *, float scale=1.0) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // Lightning attention prefill, blockwise (DESIGN 3.1); m1ops.lightning_attn wraps it with autograd.
  // q, k: [B, T, H, K]; v: [B, T, H, V]; slope: [H] float32; initial_state: [N, H, K, V]; cu_seqlens:
  // [N + 1] offsets of packed sequences (B == 1), else N = B. Returns o: [B, T, H, V] in v's dtype and
  // final_state: [N, H, K, V] float32 (float64 for float64 inputs). block_size=None: the device's default.
  m.def("_lightning_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor slope, Tensor? initial_state=None, "
        "Tensor? cu_seqlens=None, *, float scale=1.0, int? block_size=None) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Its backward: gradients (dq, dk, dv, d_initial_state) from grad_o: [B, T, H, V] and grad_final_state:
  // [N, H, K, V] (None = zeros); the forward is recomputed block by block, nothing is saved.
  m.def("_lightning_attn_bwd(Tensor grad_o, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v, Tensor slope, "
        "Tensor? initial_state=None, Tensor? cu_seqlens=None, *, float scale=1.0, int? block_size=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Fused MoE forward (DESIGN 3.2): y_t = sum_j w_tj W_down[e] (silu(W_gate[e] x_t) * (W_up[e] x_t)),
  // e = topk_ids[t, j]. x: [T, D]; w_gate_up: [E, 2F, D] (gate rows, then up rows); w_down: [E, D, F];
  // topk_weights: [T, k] float32; topk_ids: [T, k] int32/int64 in [0, E). Returns (y [T, D] in x's
  // dtype, gate_up): gate_up holds the [T * k, 2F] pre-activations in expert-sorted order for the
  // backward when save_gate_up, else it is empty ([0, 2F]).
  m.def("fused_moe(Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, Tensor topk_ids, *, "
        "bool save_gate_up=False) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // Fused MoE backward: given grad_y [T, D] and fused_moe's inputs, returns (grad_x, grad_w_gate_up,
  // grad_w_down, grad_topk_weights). gate_up: fused_moe's saved pre-activations, or None to recompute.
  m.def("fused_moe_backward(Tensor grad_y, Tensor x, Tensor w_gate_up, Tensor w_down, Tensor topk_weights, "
        "Tensor topk_ids, Tensor? gate_up) -> (Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // FP32 logits head (DESIGN 3.3). z = hidden @ weight^T / temperature in IEEE fp32 whatever the
  // input dtype, in tiles ([N, V] never exists). hidden: [N, D]; weight: [V, D]; targets: [N] int64.
  // Returns per row: logprob = z[t] - logsumexp(z), entropy = -sum p log p, lse = logsumexp(z),
  // float32 [N] (float64 for float64 inputs); rows with targets == ignore_index give logprob =
  // entropy = 0.
  m.def("fp32_logprobs(Tensor hidden, Tensor weight, Tensor targets, *, float temperature=1.0, "
        "int ignore_index=-100) -> (Tensor logprobs, Tensor entropy, Tensor lse)",
        {at::Tag::pt2_compliant_tag});
  // Backward of fp32_logprobs (recomputes z in tiles): gradients of hidden and weight given the
  // upstream gradients of its three outputs (absent ones are zero) and its saved entropy and lse.
  // A gradient not asked for (grad_hidden / grad_weight False) is returned as an empty [0] tensor.
  m.def("_fp32_logprobs_backward(Tensor? grad_logprobs, Tensor? grad_entropy, Tensor? grad_lse, "
        "Tensor hidden, Tensor weight, Tensor targets, Tensor entropy, Tensor lse, *, float temperature=1.0, "
        "int ignore_index=-100, bool grad_hidden=True, bool grad_weight=True) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // hidden @ weight^T in IEEE fp32 whatever the input dtype: [N, V] float32 (float64 for float64 inputs).
  m.def("fp32_logits(Tensor hidden, Tensor weight) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Backward of fp32_logits: (grad_logits @ weight, grad_logits^T @ hidden) in fp32, in the inputs' dtypes.
  m.def("_fp32_logits_backward(Tensor grad_logits, Tensor hidden, Tensor weight, *, bool grad_hidden=True, "
        "bool grad_weight=True) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // RMSNorm (DESIGN 5) in one pass per row: y = x / sqrt(mean(x^2) + eps) in fp32, rounded to x's
  // dtype, times weight; x: [..., D]; weight: [D] in x's dtype (or float32 for 16-bit x, then the
  // result is float32). CPU only; m1ops.rms_norm wraps it with autograd.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", {at::Tag::pt2_compliant_tag});
}
