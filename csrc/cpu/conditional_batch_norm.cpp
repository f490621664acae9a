// CPU kernels of conditional batch norm (schemas, reference and the math in
// fastinv/ops/conditional_batch_norm.py; CUDA twin in csrc/cuda/conditional_batch_norm.cu).
//
//   y = (x - mean[c]) * invstd[c] * gain[n,c] + bias[n,c]      (relu=True: max(y, 0))
//
// The fused ReLU (BigGAN applies one after every CBN) is a template flag of the elementwise
// and reduction loops. Its backward masks dy where y was not > 0, y's sign recomputed from x
// and the statistics: both backward passes read x anyway, so the mask costs a multiply-add
// per value and the O(N*C) gain/bias, where a saved y would add a whole tensor read to each of
// the two passes (5 -> 7 tensor-sized transfers) and keep y alive until the backward.
//
// Both layouts stream through memory in address order, in two passes: statistics (or the
// backward's two reductions), then the elementwise pass. NCHW works on the N*C contiguous
// runs of H*W values (parallel over runs, per-run partial sums merged per channel in sample
// order); NHWC on rows of C channels (per-sample partials merged in sample order).
//
// Why not channel by channel, keeping a channel's slab in cache between the two passes (as
// the issue suggested)? Measured on the 2-core dev box (N=32, C=128, 32x32 fp32, one
// thread): walking a channel's N strided runs costs 2.3-2.7 ms for the statistics alone,
// against 0.8 ms streaming the whole tensor in order, because every 4 KiB run starts the
// hardware prefetcher cold; software prefetch of the next run recovered only ~15%. Blocks of
// 8-32 channels bring the fused stats+normalise to 1.8-2.2 ms, no better than two streaming
// passes (1.8 ms), whose second read is served from L3 while x fits there (16 MiB here).
//
// Statistics: one pass of sums shifted by the channel's first value K, sum(x-K) and
// sum((x-K)^2), in acc_t vector lanes over chunks of at most 4096 values, the chunk sums
// added in double; then var = q/n - (s/n)^2. K is a sample of the channel, so |mean - K| is a few standard deviations
// and nothing cancels catastrophically (unlike E[x^2] - E[x]^2 around a large mean).
// Every reduction has a fixed order that depends only on the shape: results do not depend
// on the thread count.
//
// The loops over x live in cpu/loops_impl.h, compiled once per instruction set (baseline, AVX2,
// AVX-512) and chosen at runtime (cpu/capability.cpp); this file holds the checks, allocation,
// the split into parallel tasks and the O(C) set-up and merges.
#include <ATen/ATen.h>  // host-only: the whole of ATen (the .cu files include only what they use)
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "conditional_batch_norm.h"
#include "cpu/dispatch.h"

