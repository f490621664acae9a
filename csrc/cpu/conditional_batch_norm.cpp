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

namespace fastinv {
namespace {

using namespace cbn;  // checks, layout rule, Dims

// ---- inner loops --------------------------------------------------------------------------
//
// Reductions are `omp simd reduction` loops: that licenses the compiler to keep one partial
// sum per vector lane (a fixed, shape-determined order), which plain C++ forbids without
// -ffast-math. Runs longer than kChunk are cut so that fp32 partials never sum more than a
// few thousand values before they are added into double.

constexpr int64_t kChunk = 512;

// Round-to-nearest-even float -> bf16 without the NaN branch c10's conversion has, so the
// store loops vectorise. NaN stays NaN (quiet).
inline c10::BFloat16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t bits = (f != f) ? 0x7FC0u : rounded;
  return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
}

template <typename scalar_t, typename acc_t>
inline scalar_t store(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return to_bf16(static_cast<float>(v));
  } else {
    return static_cast<scalar_t>(v);
  }
}

// sum(x - k) and sum((x - k)^2) over one contiguous run, added into s, q.
template <typename scalar_t, typename acc_t>
inline void shifted_sums(const scalar_t* __restrict p, int64_t n, acc_t k, double& s, double& q) {
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    acc_t ts = 0, tq = 0;
#pragma omp simd reduction(+ : ts, tq)
    for (int64_t i = b; i < e; ++i) {
      const acc_t d = static_cast<acc_t>(p[i]) - k;
      ts += d;
      tq += d * d;
    }
    s += ts;
    q += tq;
  }
}

// dy as the backward sees it: with the fused ReLU, 0 where the forward's output was not > 0
// (recomputed from x: scale, shift are the forward's invstd * gain and bias).
template <bool Relu, typename scalar_t, typename acc_t>
inline acc_t masked_dy(scalar_t dy, acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  const acc_t g = static_cast<acc_t>(dy);
  if constexpr (Relu) {
    return relu_passes<scalar_t, acc_t>(affine(x, mean, scale, shift)) ? g : acc_t(0);
  } else {
    return g;
  }
}

// sum(dy) and sum(dy * (x - mean)) over one contiguous run (dy masked when Relu).
template <bool Relu, typename scalar_t, typename acc_t>
inline std::pair<double, double> run_dot(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                         int64_t n, acc_t mean, acc_t scale, acc_t shift) {
  double s = 0, q = 0;
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    acc_t ts = 0, tq = 0;
#pragma omp simd reduction(+ : ts, tq)
    for (int64_t i = b; i < e; ++i) {
      const acc_t xv = static_cast<acc_t>(x[i]);
      const acc_t g = masked_dy<Relu, scalar_t, acc_t>(dy[i], xv, mean, scale, shift);
      ts += g;
      tq += g * (xv - mean);
    }
    s += ts;
    q += tq;
  }
  return {s, q};
}

// (mean, biased variance) from sums shifted by k over count values
inline std::pair<double, double> finish_stats(double k, double s, double q, int64_t count) {
  const double m = s / static_cast<double>(count);
  return {k + m, std::max(0.0, q / static_cast<double>(count) - m * m)};
}

// ---- NCHW: the N*C runs of H*W contiguous values ----------------------------------------------

// Runs per parallel task: about 16K values, so small H*W does not make tiny tasks.
inline int64_t run_grain(Dims d) { return std::max<int64_t>(1, 16384 / d.HW); }

// Per-run shifted partial sums (shift: the channel's first value), merged per channel over
// samples in order.
template <typename scalar_t, typename acc_t>
void nchw_stats(const scalar_t* x, Dims d, double* mean, double* var) {
  std::vector<double> ps(d.N * d.C), pq(d.N * d.C);
  std::vector<acc_t> k(d.C);
  for (int64_t c = 0; c < d.C; ++c) k[c] = static_cast<acc_t>(x[c * d.HW]);
  at::parallel_for(0, d.N * d.C, run_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      double s = 0, q = 0;
      shifted_sums<scalar_t, acc_t>(x + r * d.HW, d.HW, k[r % d.C], s, q);
      ps[r] = s;
      pq[r] = q;
    }
  });
  for (int64_t c = 0; c < d.C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      s += ps[n * d.C + c];
      q += pq[n * d.C + c];
    }
    std::tie(mean[c], var[c]) = finish_stats(static_cast<double>(k[c]), s, q, d.N * d.HW);
  }
}

