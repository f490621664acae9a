// CPU kernels of conditional batch norm (schemas, reference and the math in
// fastinv/ops/conditional_batch_norm.py; CUDA twin in csrc/cuda/conditional_batch_norm.cu).
//
//   y = (x - mean[c]) * invstd[c] * gain[n,c] + bias[n,c]
//
// NCHW (contiguous): a channel's values are N runs of H*W contiguous elements, its "slab".
// The fused ops work channel by channel (OpenMP over channels) and finish a channel before
// taking the next: the forward reads the slab for the statistics and again for the
// normalise, the backward reads (x, dy) for the two reductions and again for grad_x, and the
// second read hits the cache (a slab of N=32 x 32x32 fp32 is 128 KiB; L2 is 1 MiB or more).
// DRAM traffic is then the minimum: read x, write y (forward); read x and dy, write dx
// (backward). The split ops (cross-replica path) cannot keep the slab across the all-reduce.
//
// NHWC (channels_last): a channel is strided, so the natural unit is a row of C channels.
// Statistics are per-sample partials merged in sample order; elementwise passes run over rows.
//
// Statistics: one pass of sums shifted by the channel's first value K, sum(x-K) and
// sum((x-K)^2), in acc_t vector lanes over chunks of at most 4096 values, the chunk sums
// added in double; then var = q/n - (s/n)^2. K is a sample of the channel, so |mean - K| is a few standard deviations
// and nothing cancels catastrophically (unlike E[x^2] - E[x]^2 around a large mean).
// Every reduction has a fixed order that depends only on the shape: results do not depend
// on the thread count.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastinv {
namespace {

constexpr const char* kOp = "fastinv.conditional_batch_norm";

// ---- argument checks (mirror _check_* in the Python op file) -------------------------------

void check_x(const at::Tensor& x) {
  check_floating(x, kOp, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.numel() > 0, kOp, ": x is empty (shape ", x.sizes(),
                    "); batch norm needs values");
}

void check_nc(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_floating(t, kOp, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == x.size(0) && t.size(1) == x.size(1), kOp, ": ",
                    name, " must have shape (N, C) = (", x.size(0), ", ", x.size(1),
                    ") to match x of shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kOp, ": x is ", x.scalar_type(), " but ",
                   name, " is ", t.scalar_type(), "; cast them to one dtype");
  check_same_device(x, t, kOp, "x", name);
}

void check_c(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_floating(t, kOp, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x.size(1), kOp, ": ", name,
                    " must have shape (C,) = (", x.size(1), ",) to match x of shape ", x.sizes(),
                    ", got ", t.sizes());
  check_same_device(x, t, kOp, "x", name);
}

void check_forward(const at::Tensor& x, const at::Tensor& gain, const at::Tensor& bias,
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

// ---- layout ---------------------------------------------------------------------------------

// Same rule as _layout() in Python: channels_last when x is that and not also contiguous.
bool is_nhwc(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_nhwc(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

struct Dims {
  int64_t N, C, HW;
};

Dims dims(const at::Tensor& x) { return {x.size(0), x.size(1), x.size(2) * x.size(3)}; }

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- inner loops --------------------------------------------------------------------------
//
// Reductions are `omp simd reduction` loops: that licenses the compiler to keep one partial
// sum per vector lane (a fixed, shape-determined order), which plain C++ forbids without
// -ffast-math. Runs longer than kChunk are cut so that fp32 partials never sum more than a
// few thousand values before they are added into double.

constexpr int64_t kChunk = 512;

// A channel's runs are H*W values each, C*H*W apart: for BigGAN's shapes often a page or
// less, so the hardware prefetcher, which stops at page boundaries, starts every run cold.
// While reading a chunk of run n we prefetch the same chunk of run n + 1.
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  if (p == nullptr) return;
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

template <typename T>
inline const T* offset_or_null(const T* p, int64_t off) {
  return p == nullptr ? nullptr : p + off;
}

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
inline void shifted_sums(const scalar_t* __restrict p, int64_t n, acc_t k, double& s, double& q,
                         const scalar_t* next) {
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    prefetch(offset_or_null(next, b), e - b);
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

// sum(dy) and sum(dy * (x - mean)) over one contiguous run.
template <typename scalar_t, typename acc_t>
inline std::pair<double, double> run_dot(const scalar_t* __restrict dy, const scalar_t* __restrict x,
                                         int64_t n, acc_t mean, const scalar_t* next_dy,
                                         const scalar_t* next_x) {
  double s = 0, q = 0;
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    prefetch(offset_or_null(next_dy, b), e - b);
    prefetch(offset_or_null(next_x, b), e - b);
    acc_t ts = 0, tq = 0;
#pragma omp simd reduction(+ : ts, tq)
    for (int64_t i = b; i < e; ++i) {
      const acc_t g = static_cast<acc_t>(dy[i]);
      ts += g;
      tq += g * (static_cast<acc_t>(x[i]) - mean);
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

// ---- NCHW per-channel building blocks -------------------------------------------------------
// `cold`: the slab is not in cache (the split ops), so prefetch the next run while reading one.

template <typename scalar_t, typename acc_t>
std::pair<double, double> nchw_channel_stats(const scalar_t* x, Dims d, int64_t c) {
  const scalar_t* base = x + c * d.HW;
  const int64_t stride = d.C * d.HW;
  const acc_t k = static_cast<acc_t>(base[0]);
  double s = 0, q = 0;
  for (int64_t n = 0; n < d.N; ++n) {
    const scalar_t* next = n + 1 < d.N ? base + (n + 1) * stride : nullptr;
    shifted_sums<scalar_t, acc_t>(base + n * stride, d.HW, k, s, q, next);
  }
  return finish_stats(static_cast<double>(k), s, q, d.N * d.HW);
}

template <typename scalar_t, typename acc_t>
void nchw_channel_apply(const scalar_t* x, const scalar_t* gain, const scalar_t* bias, scalar_t* y,
                        Dims d, int64_t c, acc_t mean, acc_t invstd, bool cold) {
  const int64_t stride = d.C * d.HW;
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t off = n * stride + c * d.HW;
    const acc_t scale = invstd * static_cast<acc_t>(gain[n * d.C + c]);
    const acc_t b = static_cast<acc_t>(bias[n * d.C + c]);
    const scalar_t* __restrict xs = x + off;
    scalar_t* __restrict ys = y + off;
    const scalar_t* next = cold && n + 1 < d.N ? xs + stride : nullptr;
    for (int64_t b0 = 0; b0 < d.HW; b0 += kChunk) {
      const int64_t e = std::min(d.HW, b0 + kChunk);
      prefetch(offset_or_null(next, b0), e - b0);
#pragma omp simd
      for (int64_t i = b0; i < e; ++i) {
        ys[i] = store<scalar_t, acc_t>((static_cast<acc_t>(xs[i]) - mean) * scale + b);
      }
    }
  }
}

// Per-(n, c) sums: gb[n,c] = sum dy, gg[n,c] = invstd * sum dy (x - mean). Returns
// (sum_n gain*gb, sum_n gain*gg), the two per-channel backward reductions.
template <typename scalar_t, typename acc_t, typename out_t>
std::pair<double, double> nchw_channel_reduce(const scalar_t* dy, const scalar_t* x,
                                              const scalar_t* gain, out_t* gg, out_t* gb, Dims d,
                                              int64_t c, acc_t mean, acc_t invstd) {
  const int64_t stride = d.C * d.HW;
  double a = 0, b = 0;
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t off = n * stride + c * d.HW;
    const bool more = n + 1 < d.N;
    const auto [s, q] = run_dot<scalar_t, acc_t>(dy + off, x + off, d.HW, mean,
                                                 more ? dy + off + stride : nullptr,
                                                 more ? x + off + stride : nullptr);
    const double qq = q * static_cast<double>(invstd);
    gb[n * d.C + c] = static_cast<out_t>(s);
    gg[n * d.C + c] = static_cast<out_t>(qq);
    if (gain != nullptr) {
      const double g = static_cast<double>(static_cast<acc_t>(gain[n * d.C + c]));
      a += g * s;
      b += g * qq;
    }
  }
  return {a, b};
}

// grad_x = invstd*gain*dy - invstd*A/M - (x - mean)*invstd^2*B/M   (A = B = 0 in eval)
template <typename scalar_t, typename acc_t>
void nchw_channel_elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, scalar_t* dx,
                        Dims d, int64_t c, acc_t mean, acc_t invstd, double A, double B,
                        double M, bool cold) {
  const acc_t c0 = static_cast<acc_t>(-static_cast<double>(invstd) * A / M);
  const acc_t c2 = static_cast<acc_t>(-static_cast<double>(invstd) * invstd * B / M);
  const int64_t stride = d.C * d.HW;
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t off = n * stride + c * d.HW;
    const acc_t c1 = invstd * static_cast<acc_t>(gain[n * d.C + c]);
    const scalar_t* __restrict xs = x + off;
    const scalar_t* __restrict gs = dy + off;
    scalar_t* __restrict out = dx + off;
    const bool next = cold && n + 1 < d.N;
    for (int64_t b0 = 0; b0 < d.HW; b0 += kChunk) {
      const int64_t e = std::min(d.HW, b0 + kChunk);
      if (next) {
        prefetch(xs + stride + b0, e - b0);
        prefetch(gs + stride + b0, e - b0);
      }
#pragma omp simd
      for (int64_t i = b0; i < e; ++i) {
        out[i] = store<scalar_t, acc_t>(c1 * static_cast<acc_t>(gs[i]) +
                                        c2 * (static_cast<acc_t>(xs[i]) - mean) + c0);
      }
    }
  }
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

template <typename scalar_t, typename acc_t>
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
      // (x - mean) * scale + bias: folding mean into the shift would lose digits for a
      // large mean.
#pragma omp simd
      for (int64_t c = 0; c < d.C; ++c) {
        yr[c] = store<scalar_t, acc_t>((static_cast<acc_t>(xr[c]) - mean[c]) * scale[c] + shift[c]);
      }
    }
  });
}

