// Argument checks of the spectral norm ops, used by csrc/cpu/spectral_norm.cpp and
// csrc/cuda/spectral_norm.cu alike. They mirror _check and _check_backward in
// fastinv/ops/spectral_norm.py, message for message and exception type for exception type
// (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"  // acc_dtype: u, v and σ are float64 for float64 weights, float32 otherwise

namespace fastinv {

namespace sn {

constexpr const char* kOp = "fastinv.spectral_norm";
constexpr const char* kOpBackward = "fastinv.spectral_norm_backward";

// Each weight (floating, >= 2 dims, non-empty, one dtype and device for all) with its u (rows)
// and v (cols): 1-d, the accumulation dtype, on the weight's device.
inline void check_weights(at::TensorList weights, at::TensorList us, at::TensorList vs, const char* op) {
  TORCH_CHECK_VALUE(weights.size() == us.size() && us.size() == vs.size(), op, ": got ", weights.size(),
                    " weights, ", us.size(), " u vectors and ", vs.size(),
                    " v vectors; pass one u and one v per weight");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()), op, ": weights[", i,
                     "] must be a floating tensor (float32, float64, float16 or bfloat16), got ", w.scalar_type());
    TORCH_CHECK_VALUE(w.dim() >= 2 && w.numel() > 0, op, ": weights[", i, "] has shape ", w.sizes(),
                      "; spectral norm needs a non-empty tensor with at least 2 dims");
    TORCH_CHECK_TYPE(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(), op,
                     ": weights[", i, "] is ", w.scalar_type(), " on ", w.device(), " but weights[0] is ",
                     weights[0].scalar_type(), " on ", weights[0].device(),
                     "; one call takes weights of one dtype and device (group them)");
    const int64_t rows = w.size(0), cols = w.numel() / rows;
    const at::ScalarType acc = acc_dtype(w.scalar_type());
    const at::Tensor* vecs[2] = {&us[i], &vs[i]};
    const int64_t lens[2] = {rows, cols};
    const char* names[2] = {"us", "vs"};
    for (int j = 0; j < 2; ++j) {
      const at::Tensor& t = *vecs[j];
      TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == lens[j], op, ": ", names[j], "[", i, "] has shape ",
                        t.sizes(), " but weights[", i, "] of shape ", w.sizes(), " is a ", rows, "x", cols,
                        " matrix; pass a 1-d vector of ", lens[j], " elements");
      TORCH_CHECK_TYPE(t.scalar_type() == acc && t.device() == w.device(), op, ": ", names[j], "[", i, "] is ",
                       t.scalar_type(), " on ", t.device(), "; for ", w.scalar_type(), " weights on ",
                       w.device(), " it must be ", acc, " on ", w.device());
    }
  }
}

inline void check_forward(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter,
                          double eps) {
  TORCH_CHECK_VALUE(weights.size() == us.size() && us.size() == vs.size(), kOp, ": got ", weights.size(),
                    " weights, ", us.size(), " u vectors and ", vs.size(),
                    " v vectors; pass one u and one v per weight");
  TORCH_CHECK_VALUE(n_iter >= 0, kOp, ": n_power_iterations must be >= 0 (0 = eval), got ", n_iter);
  TORCH_CHECK_VALUE(eps > 0, kOp, ": eps must be > 0, got ", eps);
  check_weights(weights, us, vs, kOp);
}

// The backward of one forward call: the forward's weights, u, v and σ (one per weight, the
// accumulation dtype, on the weights' device), and one gradient per weight with its numel.
inline void check_backward(at::TensorList grads, at::TensorList weights, at::TensorList us, at::TensorList vs,
                           const at::Tensor& sigma) {
  TORCH_CHECK_VALUE(grads.size() == weights.size(), kOpBackward, ": got ", grads.size(), " grads for ",
                    weights.size(), " weights; pass one gradient per weight");
  check_weights(weights, us, vs, kOpBackward);
  const int64_t K = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.numel() == K, kOpBackward, ": sigma has shape ", sigma.sizes(),
                    "; pass the forward's sigma, a 1-d tensor of one value per weight (", K, ")");
  if (K == 0) return;
  const at::Tensor& w0 = weights[0];
  const at::ScalarType acc = acc_dtype(w0.scalar_type());
  TORCH_CHECK_TYPE(sigma.scalar_type() == acc && sigma.device() == w0.device(), kOpBackward, ": sigma is ",
                   sigma.scalar_type(), " on ", sigma.device(), "; for ", w0.scalar_type(), " weights on ",
                   w0.device(), " it must be ", acc, " on ", w0.device());
  for (int64_t i = 0; i < K; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(at::isFloatingType(g.scalar_type()), kOpBackward, ": grads[", i,
                     "] must be a floating tensor, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.numel() == weights[i].numel(), kOpBackward, ": grads[", i, "] has shape ", g.sizes(),
                      " but weights[", i, "] has shape ", weights[i].sizes());
    TORCH_CHECK_VALUE(g.device() == w0.device(), kOpBackward, ": grads[", i, "] is on ", g.device(),
                      " but the weights are on ", w0.device(), "; move both to the same device");
  }
}

}  // namespace sn
}  // namespace fastinv
