// CUDA kernels of the GAN hinge loss (schemas in fastinv/ops/hinge_loss.py; CPU twin in
// csrc/cpu/hinge_loss.cpp).
//
// Forward: ONE launch reduces both d_real and d_fake. Blocks [0, blocks_a) read the first
// tensor, the rest the second; each block writes a partial sum, and the last block to finish
// (a ticket counter) adds the partials in block order and writes the loss. The grid depends
// only on the sizes, so the result is bitwise reproducible run to run.
// Backward: one elementwise launch over both tensors.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common.h"
#include "hinge_loss.h"

namespace fastinv {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerInput = 1024;

template <typename T>
__device__ __forceinline__ T relu_nan(T t) { return t < T(0) ? T(0) : t; }

template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums may be reused by a following call
  return v;  // valid in thread 0
}

struct Segment {
  const void* data;
  int64_t n;
  int blocks;
  float sign;    // relu(1 + sign * x) for the hinge, sign * x for the linear term
  double weight; // 1 / n (and the overall sign)
};

template <typename scalar_t, typename acc_t, bool HINGE>
__global__ void __launch_bounds__(kThreads)
two_segment_mean_kernel(Segment a, Segment b, acc_t* partials, unsigned int* ticket, acc_t* out) {
  const bool in_a = blockIdx.x < a.blocks;
  const Segment& s = in_a ? a : b;
  const int local_block = in_a ? blockIdx.x : blockIdx.x - a.blocks;
  const scalar_t* x = static_cast<const scalar_t*>(s.data);
  const acc_t sign = static_cast<acc_t>(s.sign);
  acc_t v = 0;
  const int64_t stride = static_cast<int64_t>(s.blocks) * kThreads;
  for (int64_t i = static_cast<int64_t>(local_block) * kThreads + threadIdx.x; i < s.n; i += stride) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    v += HINGE ? relu_nan<acc_t>(acc_t(1) + sign * xi) : sign * xi;
  }
  v = block_sum(v);

  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = v;
    __threadfence();  // make the partial visible before taking a ticket
    is_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // The last block: fixed assignment of partials to threads, so the order is fixed.
  acc_t sa = 0, sb = 0;
  // volatile: read the other blocks' partials from L2, never from a stale L1 line.
  const volatile acc_t* p = partials;
  for (int i = threadIdx.x; i < a.blocks; i += kThreads) sa += p[i];
  for (int i = threadIdx.x; i < b.blocks; i += kThreads) sb += p[a.blocks + i];
  sa = block_sum(sa);
  sb = block_sum(sb);
  if (threadIdx.x == 0) {
    *out = static_cast<acc_t>(static_cast<double>(sa) * a.weight + static_cast<double>(sb) * b.weight);
    *ticket = 0u;
  }
}

int blocks_for(int64_t n) {
  const int64_t b = (n + 4LL * kThreads - 1) / (4LL * kThreads);  // ~4 elements a thread at least
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, kMaxBlocksPerInput)));
}

template <bool HINGE>
at::Tensor two_segment_mean(const at::Tensor& a, float sign_a, double w_a, const at::Tensor* b,
                            float sign_b, double w_b) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b ? b->contiguous() : at::Tensor();
  const at::ScalarType out_t = acc_dtype(ac.scalar_type());
  at::Tensor out = at::empty({}, ac.options().dtype(out_t));
  Segment sa{ac.const_data_ptr(), ac.numel(), blocks_for(ac.numel()), sign_a, w_a};
  Segment sb{b ? bc.const_data_ptr() : nullptr, b ? bc.numel() : 0, b ? blocks_for(bc.numel()) : 0,
             sign_b, w_b};
  const int grid = sa.blocks + sb.blocks;
  at::Tensor partials = at::empty({grid}, ac.options().dtype(out_t));
  at::Tensor ticket = at::empty({1}, ac.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  // A memset, not a fill kernel: the forward stays one kernel launch.
  C10_CUDA_CHECK(cudaMemsetAsync(ticket.mutable_data_ptr<int>(), 0, sizeof(int), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ac.scalar_type(), "two_segment_mean", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    two_segment_mean_kernel<scalar_t, acc_t, HINGE><<<grid, kThreads, 0, stream>>>(
        sa, sb, partials.mutable_data_ptr<acc_t>(),
        reinterpret_cast<unsigned int*>(ticket.mutable_data_ptr<int>()), out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor hinge_loss_d_cuda(const at::Tensor& d_real, const at::Tensor& d_fake) {
  hinge::check_forward_d(d_real, d_fake);
  return two_segment_mean<true>(d_real, -1.f, 1.0 / d_real.numel(), &d_fake, 1.f,
                                1.0 / d_fake.numel());
}

at::Tensor hinge_loss_g_cuda(const at::Tensor& d_fake) {
  hinge::check_forward_g(d_fake);
  return two_segment_mean<false>(d_fake, 1.f, -1.0 / d_fake.numel(), nullptr, 0.f, 0.0);
}

template <typename scalar_t, typename acc_t>
__global__ void hinge_d_backward_kernel(const acc_t* grad, const scalar_t* r, int64_t nr,
                                        const scalar_t* f, int64_t nf, scalar_t* gr, scalar_t* gf) {
  const acc_t g = *grad;  // read on the device: no host sync for the upstream gradient
  const acc_t scale_r = -g / static_cast<acc_t>(nr);
  const acc_t scale_f = g / static_cast<acc_t>(nf);
  const int64_t n = nr + nf;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nr) {
      const acc_t t = acc_t(1) - static_cast<acc_t>(r[i]);
      gr[i] = static_cast<scalar_t>(t <= acc_t(0) ? acc_t(0) : scale_r);
    } else {
      const acc_t t = acc_t(1) + static_cast<acc_t>(f[i - nr]);
      gf[i - nr] = static_cast<scalar_t>(t <= acc_t(0) ? acc_t(0) : scale_f);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> hinge_loss_d_backward_cuda(const at::Tensor& grad,
                                                              const at::Tensor& d_real,
                                                              const at::Tensor& d_fake) {
  hinge::check_backward_d(grad, d_real, d_fake);
  const c10::cuda::CUDAGuard guard(d_real.device());
  const at::Tensor r = d_real.contiguous();
  const at::Tensor f = d_fake.contiguous();
  at::Tensor gr = at::empty_like(r);
  at::Tensor gf = at::empty_like(f);
  const int64_t n = r.numel() + f.numel();
  if (n == 0) return {gr, gf};  // as on the CPU; a grid of 0 blocks is a launch error
  const int grid = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "hinge_loss_d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const at::Tensor g = grad.to(r.device(), acc_dtype(r.scalar_type())).contiguous();
    hinge_d_backward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        g.const_data_ptr<acc_t>(), r.const_data_ptr<scalar_t>(), r.numel(), f.const_data_ptr<scalar_t>(),
        f.numel(), gr.mutable_data_ptr<scalar_t>(), gf.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gr, gf};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CUDA, m) {
  m.impl("hinge_loss_d", &hinge_loss_d_cuda);
  m.impl("hinge_loss_g", &hinge_loss_g_cuda);
  m.impl("hinge_loss_d_backward", &hinge_loss_d_backward_cuda);
}

}  // namespace fastinv