// gb[n,c] = sum_hw dy, gg[n,c] = invstd[c] * sum_hw dy (x - mean), per sample in parallel.
template <typename scalar_t, typename acc_t, typename out_t>
void nhwc_reduce(const scalar_t* dy, const scalar_t* x, Dims d, const acc_t* mean,
                 const acc_t* invstd, out_t* gg, out_t* gb) {
  at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> ls(d.C), lq(d.C);
    std::vector<double> s(d.C), q(d.C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(q.begin(), q.end(), 0.0);
      for (int64_t r0 = 0; r0 < d.HW; r0 += 512) {
        std::fill(ls.begin(), ls.end(), acc_t(0));
        std::fill(lq.begin(), lq.end(), acc_t(0));
        const int64_t r1 = std::min(d.HW, r0 + 512);
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = x + (n * d.HW + r) * d.C;
          const scalar_t* gr = dy + (n * d.HW + r) * d.C;
#pragma omp simd
          for (int64_t c = 0; c < d.C; ++c) {
            const acc_t g = static_cast<acc_t>(gr[c]);
            ls[c] += g;
            lq[c] += g * (static_cast<acc_t>(xr[c]) - mean[c]);
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

template <typename scalar_t, typename acc_t>
void nhwc_elemt(const scalar_t* dy, const scalar_t* x, const scalar_t* gain, scalar_t* dx, Dims d,
                const acc_t* mean, const acc_t* invstd, const double* A, const double* B,
                double M) {
  std::vector<acc_t> c0(d.C), c2(d.C);
  for (int64_t c = 0; c < d.C; ++c) {
    c0[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * A[c] / M);
    c2[c] = static_cast<acc_t>(-static_cast<double>(invstd[c]) * invstd[c] * B[c] / M);
  }
  at::parallel_for(0, d.N * d.HW, 256, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> c1(d.C);
    int64_t cur = -1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / d.HW;
      if (n != cur) {
        cur = n;
        for (int64_t c = 0; c < d.C; ++c) c1[c] = invstd[c] * static_cast<acc_t>(gain[n * d.C + c]);
      }
      const scalar_t* xr = x + r * d.C;
      const scalar_t* gr = dy + r * d.C;
      scalar_t* out = dx + r * d.C;
#pragma omp simd
      for (int64_t c = 0; c < d.C; ++c) {
        out[c] = store<scalar_t, acc_t>(c1[c] * static_cast<acc_t>(gr[c]) +
                                       c2[c] * (static_cast<acc_t>(xr[c]) - mean[c]) + c0[c]);
      }
    }
  });
}

// ---- helpers shared by the op entry points -------------------------------------------------

at::Tensor per_channel(const at::Tensor& x, std::initializer_list<int64_t> shape) {
  return at::empty(shape, x.options().dtype(acc_dtype(x.scalar_type())));
}

// (C,) statistics as contiguous acc-dtype tensors
at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x) {
  return t.to(acc_dtype(x.scalar_type())).contiguous();
}

// ---- ops ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbn_forward_cpu(
    const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps) {
  check_forward(x_in, gain_in, bias_in, running_mean, running_var, training);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const Dims d = dims(x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor mean, var;
  if (training) {
    mean = per_channel(x, {d.C});
    var = per_channel(x, {d.C});
  } else {
    mean = as_acc(*running_mean, x).clone();
    var = as_acc(*running_var, x).clone();
  }
  at::Tensor invstd = per_channel(x, {d.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_forward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const scalar_t* pb = bias.const_data_ptr<scalar_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    acc_t* pm = mean.mutable_data_ptr<acc_t>();
    acc_t* pv = var.mutable_data_ptr<acc_t>();
    acc_t* pi = invstd.mutable_data_ptr<acc_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {  // statistics, then normalise while in cache
          if (training) {
            const auto [m, v] = nchw_channel_stats<scalar_t, acc_t>(px, d, c);
            pm[c] = static_cast<acc_t>(m);
            pv[c] = static_cast<acc_t>(v);
          }
          pi[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(pv[c]) + eps));
          nchw_channel_apply<scalar_t, acc_t>(px, pg, pb, py, d, c, pm[c], pi[c], /*cold=*/!training);
        }
      });
    } else {
      if (training) {
        std::vector<double> m(d.C), v(d.C);
        nhwc_stats<scalar_t, acc_t>(px, d, m.data(), v.data());
        for (int64_t c = 0; c < d.C; ++c) {
          pm[c] = static_cast<acc_t>(m[c]);
          pv[c] = static_cast<acc_t>(v[c]);
        }
      }
      for (int64_t c = 0; c < d.C; ++c) {
        pi[c] = static_cast<acc_t>(1.0 / std::sqrt(static_cast<double>(pv[c]) + eps));
      }
      nhwc_apply<scalar_t, acc_t>(px, pg, pb, py, d, pm, pi);
    }
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbn_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& gain_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, bool training) {
  check_x(x_in);
  check_nc(gain_in, x_in, "gain");
  TORCH_CHECK_VALUE(grad_y.sizes() == x_in.sizes(), kOp, ": grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x_in.sizes());
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor grad_gain = at::empty({d.N, d.C}, gain.options());
  at::Tensor grad_bias = at::empty({d.N, d.C}, gain.options());
  const double M = static_cast<double>(d.N * d.HW);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const acc_t* pm = mean.const_data_ptr<acc_t>();
    const acc_t* pi = invstd.const_data_ptr<acc_t>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    scalar_t* pgg = grad_gain.mutable_data_ptr<scalar_t>();
    scalar_t* pgb = grad_bias.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {  // reductions, then grad_x while (x, dy) are in cache
          const auto [A, B] =
              nchw_channel_reduce<scalar_t, acc_t, scalar_t>(pdy, px, pg, pgg, pgb, d, c, pm[c], pi[c]);
          nchw_channel_elemt<scalar_t, acc_t>(pdy, px, pg, pdx, d, c, pm[c], pi[c],
                                              training ? A : 0.0, training ? B : 0.0, M,
                                              /*cold=*/false);
        }
      });
    } else {
      // Sums in acc precision, then rounded to gain's dtype like the reference.
      std::vector<acc_t> gg(d.N * d.C), gb(d.N * d.C);
      nhwc_reduce<scalar_t, acc_t, acc_t>(pdy, px, d, pm, pi, gg.data(), gb.data());
      std::vector<double> A(d.C, 0.0), B(d.C, 0.0);
      for (int64_t n = 0; n < d.N; ++n) {
        for (int64_t c = 0; c < d.C; ++c) {
          const int64_t k = n * d.C + c;
          pgg[k] = static_cast<scalar_t>(gg[k]);
          pgb[k] = static_cast<scalar_t>(gb[k]);
          if (training) {
            const double g = static_cast<double>(static_cast<acc_t>(pg[k]));
            A[c] += g * gb[k];
            B[c] += g * gg[k];
          }
        }
      }
      nhwc_elemt<scalar_t, acc_t>(pdy, px, pg, pdx, d, pm, pi, A.data(), B.data(), M);
    }
  });
  return {dx, grad_gain, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> cbn_stats_cpu(const at::Tensor& x_in) {
  check_x(x_in);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const Dims d = dims(x);
  at::Tensor mean = per_channel(x, {d.C}), var = per_channel(x, {d.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_stats_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    acc_t* pm = mean.mutable_data_ptr<acc_t>();
    acc_t* pv = var.mutable_data_ptr<acc_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const auto [m, v] = nchw_channel_stats<scalar_t, acc_t>(px, d, c);
          pm[c] = static_cast<acc_t>(m);
          pv[c] = static_cast<acc_t>(v);
        }
      });
    } else {
      std::vector<double> m(d.C), v(d.C);
      nhwc_stats<scalar_t, acc_t>(px, d, m.data(), v.data());
      for (int64_t c = 0; c < d.C; ++c) {
        pm[c] = static_cast<acc_t>(m[c]);
        pv[c] = static_cast<acc_t>(v[c]);
      }
    }
  });
  return {mean, var};
}