template <bool Relu, typename scalar_t, typename acc_t>
void nchw_apply(const scalar_t* x, const scalar_t* gain, const scalar_t* bias, scalar_t* y, Dims d,
                const acc_t* mean, const acc_t* invstd) {
  at::parallel_for(0, d.N * d.C, run_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // r = n * C + c, also the (N, C) index of gain/bias
      const int64_t c = r % d.C;
      const acc_t m = mean[c];
      const acc_t scale = invstd[c] * static_cast<acc_t>(gain[r]);
      const acc_t b = static_cast<acc_t>(bias[r]);
      const scalar_t* __restrict xs = x + r * d.HW;
      scalar_t* __restrict ys = y + r * d.HW;
#pragma omp simd
      for (int64_t i = 0; i < d.HW; ++i) {
        const acc_t v = affine(static_cast<acc_t>(xs[i]), m, scale, b);
        ys[i] = store<scalar_t, acc_t>(Relu ? relu_of(v) : v);
      }
    }
  });
}

// Per-(n, c) sums: gb[n,c] = sum dy, gg[n,c] = invstd * sum dy (x - mean). Relu: dy masked
// by the forward's output (gain, bias: the forward's; unused otherwise).
template <bool Relu, typename scalar_t, typename acc_t, typename out_t>
void nchw_reduce(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* bias,
                 Dims d, const acc_t* mean, const acc_t* invstd, out_t* gg, out_t* gb) {
  at::parallel_for(0, d.N * d.C, run_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % d.C;
      const acc_t scale = Relu ? invstd[c] * static_cast<acc_t>(gain[r]) : acc_t(0);
      const acc_t shift = Relu ? static_cast<acc_t>(bias[r]) : acc_t(0);
      const auto [s, q] = run_dot<Relu, scalar_t, acc_t>(dy + r * d.HW, x + r * d.HW, d.HW, mean[c], scale,
                                                         shift);
      gb[r] = static_cast<out_t>(s);
      gg[r] = static_cast<out_t>(q * static_cast<double>(invstd[c]));
    }
  });
}

// grad_x = invstd*gain*dy - invstd*A/M - (x - mean)*invstd^2*B/M   (A = B = 0 in eval; dy
// masked by the forward's output when Relu, bias unused otherwise)
template <bool Relu, typename scalar_t, typename acc_t>
void nchw_elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* bias,
                scalar_t* dx, Dims d, const acc_t* mean, const acc_t* invstd, const double* A,
                const double* B, double M) {
  at::parallel_for(0, d.N * d.C, run_grain(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r % d.C;
      const acc_t m = mean[c];
      const acc_t c0 = static_cast<acc_t>(-static_cast<double>(invstd[c]) * A[c] / M);
      const acc_t c2 = static_cast<acc_t>(-static_cast<double>(invstd[c]) * invstd[c] * B[c] / M);
      const acc_t c1 = invstd[c] * static_cast<acc_t>(gain[r]);  // also the forward's scale
      const acc_t shift = Relu ? static_cast<acc_t>(bias[r]) : acc_t(0);
      const scalar_t* __restrict xs = x + r * d.HW;
      const scalar_t* __restrict gs = dy + r * d.HW;
      scalar_t* __restrict out = dx + r * d.HW;
#pragma omp simd
      for (int64_t i = 0; i < d.HW; ++i) {
        const acc_t xv = static_cast<acc_t>(xs[i]);
        const acc_t g = masked_dy<Relu, scalar_t, acc_t>(gs[i], xv, m, c1, shift);
        out[i] = store<scalar_t, acc_t>(c1 * g + c2 * (xv - m) + c0);
      }
    }
  });
}

// ---- NHWC building blocks -------------------------------------------------------------------

