// The normalise-and-affine and the fused ReLU of conditional batch norm, in one place for the
// CUDA kernels and every instruction set of the CPU loops. Torch-free (plain C++ and CUDA):
// csrc/cpu/loops_impl.h compiles it under AVX2/AVX-512 target pragmas, where no torch
// header may be included (an inline function of a torch header compiled there would clash with
// its baseline copy at link time). csrc/conditional_batch_norm.h adds the c10 dtype front end.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTINV_HOST_DEVICE __host__ __device__
#else
#define FASTINV_HOST_DEVICE
#endif

namespace fastinv {
namespace cbn {

// v = (x - mean) * scale + shift, scale = invstd * gain, shift = bias. The forward's apply and
// the backward's ReLU mask evaluate this one expression, so the mask sees the very value the
// forward stored. ((x - mean) first: folding mean into the shift loses digits for a large mean.)
template <typename A>
FASTINV_HOST_DEVICE inline A affine(A x, A mean, A scale, A shift) {
  return (x - mean) * scale + shift;
}

// relu=True forward: max(v, 0), NaN kept (as torch.relu).
template <typename A>
FASTINV_HOST_DEVICE inline A relu_of(A v) {
  return v < A(0) ? A(0) : v;
}

// relu=True backward: dy passes where the *stored* output y (v rounded to the 16-bit dtype) is
// > 0, as torch's ReLU backward (threshold_backward(dy, y, 0)) and the reference. A tiny positive
// v rounds to 0 in fp16/bf16 (round to nearest even: v <= half the smallest subnormal becomes
// 0), so v is compared with that largest value that rounds to 0 instead of converting (keeps the
// CPU loops vectorised). NaN never passes. For fp32/fp64 y is v: relu_passes_exact.
template <typename A>
FASTINV_HOST_DEVICE inline bool relu_passes_fp16(A v) {
  return v > A(0x1p-25f);  // smallest fp16 subnormal 2^-24
}

template <typename A>
FASTINV_HOST_DEVICE inline bool relu_passes_bf16(A v) {
  return v > A(0x1p-134f);  // smallest bf16 subnormal 2^-133
}

template <typename A>
FASTINV_HOST_DEVICE inline bool relu_passes_exact(A v) {
  return v > A(0);
}

}  // namespace cbn
}  // namespace fastinv
