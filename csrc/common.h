// Shared helpers for fastinv kernels: argument checks with messages a user can act on.
// Each raises the Python exception type that fastinv/ops/_validate.py raises for the same
// input (TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError), so a caller sees one
// type whichever backend serves the op. The per-op checks are in csrc/<op>.h.
//
// Headers here and in csrc/cuda include only what they use (ATen/core/Tensor.h, not
// ATen/ATen.h): nvcc parses a .cu file once per GPU target (five with the default
// "8.0;9.0;10.0;12.0+PTX") plus once for the host, so every header a .cu file pulls in costs
// six times. Measured on csrc/cuda/hinge_loss.cu: 57 s -> 37 s of compile phases (nvcc --time).
// The CPU files, compiled once, include ATen/ATen.h themselves.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastinv {

// Floating inputs only: fp32, fp64, fp16, bf16.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
              op, ": ", name, " must be a floating tensor (float32, float64, float16 or "
              "bfloat16), got ", t.scalar_type());
}

inline void check_nonempty(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.numel() > 0, op, ": ", name, " is empty; the mean of an empty tensor is undefined");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": ", name_a, " is on ", a.device(), " but ", name_b,
              " is on ", b.device(), "; move both to the same device");
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " is ", a.scalar_type(),
              " but ", name_b, " is ", b.scalar_type(), "; cast them to one dtype");
}

// THE precision rule of every op (the one C++ statement of it; fastinv/ops/_validate.py
// acc_dtype is the Python one): float64 stays float64, float32 / bfloat16 / float16 accumulate
// in float32. Losses, batch statistics, u, v and σ are returned in this dtype, so a bf16
// model never rounds its loss or its statistics to 8 bits of mantissa.
inline at::ScalarType acc_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastinv
