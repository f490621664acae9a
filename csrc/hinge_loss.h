// Argument checks of the hinge loss ops, used by csrc/cpu/hinge_loss.cpp and
// csrc/cuda/hinge_loss.cu alike. They mirror _check_d, _check_g and _check_d_backward in
// fastinv/ops/hinge_loss.py, message for message and exception type for exception type.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common.h"

namespace fastinv {
namespace hinge {

constexpr const char* kOpD = "fastinv.hinge_loss_d";
constexpr const char* kOpG = "fastinv.hinge_loss_g";
constexpr const char* kOpDBackward = "fastinv.hinge_loss_d_backward";

// d_real and d_fake: floating, one dtype, one device (sizes may differ).
inline void check_pair(const at::Tensor& d_real, const at::Tensor& d_fake, const char* op) {
  check_floating(d_real, op, "d_real");
  check_floating(d_fake, op, "d_fake");
  check_same_dtype(d_real, d_fake, op, "d_real", "d_fake");
  check_same_device(d_real, d_fake, op, "d_real", "d_fake");
}

inline void check_forward_d(const at::Tensor& d_real, const at::Tensor& d_fake) {
  check_pair(d_real, d_fake, kOpD);
  check_nonempty(d_real, kOpD, "d_real");
  check_nonempty(d_fake, kOpD, "d_fake");
}

inline void check_forward_g(const at::Tensor& d_fake) {
  check_floating(d_fake, kOpG, "d_fake");
  check_nonempty(d_fake, kOpG, "d_fake");
}

// grad: the loss's upstream gradient, one value on any device (the CUDA kernel reads it on
// the device, the CPU kernel on the host). Empty d_real / d_fake give empty gradients on both
// devices (the forward never produces them, a direct call may).
inline void check_backward_d(const at::Tensor& grad, const at::Tensor& d_real, const at::Tensor& d_fake) {
  check_floating(grad, kOpDBackward, "grad");
  TORCH_CHECK_VALUE(grad.numel() == 1, kOpDBackward, ": grad must hold one value (the loss's gradient), got shape ",
                    grad.sizes());
  check_pair(d_real, d_fake, kOpDBackward);
}

}  // namespace hinge
}  // namespace fastinv