namespace fastinv {
namespace {

using namespace cbn;  // checks, layout rule, Dims

// ---- the passes: O(C) set-up and merges here, the loops over x in cpu/loops_impl.h --------------
//
// The loops come from the table the CPU and FASTINV_CPU_CAPABILITY chose (csrc/cpu/capability.cpp);
// each parallel task hands its range of runs, rows or samples to one of them.

// (mean, biased variance) from sums shifted by k over count values
inline std::pair<double, double> finish_stats(double k, double s, double q, int64_t count) {
  const double m = s / static_cast<double>(count);
  return {k + m, std::max(0.0, q / static_cast<double>(count) - m * m)};
}

// Runs per parallel task (NCHW): about 16K values, so small H*W does not make tiny tasks.
inline int64_t run_grain(Dims d) { return std::max<int64_t>(1, 16384 / d.HW); }

template <typename scalar_t>
cpu::CbnPass<cpu::raw_t<scalar_t>> pass_of(const scalar_t* x, Dims d) {
  cpu::CbnPass<cpu::raw_t<scalar_t>> p;
  p.N = d.N;
  p.C = d.C;
  p.HW = d.HW;
  p.x = cpu::raw(x);
  return p;
}

// Runs the loop over all items of its pass: NCHW runs; NHWC samples (stats, reduce) or rows.
template <typename Pass>
void run_pass(void (*loop)(const Pass&, int64_t, int64_t), const Pass& p, Dims d, bool nhwc, bool per_sample) {
  if (!nhwc) {
    at::parallel_for(0, d.N * d.C, run_grain(d), [&](int64_t b, int64_t e) { loop(p, b, e); });
  } else if (per_sample) {
    at::parallel_for(0, d.N, 1, [&](int64_t b, int64_t e) { loop(p, b, e); });
  } else {
    at::parallel_for(0, d.N * d.HW, 256, [&](int64_t b, int64_t e) { loop(p, b, e); });
  }
}

// Statistics: per-(n, c) shifted partial sums (shift K: the channel's first value, which is
// x[0, c] in either layout), merged per channel over samples in order.
template <typename scalar_t, typename acc_t>
void batch_stats(const scalar_t* x, Dims d, bool nhwc, acc_t* mean, acc_t* var) {
  std::vector<double> ps(d.N * d.C), pq(d.N * d.C);
  std::vector<acc_t> k(d.C);
  for (int64_t c = 0; c < d.C; ++c) k[c] = static_cast<acc_t>(x[nhwc ? c : c * d.HW]);
  auto p = pass_of(x, d);
  p.shift = k.data();
  p.s = ps.data();
  p.q = pq.data();
  run_pass(cpu::loops_for<scalar_t>().cbn.stats[nhwc], p, d, nhwc, /*per_sample=*/true);
  for (int64_t c = 0; c < d.C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      s += ps[n * d.C + c];
      q += pq[n * d.C + c];
    }
    const auto [m, v] = finish_stats(static_cast<double>(k[c]), s, q, d.N * d.HW);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(v);
  }
}

// y = (x - mean) * invstd * gain + bias, with the fused ReLU when relu.
template <typename scalar_t, typename acc_t>
void apply(const scalar_t* x, const scalar_t* gain, const scalar_t* bias, scalar_t* y, Dims d,
           bool nhwc, const acc_t* mean, const acc_t* invstd, bool relu) {
  auto p = pass_of(x, d);
  p.gain = cpu::raw(gain);
  p.bias = cpu::raw(bias);
  p.out = cpu::raw(y);
  p.mean = mean;
  p.invstd = invstd;
  run_pass(cpu::loops_for<scalar_t>().cbn.apply[nhwc][relu], p, d, nhwc, /*per_sample=*/false);
}

// gb[n,c] = sum_hw dy, gg[n,c] = invstd[c] * sum_hw dy (x - mean). relu_bias != nullptr: the
// fused ReLU's backward, dy masked where the forward's output (recomputed from x, mean, invstd,
// gain and this bias) was not > 0.
template <typename scalar_t, typename acc_t>
void reduce(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* relu_bias,
            Dims d, bool nhwc, const acc_t* mean, const acc_t* invstd, acc_t* gg, acc_t* gb) {
  auto p = pass_of(x, d);
  p.dy = cpu::raw(dy);
  p.gain = cpu::raw(gain);
  p.bias = cpu::raw(relu_bias);
  p.mean = mean;
  p.invstd = invstd;
  p.gg = gg;
  p.gb = gb;
  run_pass(cpu::loops_for<scalar_t>().cbn.reduce[nhwc][relu_bias != nullptr], p, d, nhwc, /*per_sample=*/true);
}

// grad_x = invstd*gain*dy - invstd*A/M - (x - mean)*invstd^2*B/M   (A = B = 0 in eval; dy
// masked by the forward's output when relu_bias != nullptr)
template <typename scalar_t, typename acc_t>
void elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* relu_bias,
           scalar_t* dx, Dims d, bool nhwc, const acc_t* mean, const acc_t* invstd, const double* A,
           const double* B, double M) {
  std::vector<acc_t> c0(d.C), c2(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    c0[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * A[c] / M);
    c2[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * invstd[c] * B[c] / M);
  }
  auto p = pass_of(x, d);
  p.dy = cpu::raw(dy);
  p.gain = cpu::raw(gain);
  p.bias = cpu::raw(relu_bias);
  p.out = cpu::raw(dx);
  p.mean = mean;
  p.invstd = invstd;
  p.c0 = c0.data();
  p.c2 = c2.data();
  run_pass(cpu::loops_for<scalar_t>().cbn.elemt[nhwc][relu_bias != nullptr], p, d, nhwc, /*per_sample=*/false);
}

