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
}