// Per-sample shifted partial sums (shift: row 0 of the batch), merged in sample order.
template <typename scalar_t, typename acc_t>
void nhwc_stats(const scalar_t* x, Dims d, double* mean, double* var) {
  std::vector<double> ps(d.N * d.C), pq(d.N * d.C);
  std::vector<acc_t> k(d.C);
  for (int64_t c = 0; c < d.C; ++c) k[c] = static_cast<acc_t>(x[c]);
  at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> ls(d.C), lq(d.C);
    for (int64_t n = n0; n < n1; ++n) {
      double* s = ps.data() + n * d.C;
      double* q = pq.data() + n * d.C;
      const scalar_t* xn = x + n * d.HW * d.C;
      for (int64_t r0 = 0; r0 < d.HW; r0 += 512) {  // fp32 row sums flushed every 512 rows
        std::fill(ls.begin(), ls.end(), acc_t(0));
        std::fill(lq.begin(), lq.end(), acc_t(0));
        const int64_t r1 = std::min(d.HW, r0 + 512);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = xn + r * d.C;
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) {
            const acc_t v = static_cast<acc_t>(row[c]) - k[c];
            ls[c] += v;
            lq[c] += v * v;
          }
        }
        for (int64_t c = 0; c < d.C; ++c) {
          s[c] += ls[c];
          q[c] += lq[c];
        }
      }
    }
  });
  const double count = static_cast<double>(d.N * d.HW);
  for (int64_t c = 0; c < d.C; ++c) {
    double s = 0, q = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      s += ps[n * d.C + c];
      q += pq[n * d.C + c];
    }
    const double m = s / count;
    mean[c] = static_cast<double>(k[c]) + m;
    var[c] = std::max(0.0, q / count - m * m);
  }
}

template <bool Relu, typename scalar_t, typename acc_t>
void nhwc_apply(const scalar_t* x, const scalar_t* gain, const scalar_t* bias, scalar_t* y, Dims d,
                const acc_t* mean, const acc_t* invstd) {
  at::parallel_for(0, d.N * d.HW, 256, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> scale(d.C), shift(d.C);
    int64_t cur = -1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / d.HW;
      if (n != cur) {
        cur = n;
        for (int64_t c = 0; c < d.C; ++c) {
          scale[c] = invstd[c] * static_cast<acc_t>(gain[n * d.C + c]);
          shift[c] = static_cast<acc_t>(bias[n * d.C + c]);
        }
      }
      const scalar_t* xr = x + r * d.C;
      scalar_t* yr = y + r * d.C;
#pragma omp simd
      for (int64_t c = 0; c < d.C; ++c) {
        const acc_t v = affine(static_cast<acc_t>(xr[c]), mean[c], scale[c], shift[c]);
        yr[c] = store<scalar_t, acc_t>(Relu ? relu_of(v) : v);
      }
    }
  });
}

// gb[n,c] = sum_hw dy, gg[n,c] = invstd[c] * sum_hw dy (x - mean), per sample in parallel
// (dy masked by the forward's output when Relu; gain, bias unused otherwise).
template <bool Relu, typename scalar_t, typename acc_t, typename out_t>
void nhwc_reduce(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* bias,
                 Dims d, const acc_t* mean, const acc_t* invstd, out_t* gg, out_t* gb) {
  at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> ls(d.C), lq(d.C), scale(d.C), shift(d.C);
    std::vector<double> s(d.C), q(d.C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      if constexpr (Relu) {
        for (int64_t c = 0; c < d.C; ++c) {
          scale[c] = invstd[c] * static_cast<acc_t>(gain[n * d.C + c]);
          shift[c] = static_cast<acc_t>(bias[n * d.C + c]);
        }
      }
      for (int64_t r0 = 0; r0 < d.HW; r0 += 512) {
        std::fill(ls.begin(), ls.end(), acc_t(0));
        std::fill(lq.begin(), lq.end(), acc_t(0));
        const int64_t r1 = std::min(d.HW, r0 + 512);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = x + (n * d.HW + r) * d.C;
          const scalar_t* gr = dy + (n * d.HW + r) * d.C;
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) {
            const acc_t xv = static_cast<acc_t>(xr[c]);
            const acc_t g = masked_dy<Relu, scalar_t, acc_t>(gr[c], xv, mean[c], scale[c], shift[c]);
            ls[c] += g;
            lq[c] += g * (xv - mean[c]);
          }
        }
        for (int64_t c = 0; c < d.C; ++c) {
          s[c] += ls[c];
          q[c] += lq[c];
        }
      }
      for (int64_t c = 0; c < d.C; ++c) {
        gb[n * d.C + c] = static_cast<out_t>(s[c]);
        gg[n * d.C + c] = static_cast<out_t>(q[c] * static_cast<double>(invstd[c]));
      }
    }
  });
}