at::Tensor cbn_apply_cpu(const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
                         const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_x(x_in);
  check_nc(gain_in, x_in, "gain");
  check_nc(bias_in, x_in, "bias");
  check_c(mean_in, x_in, "mean");
  check_c(invstd_in, x_in, "invstd");
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_apply_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const scalar_t* pb = bias.const_data_ptr<scalar_t>();
    const acc_t* pm = mean.const_data_ptr<acc_t>();
    const acc_t* pi = invstd.const_data_ptr<acc_t>();
    scalar_t* py = y.mutable_data_ptr<scalar_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) nchw_channel_apply<scalar_t, acc_t>(px, pg, pb, py, d, c, pm[c], pi[c], true);
      });
    } else {
      nhwc_apply<scalar_t, acc_t>(px, pg, pb, py, d, pm, pi);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> cbn_backward_reduce_cpu(const at::Tensor& grad_y,
                                                           const at::Tensor& x_in,
                                                           const at::Tensor& mean_in,
                                                           const at::Tensor& invstd_in) {
  check_x(x_in);
  TORCH_CHECK_VALUE(grad_y.sizes() == x_in.sizes(), kOp, ": grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x_in.sizes());
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor gg = per_channel(x, {d.N, d.C}), gb = per_channel(x, {d.N, d.C});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const acc_t* pm = mean.const_data_ptr<acc_t>();
    const acc_t* pi = invstd.const_data_ptr<acc_t>();
    acc_t* pgg = gg.mutable_data_ptr<acc_t>();
    acc_t* pgb = gb.mutable_data_ptr<acc_t>();
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          nchw_channel_reduce<scalar_t, acc_t, acc_t>(pdy, px, nullptr, pgg, pgb, d, c, pm[c], pi[c]);
        }
      });
    } else {
      nhwc_reduce<scalar_t, acc_t, acc_t>(pdy, px, d, pm, pi, pgg, pgb);
    }
  });
  return {gg, gb};
}