at::Tensor per_channel(const at::Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().dtype(acc_dtype(x.scalar_type())));
}

// (C,) statistics as contiguous acc-dtype tensors
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x) {
  return t.to(acc_dtype(x.scalar_type())).contiguous();
}

#define CBN_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

// ---- ops ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbn_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_forward(x_in, gain_in, bias_in, running_mean, running_var, training);
  const at::MemoryFormat fmt = layout_of(x_in);
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const Dims d = dims(x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean = training ? per_channel(x, {d.C}) : as_acc(*running_mean, x).clone();
  at::Tensor var = training ? per_channel(x, {d.C}) : as_acc(*running_var, x).clone();
  at::Tensor invstd = per_channel(x, {d.C});
  CBN_DISPATCH(x, "cbn_forward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for half/bf16/float
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    acc_t* pm = mean.mutable_data_ptr<acc_t>();
    acc_t* pv = var.mutable_data_ptr<acc_t>();
    acc_t* pi = invstd.mutable_data_ptr<acc_t>();
    if (training) batch_stats<scalar_t, acc_t>(px, d, nhwc, pm, pv);
    for (int64_t c = 0; c < d.C; ++c) {
      pi[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(pv[c]) + eps));
    }
    apply<scalar_t, acc_t>(px, gain.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
                           y.mutable_data_ptr<scalar_t>(), d, nhwc, pm, pi, relu);
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& gain_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, bool training, bool relu,
    const std::optional<at::Tensor>& bias_in) {
  check_backward(grad_y, x_in, gain_in, mean_in, invstd_in);
  check_backward_relu(x_in, relu, bias_in);
  const at::MemoryFormat fmt = layout_of(x_in);
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor bias = relu ? bias_in->contiguous() : at::Tensor();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor gg = per_channel(x, {d.N, d.C}), gb = per_channel(x, {d.N, d.C});
  std::vector<double> A(d.C, 0.0), B(d.C, 0.0);
  CBN_DISPATCH(x, "cbn_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const acc_t* pm = mean.const_data_ptr<acc_t>();
    const acc_t* pi = invstd.const_data_ptr<acc_t>();
    acc_t* pgg = gg.mutable_data_ptr<acc_t>();
    acc_t* pgb = gb.mutable_data_ptr<acc_t>();
    const scalar_t* relu_bias = relu ? bias.const_data_ptr<scalar_t>() : nullptr;
    reduce<scalar_t, acc_t>(pdy, px, pg, relu_bias, d, nhwc, pm, pi, pgg, pgb);
    if (training) {  // A[c] = sum_n gain*grad_bias, B[c] = sum_n gain*grad_gain, in sample order
      for (int64_t n = 0; n < d.N; ++n) {
        for (int64_t c = 0; c < d.C; ++c) {
          const int64_t k = n * d.C + c;
          const double g = static_cast<double>(static_cast<acc_t>(pg[k]));
          A[c] += g * pgb[k];
          B[c] += g * pgg[k];
        }
      }
    }
    elemt<scalar_t, acc_t>(pdy, px, pg, relu_bias, dx.mutable_data_ptr<scalar_t>(), d, nhwc, pm, pi,
                           A.data(), B.data(), static_cast<double>(d.N * d.HW));
  });
  // the sums in acc precision, rounded to gain's dtype like the reference
  return {dx, gg.to(gain.scalar_type()), gb.to(gain.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> cbn_stats_cpu(const at::Tensor& x_in) {
  check_x(x_in);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const Dims d = dims(x);
  at::Tensor mean = per_channel(x, {d.C}), var = per_channel(x, {d.C});
  CBN_DISPATCH(x, "cbn_stats_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    batch_stats<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), d, fmt == at::MemoryFormat::ChannelsLast,
                                 mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
  });
  return {mean, var};
}

at::Tensor cbn_apply_cpu(const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
                         const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_apply(x_in, gain_in, bias_in, mean_in, invstd_in);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  CBN_DISPATCH(x, "cbn_apply_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    apply<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), gain.const_data_ptr<scalar_t>(),
                           bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), dims(x),
                           fmt == at::MemoryFormat::ChannelsLast, mean.const_data_ptr<acc_t>(),
                           invstd.const_data_ptr<acc_t>(), /*relu=*/false);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> cbn_backward_reduce_cpu(const at::Tensor& grad_y,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& mean_in,
                                                           const at::Tensor& invstd_in) {
  check_backward_reduce(grad_y, x_in, mean_in, invstd_in);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor gg = per_channel(x, {d.N, d.C}), gb = per_channel(x, {d.N, d.C});
  CBN_DISPATCH(x, "cbn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    reduce<scalar_t, acc_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr, nullptr, d,
                            fmt == at::MemoryFormat::ChannelsLast, mean.const_data_ptr<acc_t>(),
                            invstd.const_data_ptr<acc_t>(), gg.mutable_data_ptr<acc_t>(),
                            gb.mutable_data_ptr<acc_t>());
  });
  return {gg, gb};
}

