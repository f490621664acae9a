// CPU kernels of the GAN hinge loss (schemas in fastinv/ops/hinge_loss.py).
//
//   hinge_loss_d(d_real, d_fake) = mean(relu(1 - d_real)) + mean(relu(1 + d_fake))
//   hinge_loss_g(d_fake)         = -mean(d_fake)
//
// Forward: one pass over each input. The data is cut into chunks of a fixed size (not one per
// thread), each chunk summed with 16 independent accumulators (vectorised by the compiler),
// and the chunk sums added in chunk order: the result does not depend on the thread count.
// Backward: one fused elementwise pass writing both gradients. The loops themselves are in
// cpu/loops_impl.h, compiled per instruction set and chosen at runtime (cpu/capability.cpp).
#include <ATen/ATen.h>  // host-only: the whole of ATen (the .cu files include only what they use)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/AccumulateType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "cpu/dispatch.h"
#include "hinge_loss.h"

namespace fastinv {
namespace {

constexpr int64_t kChunk = 1 << 15;

// sum over x of relu(1 + sign * x) (HINGE) or of x (linear): each chunk summed by the chosen
// table's loop (16 lanes, cpu/loops_impl.h), the chunk sums added in chunk order.
template <typename scalar_t, typename acc_t, bool HINGE>
double chunked_sum(const scalar_t* x, int64_t n, acc_t sign) {
  const auto sum = cpu::loops_for<scalar_t>().hinge.sum[HINGE];
  const auto* rx = cpu::raw(x);
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(nchunks, 0.0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
      partial[c] = sum(rx + begin, end - begin, sign);
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;  // fixed order: deterministic
  return total;
}

at::Tensor hinge_loss_d_cpu(const at::Tensor& d_real, const at::Tensor& d_fake) {
  hinge::check_forward_d(d_real, d_fake);
  const at::Tensor r = d_real.contiguous();
  const at::Tensor f = d_fake.contiguous();
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "hinge_loss_d_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for half/bf16/float
    const double sr = chunked_sum<scalar_t, acc_t, true>(r.const_data_ptr<scalar_t>(), r.numel(), acc_t(-1));
    const double sf = chunked_sum<scalar_t, acc_t, true>(f.const_data_ptr<scalar_t>(), f.numel(), acc_t(1));
    value = sr / static_cast<double>(r.numel()) + sf / static_cast<double>(f.numel());
  });
  return at::scalar_tensor(value, r.options().dtype(acc_dtype(r.scalar_type())));
}

at::Tensor hinge_loss_g_cpu(const at::Tensor& d_fake) {
  hinge::check_forward_g(d_fake);
  const at::Tensor f = d_fake.contiguous();
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "hinge_loss_g_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    value = -chunked_sum<scalar_t, acc_t, false>(f.const_data_ptr<scalar_t>(), f.numel(), acc_t(1)) /
            static_cast<double>(f.numel());
  });
  return at::scalar_tensor(value, f.options().dtype(acc_dtype(f.scalar_type())));
}

// d/d d_real = -grad / N_r where 1 - d_real > 0 (threshold_backward semantics: NaN passes),
// d/d d_fake = +grad / N_f where 1 + d_fake > 0.
std::tuple<at::Tensor, at::Tensor> hinge_loss_d_backward_cpu(const at::Tensor& grad,
                                                             const at::Tensor& d_real,
                                                             const at::Tensor& d_fake) {
  hinge::check_backward_d(grad, d_real, d_fake);
  const at::Tensor r = d_real.contiguous();
  const at::Tensor f = d_fake.contiguous();
  at::Tensor gr = at::empty_like(r);
  at::Tensor gf = at::empty_like(f);
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "hinge_loss_d_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const acc_t scale_r = static_cast<acc_t>(-g / static_cast<double>(r.numel()));
    const acc_t scale_f = static_cast<acc_t>(g / static_cast<double>(f.numel()));
    const int64_t nr = r.numel();
    const int64_t n = nr + f.numel();
    const auto grad_of = cpu::loops_for<scalar_t>().hinge.grad;
    const auto* pr = cpu::raw(r.const_data_ptr<scalar_t>());
    const auto* pf = cpu::raw(f.const_data_ptr<scalar_t>());
    auto* qr = cpu::raw(gr.mutable_data_ptr<scalar_t>());
    auto* qf = cpu::raw(gf.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, n, kChunk, [&](int64_t b, int64_t e) {
      // One index space over both tensors, so a small d_real and a large d_fake share threads.
      const int64_t r_end = std::min(e, nr);
      if (b < r_end) grad_of(pr + b, qr + b, r_end - b, acc_t(-1), scale_r);  // 1 - d_real
      const int64_t f_begin = std::max(b, nr);
      if (f_begin < e) grad_of(pf + (f_begin - nr), qf + (f_begin - nr), e - f_begin, acc_t(1), scale_f);
    });
  });
  return {gr.view(d_real.sizes()), gf.view(d_fake.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CPU, m) {
  m.impl("hinge_loss_d", &hinge_loss_d_cpu);
  m.impl("hinge_loss_g", &hinge_loss_g_cpu);
  m.impl("hinge_loss_d_backward", &hinge_loss_d_backward_cpu);
}

}  // namespace fastinv