at::Tensor cbn_backward_elemt_cpu(const at::Tensor& grad_y, const at::Tensor& x_in,
                                  const at::Tensor& gain_in, const at::Tensor& mean_in,
                                  const at::Tensor& invstd_in, const at::Tensor& sum_dxhat,
                                  const at::Tensor& sum_dxhat_xhat, int64_t count) {
  check_x(x_in);
  check_nc(gain_in, x_in, "gain");
  check_c(sum_dxhat, x_in, "sum_dxhat");
  check_c(sum_dxhat_xhat, x_in, "sum_dxhat_xhat");
  TORCH_CHECK_VALUE(grad_y.sizes() == x_in.sizes(), kOp, ": grad_y has shape ", grad_y.sizes(),
                    " but x has shape ", x_in.sizes());
  TORCH_CHECK_VALUE(count > 0, kOp, ": count must be positive, got ", count);
  const at::MemoryFormat fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const at::Tensor A = sum_dxhat.to(at::kDouble).contiguous();
  const at::Tensor B = sum_dxhat_xhat.to(at::kDouble).contiguous();
  const Dims d = dims(x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_elemt_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pdy = dy.const_data_ptr<scalar_t>();
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const acc_t* pm = mean.const_data_ptr<acc_t>();
    const acc_t* pi = invstd.const_data_ptr<acc_t>();
    const double* pa = A.const_data_ptr<double>();
    const double* pbb = B.const_data_ptr<double>();
    scalar_t* pdx = dx.mutable_data_ptr<scalar_t>();
    const double M = static_cast<double>(count);
    if (fmt == at::MemoryFormat::Contiguous) {
      at::parallel_for(0, d.C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          nchw_channel_elemt<scalar_t, acc_t>(pdy, px, pg, pdx, d, c, pm[c], pi[c], pa[c], pbb[c], M, true);
        }
      });
    } else {
      nhwc_elemt<scalar_t, acc_t>(pdy, px, pg, pdx, d, pm, pi, pa, pbb, M);
    }
  });
  return dx;
}

// C values: at:: ops in the statistics' precision, exactly the reference's arithmetic.
void cbn_update_running_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                            const at::Tensor& mean, const at::Tensor& var, int64_t count,
                            double momentum) {
  TORCH_CHECK_VALUE(count > 1, kOp, ": the running variance needs count > 1, got ", count);
  const at::Tensor unbiased = var * (static_cast<double>(count) / static_cast<double>(count - 1));
  running_mean.copy_(running_mean.to(mean.scalar_type()) * (1 - momentum) + mean * momentum);
  running_var.copy_(running_var.to(var.scalar_type()) * (1 - momentum) + unbiased * momentum);
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