at::Tensor cbn_backward_elemt_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                  const at::Tensor& gain_in, const at::Tensor& mean_in,
                                  const at::Tensor& invstd_in, const at::Tensor& sum_dxhat,
                                  const at::Tensor& sum_dxhat_xhat, int64_t count) {
  check_backward_elemt(grad_y, x_in, gain_in, mean_in, invstd_in, sum_dxhat, sum_dxhat_xhat, count);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const at::Tensor A = sum_dxhat.to(at::kDouble).contiguous();
  const at::Tensor B = sum_dxhat_xhat.to(at::kDouble).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  CBN_DISPATCH(x, "cbn_backward_elemt_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    elemt<scalar_t, acc_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                           gain.const_data_ptr<scalar_t>(), nullptr, dx.mutable_data_ptr<scalar_t>(), dims(x),
                           fmt == at::MemoryFormat::ChannelsLast, mean.const_data_ptr<acc_t>(),
                           invstd.const_data_ptr<acc_t>(), A.const_data_ptr<double>(),
                           B.const_data_ptr<double>(), static_cast<double>(count));
  });
  return dx;
}

// C values: at:: ops in the statistics' precision, exactly the reference's arithmetic.
void cbn_update_running_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                            const at::Tensor& mean, const at::Tensor& var, int64_t count,
                            double momentum) {
  check_update_running(running_mean, running_var, mean, var, count);
  update_running_with_aten(running_mean, running_var, mean, var, count, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CPU, m) {
  m.impl("conditional_batch_norm", &cbn_forward_cpu);
  m.impl("conditional_batch_norm_backward", &cbn_backward_cpu);
  m.impl("conditional_batch_norm_stats", &cbn_stats_cpu);
  m.impl("conditional_batch_norm_apply", &cbn_apply_cpu);
  m.impl("conditional_batch_norm_backward_reduce", &cbn_backward_reduce_cpu);
  m.impl("conditional_batch_norm_backward_elemt", &cbn_backward_elemt_cpu);
  m.impl("conditional_batch_norm_update_running", &cbn_update_running_cpu);
}

}  // namespace fastinv
