// Argument checks and the layout rule of conditional batch norm, shared by the CPU and CUDA
// kernels (csrc/cpu/conditional_batch_norm.cpp, csrc/cuda/conditional_batch_norm.cu). They
// mirror _check_* and _layout in fastinv/ops/conditional_batch_norm.py, message for message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

#include "cbn_math.h"
#include "common.h"

namespace fastinv {
namespace cbn {

constexpr const char* kOp = "fastinv.conditional_batch_norm";

// ---- argument checks (mirror _check_* in the Python op file) -------------------------------

inline void check_x(const at::Tensor& x) {
  check_floating(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, kOp, ": x is empty (shape ", x.sizes(),
                    "); batch norm needs values");
}

inline void check_nc(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_floating(t, kOp, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), kOp, ": ",
                    name, " must have shape (N, C) = (", x.size(0), ", ", x.size(1),
                    ") to match x of shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": x is ", x.scalar_type(), " but ",
                   name, " is ", t.scalar_type(), "; cast them to one dtype");
  check_same_device(x, t, kOp, "x", name);
}

inline void check_c(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_floating(t, kOp, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), kOp, ": ", name,
                    " must have shape (C,) = (", x.size(1), ",) to match x of shape ", x.sizes(),
                    ", got ", t.sizes());
  check_same_device(x, t, kOp, "x", name);
}

inline void check_forward(const at::Tensor& x, const at::Tensor& gain, const at::Tensor& bias,
                   const std::optional<at::Tensor>& rm, const std::optional<at::Tensor>& rv,
                   bool training) {
  check_x(x);
  check_nc(gain, x, "gain");
  check_nc(bias, x, "bias");
  TORCH_CHECK_VALUE(rm.has_value() == rv.has_value(), kOp,
                    ": pass both running_mean and running_var, or neither");
  if (rm.has_value()) {
    check_c(*rm, x, "running_mean");
    check_c(*rv, x, "running_var");
  }
  if (training) {
    TORCH_CHECK_VALUE(x.numel() / x.size(1) > 1, kOp,
                      ": Expected more than 1 value per channel when training, got input size ",
                      x.sizes(), "; use a batch of at least 2 (or H*W > 1), or eval mode");
  } else {
    TORCH_CHECK_VALUE(rm.has_value(), kOp,
                      ": eval mode (training=False) normalises with running_mean and running_var; "
                      "pass them, or use training=True for batch statistics");
  }
}

// ---- the fused ReLU's mask for each dtype (the math: cbn_math.h, shared with the CPU loops) ---

// relu=True backward: dy passes where the stored output (v rounded to T) is > 0; see cbn_math.h.
template <typename T, typename A>
C10_HOST_DEVICE inline bool relu_passes(A v) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    return relu_passes_fp16(v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return relu_passes_bf16(v);
  } else {
    return relu_passes_exact(v);  // T == A: y is v
  }
}

// ---- layout ---------------------------------------------------------------------------------

// Same rule as _layout() in Python: channels_last when x is that and not also contiguous.
inline bool is_nhwc(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_nhwc(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

struct Dims {
  int64_t N, C, HW;
};

inline Dims dims(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

// grad_y: x's shape and device, any floating dtype and any layout (it is brought to x's).
inline void check_grad(const at::Tensor& grad_y, const at::Tensor& x) {
  check_floating(grad_y, kOp, "grad_y");
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), kOp, ": grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x.sizes());
  check_same_device(x, grad_y, kOp, "x", "grad_y");
}

// The argument list of each op, checked the same way by the CPU and the CUDA kernel (and by
// the references in Python). mean / invstd are the statistics the forward returned: (C,), any
// floating dtype (they are brought to the accumulation dtype), on x's device.
inline void check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gain,
                           const at::Tensor& mean, const at::Tensor& invstd) {
  check_x(x);
  check_nc(gain, x, "gain");
  check_grad(grad_y, x);
  check_c(mean, x, "mean");
  check_c(invstd, x, "invstd");
}

// relu=True: the backward recomputes the forward's output from x, the statistics, gain and
// bias, so it needs bias ((N, C), x's dtype).
inline void check_backward_relu(const at::Tensor& x, bool relu, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(!relu || bias.has_value(), kOp,
                    ": relu=True masks grad_y where the forward's output is > 0, recomputed from x "
                    "and the statistics, and needs the forward's bias; pass bias");
  if (bias.has_value()) check_nc(*bias, x, "bias");
}

inline void check_apply(const at::Tensor& x, const at::Tensor& gain, const at::Tensor& bias,
                        const at::Tensor& mean, const at::Tensor& invstd) {
  check_x(x);
  check_nc(gain, x, "gain");
  check_nc(bias, x, "bias");
  check_c(mean, x, "mean");
  check_c(invstd, x, "invstd");
}

inline void check_backward_reduce(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& invstd) {
  check_x(x);
  check_grad(grad_y, x);
  check_c(mean, x, "mean");
  check_c(invstd, x, "invstd");
}

inline void check_backward_elemt(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& gain,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 const at::Tensor& sum_dxhat, const at::Tensor& sum_dxhat_xhat,
                                 int64_t count) {
  check_x(x);
  check_nc(gain, x, "gain");
  check_grad(grad_y, x);
  check_c(mean, x, "mean");
  check_c(invstd, x, "invstd");
  check_c(sum_dxhat, x, "sum_dxhat");
  check_c(sum_dxhat_xhat, x, "sum_dxhat_xhat");
  TORCH_CHECK_VALUE(count > 0, kOp, ": count must be positive, got ", count);
}

// The running-statistics update: four 1-d tensors of C values on one device, any floating
// dtypes and strides (both devices write through strided or mixed-dtype buffers alike).
inline void check_update_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  TORCH_CHECK_VALUE(count > 1, kOp, ": the running variance needs count > 1, got ", count);
  const at::Tensor* ts[4] = {&running_mean, &running_var, &mean, &var};
  const char* names[4] = {"running_mean", "running_var", "mean", "var"};
  for (int i = 0; i < 4; ++i) {
    check_floating(*ts[i], kOp, names[i]);
    TORCH_CHECK_VALUE(ts[i]->dim() == 1 && ts[i]->numel() == mean.numel(), kOp, ": ", names[i], " has shape ",
                      ts[i]->sizes(), " but the batch statistics have ", mean.numel(),
                      " channels; pass 1-d running statistics of one value per channel");
    check_same_device(running_mean, *ts[i], kOp, "running_mean", names[i]);
  }
}

// The update in at:: ops, in the statistics' precision: exactly the reference's arithmetic.
// The CPU kernel; the CUDA kernel's fallback for strided or mixed-dtype buffers.
inline void update_running_with_aten(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                     const at::Tensor& var, int64_t count, double momentum) {
  // r * (1 - momentum) + s * momentum, as methods (the operators need all of ATen's headers)
  const at::Tensor unbiased = var.mul(static_cast<double>(count) / static_cast<double>(count - 1));
  running_mean.copy_(running_mean.to(mean.scalar_type()).mul(1 - momentum).add(mean.mul(momentum)));
  running_var.copy_(running_var.to(var.scalar_type()).mul(1 - momentum).add(unbiased.mul(momentum)));
}

}  // namespace cbn
}  // namespace fastinv