template <bool Relu, typename scalar_t, typename acc_t>
void nhwc_elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* bias,
                scalar_t* dx, Dims d, const acc_t* mean, const acc_t* invstd, const double* A,
                const double* B, double M) {
  std::vector<acc_t> c0(d.C), c2(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    c0[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * A[c] / M);
    c2[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * invstd[c] * B[c] / M);
  }
  at::parallel_for(0, d.N * d.HW, 256, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> c1(d.C), shift(d.C);  // c1: also the forward's scale
    int64_t cur = -1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / d.HW;
      if (n != cur) {
        cur = n;
        for (int64_t c = 0; c < d.C; ++c) {
          c1[c] = invstd[c] * static_cast<acc_t>(gain[n * d.C + c]);
          if constexpr (Relu) shift[c] = static_cast<acc_t>(bias[n * d.C + c]);
        }
      }
      const scalar_t* xr = x + r * d.C;
      const scalar_t* gr = dy + r * d.C;
      scalar_t* out = dx + r * d.C;
#pragma omp simd
      for (int64_t c = 0; c < d.C; ++c) {
        const acc_t xv = static_cast<acc_t>(xr[c]);
        const acc_t g = masked_dy<Relu, scalar_t, acc_t>(gr[c], xv, mean[c], c1[c], shift[c]);
        out[c] = store<scalar_t, acc_t>(c1[c] * g + c2[c] * (xv - mean[c]) + c0[c]);
      }
    }
  });
}

// ---- one entry per pass, either layout ------------------------------------------------------

template <typename scalar_t, typename acc_t>
void batch_stats(const scalar_t* x, Dims d, bool nhwc, acc_t* mean, acc_t* var) {
  std::vector<double> m(d.C), v(d.C);
  if (nhwc) {
    nhwc_stats<scalar_t, acc_t>(x, d, m.data(), v.data());
  } else {
    nchw_stats<scalar_t, acc_t>(x, d, m.data(), v.data());
  }
  for (int64_t c = 0; c < d.C; ++c) {
    mean[c] = static_cast<acc_t>(m[c]);
    var[c] = static_cast<acc_t>(v[c]);
  }
}

// The fused ReLU is a template flag (the loops stay branch-free and vectorised), chosen here.
template <typename scalar_t, typename acc_t>
void apply(const scalar_t* x, const scalar_t* gain, const scalar_t* bias, scalar_t* y, Dims d,
           bool nhwc, const acc_t* mean, const acc_t* invstd, bool relu) {
  auto run = [&](auto relu_flag) {
    constexpr bool R = decltype(relu_flag)::value;
    if (nhwc) {
      nhwc_apply<R, scalar_t, acc_t>(x, gain, bias, y, d, mean, invstd);
    } else {
      nchw_apply<R, scalar_t, acc_t>(x, gain, bias, y, d, mean, invstd);
    }
  };
  relu ? run(std::true_type{}) : run(std::false_type{});
}

// relu_bias != nullptr: the fused ReLU's backward, dy masked where the forward's output
// (recomputed from x, mean, invstd, gain and this bias) was not > 0.
template <typename scalar_t, typename acc_t>
void reduce(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* relu_bias,
            Dims d, bool nhwc, const acc_t* mean, const acc_t* invstd, acc_t* gg, acc_t* gb) {
  auto run = [&](auto relu_flag) {
    constexpr bool R = decltype(relu_flag)::value;
    if (nhwc) {
      nhwc_reduce<R, scalar_t, acc_t, acc_t>(dy, x, gain, relu_bias, d, mean, invstd, gg, gb);
    } else {
      nchw_reduce<R, scalar_t, acc_t, acc_t>(dy, x, gain, relu_bias, d, mean, invstd, gg, gb);
    }
  };
  relu_bias != nullptr ? run(std::true_type{}) : run(std::false_type{});
}

template <typename scalar_t, typename acc_t>
void elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, const scalar_t* relu_bias,
           scalar_t* dx, Dims d, bool nhwc, const acc_t* mean, const acc_t* invstd, const double* A,
           const double* B, double M) {
  auto run = [&](auto relu_flag) {
    constexpr bool R = decltype(relu_flag)::value;
    if (nhwc) {
      nhwc_elemt<R, scalar_t, acc_t>(dy, x, gain, relu_bias, dx, d, mean, invstd, A, B, M);
    } else {
      nchw_elemt<R, scalar_t, acc_t>(dy, x, gain, relu_bias, dx, d, mean, invstd, A, B, M);
    }
  };
  relu_bias != nullptr ? run(std::true_type{}) : run(std::false_type{});
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
