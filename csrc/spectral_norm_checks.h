// Argument checks of the spectral norm op, shared by csrc/cpu/spectral_norm.cpp and
// csrc/cuda/spectral_norm.cu (the Python reference in fastinv/ops/spectral_norm.py checks the
// same things with the same messages).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastinv {

// u, v and σ: float64 for float64 weights, float32 otherwise.
inline at::ScalarType spectral_norm_acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_spectral_norm_inputs(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter,
                                       double eps) {
  constexpr const char* kOp = "fastinv.spectral_norm";
  TORCH_CHECK(weights.size() == us.size() && us.size() == vs.size(), kOp, ": got ", weights.size(),
              " weights, ", us.size(), " u vectors and ", vs.size(), " v vectors; pass one u and one v per weight");
  TORCH_CHECK(n_iter >= 0, kOp, ": n_power_iterations must be >= 0 (0 = eval), got ", n_iter);
  TORCH_CHECK(eps > 0, kOp, ": eps must be > 0, got ", eps);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), kOp, ": weights[", i,
                "] must be a floating tensor (float32, float64, float16 or bfloat16), got ", w.scalar_type());
    TORCH_CHECK(w.dim() >= 2 && w.numel() > 0, kOp, ": weights[", i, "] has shape ", w.sizes(),
                "; spectral norm needs a non-empty tensor with at least 2 dims");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(), kOp,
                ": weights[", i, "] is ", w.scalar_type(), " on ", w.device(), " but weights[0] is ",
                weights[0].scalar_type(), " on ", weights[0].device(),
                "; one call takes weights of one dtype and device (group them)");
    const int64_t rows = w.size(0), cols = w.numel() / rows;
    const at::ScalarType acc = spectral_norm_acc_type(w.scalar_type());
    const at::Tensor* vecs[2] = {&us[i], &vs[i]};
    const int64_t lens[2] = {rows, cols};
    const char* names[2] = {"us", "vs"};
    for (int j = 0; j < 2; ++j) {
      const at::Tensor& t = *vecs[j];
      TORCH_CHECK(t.dim() == 1 && t.numel() == lens[j], kOp, ": ", names[j], "[", i, "] has shape ", t.sizes(),
                  " but weights[", i, "] of shape ", w.sizes(), " is a ", rows, "x", cols,
                  " matrix; pass a 1-d vector of ", lens[j], " elements");
      TORCH_CHECK(t.scalar_type() == acc && t.device() == w.device(), kOp, ": ", names[j], "[", i, "] is ",
                  t.scalar_type(), " on ", t.device(), "; for ", w.scalar_type(), " weights on ", w.device(),
                  " it must be ", acc, " on ", w.device());
    }
  }
}

}  // namespace fastinv
