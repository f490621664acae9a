// CUDA kernels of conditional batch norm (schemas, reference and math in
// fastinv/ops/conditional_batch_norm.py; CPU twin in csrc/cpu/conditional_batch_norm.cpp).
//
//   y = (x - mean[c]) * invstd[c] * gain[n,c] + bias[n,c]      (relu=True: max(y, 0))
//
// The fused ReLU is a runtime flag (apply) or the presence of `relu_bias` (backward), uniform
// over the grid, so it adds no kernel variants. Its backward masks dy where the stored y was
// not > 0, y's sign recomputed from x (read by both backward passes anyway) and the O(N*C)
// gain/bias: no extra tensor-sized read, where a saved y would add one to each pass.
//
// Launches (fused ops):
//   forward (training)  stats_partial -> finalize_stats -> apply               3 launches
//                       (1 launch, x read once, when a channel fits in a block's registers)
//   backward            reduce -> finalize_backward -> elemt                   3 launches
// against ~16 for F.batch_norm + mul + add forward and backward in eager. Bytes moved: the
// forward reads x twice and writes y (the statistics must be complete before any y is
// written, and at BigGAN's shapes a channel's slab, N*H*W values, is far larger than an
// SM's shared memory); the backward reads x and dy twice and writes dx.
//
// Statistics: every thread sums x - K and (x - K)^2 in fp32, K being the channel's first
// value; since all partial sums of a channel share K they add exactly, block by block and
// then over blocks in finalize_stats (in double), and var = q/n - (s/n)^2 loses nothing to
// cancellation while |mean - K| is a few standard deviations. (The cross-replica merge, with
// different shifts per rank, is Chan's parallel Welford formula, in Python.)
//
// Memory: 16-byte vector loads and stores (4 fp32, 8 bf16/fp16, 2 fp64) when the row
// length allows (H*W for NCHW, C for channels_last) and the pointers are 16-byte aligned;
// scalar otherwise. Both layouts have their own reduction kernels; the elementwise kernels
// differ only in how a flat index maps to (n, c).
//
// Determinism: no atomics; every sum has an order fixed by the shape and the SM count.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "conditional_batch_norm.h"

namespace fastinv {
namespace {

using namespace cbn;  // checks, layout rule, Dims

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = 8;  // finalize_backward: blocks of (32 channels, 8 samples)

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sum of two values over a block of kThreads threads, fixed order; the result is valid in
// thread 0.
template <typename A>
__device__ void block_sum2(A& a, A& b) {
  __shared__ A sa[kThreads / 32], sb[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = sa[0];
    b = sb[0];
    for (int w = 1; w < kThreads / 32; ++w) {
      a += sa[w];
      b += sb[w];
    }
  }
}

// Index division in 32 bits when every index fits (S = true: numel < 2^32, BigGAN's largest
// tensor is 4e8): a 64-bit division is a ~100-instruction software routine on the GPU, as
// much as a memory-bound kernel can spend per 16-byte vector.
template <bool S>
__device__ __forceinline__ int64_t idiv(int64_t a, int64_t b) {
  return S ? static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b)) : a / b;
}

bool small_index(int64_t numel) { return numel < (int64_t{1} << 32); }

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(v, hi)); }

// ---- statistics ------------------------------------------------------------------------------

// grid (C, splits): block (c, sp) sums its share of channel c's N*HW values.
template <typename T, typename A, int V, bool S>
__global__ void __launch_bounds__(kThreads)
nchw_stats_partial(const T* __restrict__ x, int64_t N, int64_t C, int64_t HW, A* __restrict__ part_s,
                   A* __restrict__ part_q) {
  const int64_t c = blockIdx.x;
  const int splits = gridDim.y, sp = blockIdx.y;
  const int64_t hwv = HW / V, total = N * hwv;
  const int64_t u0 = total * sp / splits, u1 = total * (sp + 1) / splits;
  const A k = static_cast<A>(x[c * HW]);
  A s = 0, q = 0;
#pragma unroll 4
  for (int64_t u = u0 + threadIdx.x; u < u1; u += kThreads) {
    const int64_t n = idiv<S>(u, hwv), i = u - n * hwv;
    const Vec<T, V> v = load<T, V>(x + (n * C + c) * HW + i * V);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A d = static_cast<A>(v.v[j]) - k;
      s += d;
      q += d * d;
    }
  }
  block_sum2(s, q);
  if (threadIdx.x == 0) {
    part_s[c * splits + sp] = s;
    part_q[c * splits + sp] = q;
  }
}

// Channels-last reductions run in 1-d blocks of kThreads threads seen as (lanes, rows): `lanes`
// threads (a power of two <= 32) side by side over channel vectors of V, kThreads / lanes rows
// of them over the rows of x. lanes = the channel vectors of a row, rounded up to a power of
// two: with 32 fixed lanes, C = 96 in bf16 (12 vectors) left 20 of 32 lanes idle; now 16 lanes
// and 16 rows keep 75% busy (100% whenever C / V is a power of two, as for C = 128, 256).
struct Lanes {
  int lanes, rows;
};

__host__ __device__ inline Lanes lanes_for(int64_t C, int V) {
  const int64_t vectors = (C + V - 1) / V;
  int lanes = 1;
  while (lanes < 32 && lanes < vectors) lanes *= 2;
  return {lanes, kThreads / lanes};
}

// Adds every row's two V-wide sums into row 0's (valid where row == 0), in a fixed order.
// Every thread of the block must call it (it synchronises). Shared layout [j][thread]: lanes
// of a warp read consecutive words (no bank conflicts).
template <typename A, int V>
__device__ __forceinline__ void sum_block_rows(A (&s)[V], A (&q)[V], A (*ss)[kThreads], A (*sq)[kThreads],
                                               Lanes L) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    ss[j][threadIdx.x] = s[j];
    sq[j][threadIdx.x] = q[j];
  }
  __syncthreads();
  if (static_cast<int>(threadIdx.x) >= L.lanes) return;
  for (int t = 1; t < L.rows; ++t) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s[j] += ss[j][t * L.lanes + threadIdx.x];
      q[j] += sq[j][t * L.lanes + threadIdx.x];
    }
  }
}

// grid (ceil(C / (lanes V)), splits): block (cx, sp) sums its share of the N*HW rows for its
// lanes * V channels.
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
nhwc_stats_partial(const T* __restrict__ x, int64_t R, int64_t C, A* __restrict__ part_s,
                   A* __restrict__ part_q) {
  __shared__ A ss[V][kThreads], sq[V][kThreads];
  const Lanes L = lanes_for(C, V);
  const int lane = threadIdx.x % L.lanes, row = threadIdx.x / L.lanes;
  const int splits = gridDim.y, sp = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * L.lanes + lane) * V;
  const int64_t r0 = R * sp / splits, r1 = R * (sp + 1) / splits;
  A s[V], q[V], k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    s[j] = q[j] = 0;
    k[j] = c0 + j < C ? static_cast<A>(x[c0 + j]) : A(0);
  }
  if (c0 < C) {
#pragma unroll 4
    for (int64_t r = r0 + row; r < r1; r += L.rows) {
      const Vec<T, V> v = load<T, V>(x + r * C + c0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = static_cast<A>(v.v[j]) - k[j];
        s[j] += d;
        q[j] += d * d;
      }
    }
  }
  sum_block_rows<A, V>(s, q, ss, sq, L);
  if (row == 0 && c0 < C) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      part_s[(c0 + j) * splits + sp] = s[j];
      part_q[(c0 + j) * splits + sp] = q[j];
    }
  }
}

// One warp per channel: its lanes add the blocks' partial sums (double, lane j takes splits
// j, j + 32, ...; then a fixed shuffle tree) and lane 0 finishes. (One thread per channel read
// 528 splits alone for channels_last C = 96 on an H200.)
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
finalize_stats(const T* __restrict__ x, bool nhwc, int64_t C, int64_t HW, int splits,
               int64_t count, const A* __restrict__ part_s, const A* __restrict__ part_q, double eps,
               A* __restrict__ mean, A* __restrict__ var, A* __restrict__ invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= C) return;  // the whole warp
  double s = 0, q = 0;
  for (int sp = lane; sp < splits; sp += 32) {
    s += static_cast<double>(part_s[c * splits + sp]);
    q += static_cast<double>(part_q[c * splits + sp]);
  }
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_down_sync(0xffffffffu, s, o);
    q += __shfl_down_sync(0xffffffffu, q, o);
  }
  if (lane != 0) return;
  const double k = static_cast<double>(static_cast<A>(nhwc ? x[c] : x[c * HW]));
  const double m = s / static_cast<double>(count);
  const double v = fmax(0.0, q / static_cast<double>(count) - m * m);
  mean[c] = static_cast<A>(k + m);
  var[c] = static_cast<A>(v);
  if (invstd != nullptr) invstd[c] = static_cast<A>(1.0 / sqrt(v + eps));
}

// Small NCHW slabs (N*HW*size <= kThreads * kHeld * 16 bytes: BigGAN's 4x4 stage, 16 KiB a
// channel at N=256 fp32): one block per channel holds the channel's values in registers,
// so x is read once and the whole training forward is one launch (statistics, running
// outputs, normalise).
constexpr int kHeld = 8;

template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
nchw_forward_held(const T* __restrict__ x, const T* __restrict__ gain, const T* __restrict__ bias,
                  int64_t N, int64_t C, int64_t HW, double eps, bool relu, T* __restrict__ y,
                  A* __restrict__ mean, A* __restrict__ var, A* __restrict__ invstd) {
  __shared__ A stats[2];
  const int64_t c = blockIdx.x;
  const uint32_t hwv = static_cast<uint32_t>(HW / V), total = static_cast<uint32_t>(N) * hwv;
  const A k = static_cast<A>(x[c * HW]);
  Vec<T, V> held[kHeld];
  A s = 0, q = 0;
#pragma unroll
  for (int h = 0; h < kHeld; ++h) {
    const uint32_t u = threadIdx.x + h * kThreads;
    if (u < total) {
      const uint32_t n = u / hwv, i = u - n * hwv;
      held[h] = load<T, V>(x + (n * C + c) * HW + static_cast<int64_t>(i) * V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A d = static_cast<A>(held[h].v[j]) - k;
        s += d;
        q += d * d;
      }
    }
  }
  block_sum2(s, q);
  if (threadIdx.x == 0) {
    const double count = static_cast<double>(N * HW);
    const double m = static_cast<double>(s) / count;
    const double v = fmax(0.0, static_cast<double>(q) / count - m * m);
    const double is = 1.0 / sqrt(v + eps);
    mean[c] = static_cast<A>(static_cast<double>(k) + m);
    var[c] = static_cast<A>(v);
    invstd[c] = static_cast<A>(is);
    stats[0] = static_cast<A>(static_cast<double>(k) + m);
    stats[1] = static_cast<A>(is);
  }
  __syncthreads();
  const A mu = stats[0], is = stats[1];
#pragma unroll
  for (int h = 0; h < kHeld; ++h) {
    const uint32_t u = threadIdx.x + h * kThreads;
    if (u < total) {
      const uint32_t n = u / hwv, i = u - n * hwv;
      const A scale = is * static_cast<A>(gain[n * C + c]);
      const A b = static_cast<A>(bias[n * C + c]);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A v = affine(static_cast<A>(held[h].v[j]), mu, scale, b);
        out.v[j] = static_cast<T>(relu ? relu_of(v) : v);
      }
      store<T, V>(y + (n * C + c) * HW + static_cast<int64_t>(i) * V, out);
    }
  }
}

// ---- elementwise: normalise-and-affine, and grad_x -------------------------------------------

// Flat element e (the first of a vector) -> (channel, index into the (N, C) gain/bias).
template <bool NHWC, bool S>
__device__ __forceinline__ void locate(int64_t e, int64_t C, int64_t HW, int64_t& c, int64_t& nc) {
  if (NHWC) {
    const int64_t row = idiv<S>(e, C);  // n * HW + hw
    c = e - row * C;
    nc = idiv<S>(row, HW) * C + c;
  } else {
    nc = idiv<S>(e, HW);  // n * C + c: the (n, c) run, also the (N, C) row-major index
    c = nc - idiv<S>(nc, C) * C;
  }
}

// Per-channel values of one vector's V channels (channels_last), V consecutive entries of a
// per-channel array. With V > 1 (the vector path) every per-channel array is 16-byte aligned
// (the host checks) and c is a multiple of V, so these are 16-byte loads: for bf16 x, 2 + 2
// loads of mean/invstd and 1 + 1 of gain/bias per 16 bytes of x, where one scalar load per
// channel and array took 32. (NCHW vectors share one channel: 4 scalar loads.)
template <typename A, int V>
struct PerChannel {
  A v[V];
};

template <typename A, int V>
__device__ __forceinline__ PerChannel<A, V> load_channels(const A* p) {
  PerChannel<A, V> out;
  constexpr int W = 16 / static_cast<int>(sizeof(A));  // values per 16-byte load
  if constexpr (V > 1 && V % W == 0) {
#pragma unroll
    for (int i = 0; i < V / W; ++i) {
      const Vec<A, W> chunk = load<A, W>(p + i * W);
#pragma unroll
      for (int j = 0; j < W; ++j) out.v[i * W + j] = chunk.v[j];
    }
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = p[j];
  }
  return out;
}

// gain/bias (x's dtype) of one vector's channels: one 16-byte load when V > 1.
template <typename T, typename A, int V>
__device__ __forceinline__ PerChannel<A, V> load_channels_of(const T* p) {
  PerChannel<A, V> out;
  const Vec<T, V> v = load<T, V>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out.v[j] = static_cast<A>(v.v[j]);
  return out;
}

// A vector of V never straddles two channels (NCHW: HW % V == 0) or two rows (NHWC: C % V == 0).
template <typename T, typename A, int V, bool NHWC, bool S>
__global__ void __launch_bounds__(kThreads)
apply_kernel(const T* __restrict__ x, const T* __restrict__ gain, const T* __restrict__ bias,
             const A* __restrict__ mean, const A* __restrict__ invstd, int64_t numel, int64_t C,
             int64_t HW, bool relu, T* __restrict__ y) {
  const int64_t units = numel / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
#pragma unroll 2
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units; u += stride) {
    const int64_t e = u * V;
    int64_t c, nc;
    locate<NHWC, S>(e, C, HW, c, nc);
    const Vec<T, V> xv = load<T, V>(x + e);
    Vec<T, V> yv;
    if constexpr (NHWC) {
      const PerChannel<A, V> m = load_channels<A, V>(mean + c), is = load_channels<A, V>(invstd + c);
      const PerChannel<A, V> g = load_channels_of<T, A, V>(gain + nc), b = load_channels_of<T, A, V>(bias + nc);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A scale = is.v[j] * g.v[j];
        const A v = affine(static_cast<A>(xv.v[j]), m.v[j], scale, b.v[j]);
        yv.v[j] = static_cast<T>(relu ? relu_of(v) : v);
      }
    } else {
      const A m = mean[c], scale = invstd[c] * static_cast<A>(gain[nc]), b = static_cast<A>(bias[nc]);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A v = affine(static_cast<A>(xv.v[j]), m, scale, b);
        yv.v[j] = static_cast<T>(relu ? relu_of(v) : v);
      }
    }
    store<T, V>(y + e, yv);
  }
}

// dy as the backward sees it: with the fused ReLU (relu), 0 where the forward's output, recomputed
// from x with the forward's scale = invstd * gain and shift = bias, was not > 0.
template <typename T, typename A>
__device__ __forceinline__ A masked_dy(T dy, A x, A mean, A scale, A shift, bool relu) {
  const A g = static_cast<A>(dy);
  return (!relu || relu_passes<T, A>(affine(x, mean, scale, shift))) ? g : A(0);
}

// grad_x = invstd*gain*dy - invstd*A/M - (x - mean)*invstd^2*B/M; sum_a == nullptr: eval,
// grad_x = invstd*gain*dy. relu_bias != nullptr: dy masked by the forward's output (fused ReLU).
template <typename T, typename A, int V, bool NHWC, bool S>
__global__ void __launch_bounds__(kThreads)
elemt_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ gain,
             const T* __restrict__ relu_bias, const A* __restrict__ mean, const A* __restrict__ invstd,
             const A* __restrict__ sum_a, const A* __restrict__ sum_b, double inv_count, int64_t numel,
             int64_t C, int64_t HW, T* __restrict__ dx) {
  const int64_t units = numel / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const A inv_m = static_cast<A>(inv_count);
  const bool train = sum_a != nullptr;  // sum_a and sum_b are given together
  const bool relu = relu_bias != nullptr;
#pragma unroll 2
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units; u += stride) {
    const int64_t e = u * V;
    int64_t c, nc;
    locate<NHWC, S>(e, C, HW, c, nc);
    const Vec<T, V> xv = load<T, V>(x + e);
    const Vec<T, V> gv = load<T, V>(dy + e);
    Vec<T, V> out;
    if constexpr (NHWC) {
      const PerChannel<A, V> m = load_channels<A, V>(mean + c), is = load_channels<A, V>(invstd + c);
      const PerChannel<A, V> g = load_channels_of<T, A, V>(gain + nc);
      PerChannel<A, V> sa{}, sb{}, b{};
      if (train) {
        sa = load_channels<A, V>(sum_a + c);
        sb = load_channels<A, V>(sum_b + c);
      }
      if (relu) b = load_channels_of<T, A, V>(relu_bias + nc);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A k0 = train ? -is.v[j] * sa.v[j] * inv_m : A(0);
        const A k2 = train ? -is.v[j] * is.v[j] * sb.v[j] * inv_m : A(0);
        const A k1 = is.v[j] * g.v[j];  // also the forward's scale
        const A xj = static_cast<A>(xv.v[j]);
        const A gj = masked_dy<T, A>(gv.v[j], xj, m.v[j], k1, b.v[j], relu);
        out.v[j] = static_cast<T>(k1 * gj + k2 * (xj - m.v[j]) + k0);
      }
    } else {
      const A is = invstd[c], m = mean[c];
      const A k0 = train ? -is * sum_a[c] * inv_m : A(0);
      const A k2 = train ? -is * is * sum_b[c] * inv_m : A(0);
      const A k1 = is * static_cast<A>(gain[nc]);  // also the forward's scale
      const A b = relu ? static_cast<A>(relu_bias[nc]) : A(0);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A xj = static_cast<A>(xv.v[j]);
        const A gj = masked_dy<T, A>(gv.v[j], xj, m, k1, b, relu);
        out.v[j] = static_cast<T>(k1 * gj + k2 * (xj - m) + k0);
      }
    }
    store<T, V>(dx + e, out);
  }
}

// ---- backward reductions -------------------------------------------------------------------

// Per-(n, c) run sums of dy and dy*(x - mean) for NCHW: a group of G lanes (a power of two,
// about the run's length in vectors) per work item, 32/G items per warp, warps grid-strided
// over the N*C*splits items. Item i is piece sp = i / (N*C) of run r = i % (N*C); it writes
// raw sums into part_b/part_q at [sp][n][c] (= sp * N*C + r). relu_bias != nullptr: dy masked
// by the forward's output (gain, invstd: the forward's; unused otherwise).
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
nchw_reduce(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,
            const T* __restrict__ gain, const T* __restrict__ relu_bias, const A* __restrict__ invstd,
            int64_t N, int64_t C, int64_t HW, int G, int64_t splits, A* __restrict__ part_b,
            A* __restrict__ part_q) {
  const bool relu = relu_bias != nullptr;
  const int lane = threadIdx.x % 32;
  const int g = lane / G, li = lane % G, per_warp = 32 / G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kThreads / 32;
  const int64_t runs = N * C, items = runs * splits, hwv = HW / V;
  for (int64_t base = warp * per_warp; base < items; base += warps * per_warp) {  // warp-uniform
    const int64_t item = base + g;
    A s = 0, q = 0;
    if (item < items) {
      const int64_t sp = item / runs, r = item - sp * runs;
      const int64_t i0 = hwv * sp / splits, i1 = hwv * (sp + 1) / splits;
      const A m = mean[r % C];
      const A scale = relu ? invstd[r % C] * static_cast<A>(gain[r]) : A(0);
      const A shift = relu ? static_cast<A>(relu_bias[r]) : A(0);
      const T* xs = x + r * HW;
      const T* gs = dy + r * HW;
#pragma unroll 4
      for (int64_t i = i0 + li; i < i1; i += G) {
        const Vec<T, V> xv = load<T, V>(xs + i * V);
        const Vec<T, V> gv = load<T, V>(gs + i * V);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xj = static_cast<A>(xv.v[j]);
          const A gj = masked_dy<T, A>(gv.v[j], xj, m, scale, shift, relu);
          s += gj;
          q += gj * (xj - m);
        }
      }
    }
    for (int o = G / 2; o > 0; o >>= 1) {
      s += __shfl_down_sync(0xffffffffu, s, o, G);
      q += __shfl_down_sync(0xffffffffu, q, o, G);
    }
    if (item < items && li == 0) {
      part_b[item] = s;
      part_q[item] = q;
    }
  }
}

// channels_last: grid (ceil(C / (lanes V)), min(N, 65535), splits), 1-d blocks as in
// nhwc_stats_partial; block (cx, ny, sp) sums its share of the HW rows of samples ny, ny +
// gridDim.y, ... (so any N works). Partials at [sp][n][c].
template <typename T, typename A, int V>
__global__ void __launch_bounds__(kThreads)
nhwc_reduce(const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,
            const T* __restrict__ gain, const T* __restrict__ relu_bias, const A* __restrict__ invstd,
            int64_t N, int64_t C, int64_t HW, A* __restrict__ part_b, A* __restrict__ part_q) {
  __shared__ A ss[V][kThreads], sq[V][kThreads];
  const bool relu = relu_bias != nullptr;
  const Lanes L = lanes_for(C, V);
  const int lane = threadIdx.x % L.lanes, row = threadIdx.x / L.lanes;
  const int splits = gridDim.z, sp = blockIdx.z;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * L.lanes + lane) * V;
  const int64_t h0 = HW * sp / splits, h1 = HW * (sp + 1) / splits;
  A m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = c0 + j < C ? mean[c0 + j] : A(0);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {  // block-uniform: the barrier below is safe
    A s[V], q[V], scale[V], shift[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s[j] = q[j] = 0;
      const bool in = relu && c0 + j < C;  // the forward's scale and shift of sample n
      scale[j] = in ? invstd[c0 + j] * static_cast<A>(gain[n * C + c0 + j]) : A(0);
      shift[j] = in ? static_cast<A>(relu_bias[n * C + c0 + j]) : A(0);
    }
    if (c0 < C) {
#pragma unroll 4
      for (int64_t h = h0 + row; h < h1; h += L.rows) {
        const int64_t off = (n * HW + h) * C + c0;
        const Vec<T, V> xv = load<T, V>(x + off);
        const Vec<T, V> gv = load<T, V>(dy + off);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const A xj = static_cast<A>(xv.v[j]);
          const A gj = masked_dy<T, A>(gv.v[j], xj, m[j], scale[j], shift[j], relu);
          s[j] += gj;
          q[j] += gj * (xj - m[j]);
        }
      }
    }
    sum_block_rows<A, V>(s, q, ss, sq, L);
    if (row == 0 && c0 < C) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        part_b[(sp * N + n) * C + c0 + j] = s[j];
        part_q[(sp * N + n) * C + c0 + j] = q[j];
      }
    }
    __syncthreads();  // ss/sq are written again by the next sample
  }
}

// grid ceil(C / 32), block (32, kRowsPerBlock): lanes over channels, rows over samples.
// Adds the split partials per (n, c) -> grad_bias = sum dy, grad_gain = invstd * sum dy (x-mean)
// (acc dtype, and rounded to T when out_* are given); with gain, also the per-channel
// A = sum_n gain*grad_bias and B = sum_n gain*grad_gain (zeros unless training).
template <typename T, typename A>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
finalize_backward(const T* __restrict__ gain, const A* __restrict__ invstd, int64_t N, int64_t C,
                  int splits, const A* __restrict__ part_b, const A* __restrict__ part_q,
                  bool training, A* __restrict__ gb_acc, A* __restrict__ gg_acc,
                  T* __restrict__ gb_out, T* __restrict__ gg_out, A* __restrict__ sum_a,
                  A* __restrict__ sum_b) {
  __shared__ A sa[kRowsPerBlock][32], sb[kRowsPerBlock][32];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A a = 0, b = 0;
  if (c < C) {
    const A is = invstd[c];
    for (int64_t n = threadIdx.y; n < N; n += kRowsPerBlock) {
      A s = 0, q = 0;
      for (int sp = 0; sp < splits; ++sp) {
        s += part_b[(sp * N + n) * C + c];
        q += part_q[(sp * N + n) * C + c];
      }
      q *= is;
      const int64_t k = n * C + c;
      if (gb_acc != nullptr) {
        gb_acc[k] = s;
        gg_acc[k] = q;
      }
      if (gb_out != nullptr) {
        gb_out[k] = static_cast<T>(s);
        gg_out[k] = static_cast<T>(q);
      }
      if (gain != nullptr) {
        const A g = static_cast<A>(gain[k]);
        a += g * s;
        b += g * q;
      }
    }
  }
  sa[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < C && sum_a != nullptr) {
    for (int t = 1; t < kRowsPerBlock; ++t) {
      a += sa[t][threadIdx.x];
      b += sb[t][threadIdx.x];
    }
    sum_a[c] = training ? a : A(0);
    sum_b[c] = training ? b : A(0);
  }
}

template <typename R, typename A>
__global__ void update_running_kernel(R* __restrict__ rm, R* __restrict__ rv, const A* __restrict__ mean,
                                      const A* __restrict__ var, int64_t C, double unbias,
                                      double momentum) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A mo = static_cast<A>(momentum);
  rm[c] = static_cast<R>(static_cast<A>(rm[c]) * (A(1) - mo) + mean[c] * mo);
  rv[c] = static_cast<R>(static_cast<A>(rv[c]) * (A(1) - mo) + var[c] * static_cast<A>(unbias) * mo);
}

// ---- host side -----------------------------------------------------------------------------

struct Launch {
  cudaStream_t stream;
  int sms;
};

Launch launch_config() { return {at::cuda::getCurrentCUDAStream(), sm_count()}; }

int elementwise_grid(int64_t units, int sms) {
  return static_cast<int>(clamp64((units + kThreads - 1) / kThreads, 1, static_cast<int64_t>(sms) * 16));
}

// Per-channel (mean, var[, invstd]) of x (acc dtype, shape (C,)), 2 launches.
template <typename T, typename A>
void batch_stats(const at::Tensor& x, bool nhwc, double eps, at::Tensor& mean, at::Tensor& var,
                 at::Tensor* invstd, const Launch& L) {
  const Dims d = dims(x);
  const T* px = x.const_data_ptr<T>();
  constexpr int V = vec_width<T>();
  int64_t splits;
  at::Tensor part;
  if (!nhwc) {
    const int64_t per_channel = d.N * d.HW;
    splits = clamp64((8LL * L.sms + d.C - 1) / d.C, 1, std::max<int64_t>(1, per_channel / (kThreads * 16)));
    splits = std::min<int64_t>(splits, 1024);
    part = at::empty({2, d.C * splits}, x.options().dtype(mean.scalar_type()));
    A* ps = part.mutable_data_ptr<A>();
    const dim3 grid(static_cast<unsigned>(d.C), static_cast<unsigned>(splits));
    const bool vec = d.HW % V == 0 && aligned16(px), small = small_index(x.numel());
    auto kernel = vec ? (small ? nchw_stats_partial<T, A, V, true> : nchw_stats_partial<T, A, V, false>)
                      : (small ? nchw_stats_partial<T, A, 1, true> : nchw_stats_partial<T, A, 1, false>);
    kernel<<<grid, kThreads, 0, L.stream>>>(px, d.N, d.C, d.HW, ps, ps + d.C * splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const bool vec = d.C % V == 0 && aligned16(px);
    const Lanes lanes = lanes_for(d.C, vec ? V : 1);
    const int64_t width = static_cast<int64_t>(lanes.lanes) * (vec ? V : 1);
    const int64_t gx = (d.C + width - 1) / width;
    const int64_t rows = d.N * d.HW;
    // at least 16 rows per thread and split
    splits = clamp64((4LL * L.sms + gx - 1) / gx, 1, std::max<int64_t>(1, rows / (lanes.rows * 16LL)));
    splits = std::min<int64_t>(splits, 65535);
    part = at::empty({2, d.C * splits}, x.options().dtype(mean.scalar_type()));
    A* ps = part.mutable_data_ptr<A>();
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(splits));
    if (vec) {
      nhwc_stats_partial<T, A, V><<<grid, kThreads, 0, L.stream>>>(px, rows, d.C, ps, ps + d.C * splits);
    } else {
      nhwc_stats_partial<T, A, 1><<<grid, kThreads, 0, L.stream>>>(px, rows, d.C, ps, ps + d.C * splits);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const A* ps = part.const_data_ptr<A>();
  constexpr int kWarpsPerBlock = kThreads / 32;  // one warp per channel
  finalize_stats<T, A><<<static_cast<unsigned>((d.C + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads, 0, L.stream>>>(
      px, nhwc, d.C, d.HW, static_cast<int>(splits), d.N * d.HW, ps, ps + d.C * splits, eps,
      mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(),
      invstd != nullptr ? invstd->mutable_data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void launch_apply(const at::Tensor& x, const at::Tensor& gain, const at::Tensor& bias,
                  const at::Tensor& mean, const at::Tensor& invstd, bool nhwc, bool relu, at::Tensor& y,
                  const Launch& L) {
  const Dims d = dims(x);
  constexpr int V = vec_width<T>();
  const T* px = x.const_data_ptr<T>();
  T* py = y.mutable_data_ptr<T>();
  // channels_last vectors also load V channels' gain/bias/mean/invstd at once: all aligned
  const bool coef_aligned = !nhwc || (aligned16(gain.const_data_ptr()) && aligned16(bias.const_data_ptr()) &&
                                      aligned16(mean.const_data_ptr()) && aligned16(invstd.const_data_ptr()));
  const bool vec = (nhwc ? d.C % V == 0 : d.HW % V == 0) && aligned16(px) && aligned16(py) && coef_aligned;
  const int64_t numel = x.numel();
  const int grid = elementwise_grid(vec ? numel / V : numel, L.sms);
  // numel >= 2^32 is served by the 64-bit-index variants (as the scalar path is for rows of an
  // odd length or misaligned views).
  auto kernel = small_index(numel)
      ? (nhwc ? (vec ? apply_kernel<T, A, V, true, true> : apply_kernel<T, A, 1, true, true>)
              : (vec ? apply_kernel<T, A, V, false, true> : apply_kernel<T, A, 1, false, true>))
      : (nhwc ? (vec ? apply_kernel<T, A, V, true, false> : apply_kernel<T, A, 1, true, false>)
              : (vec ? apply_kernel<T, A, V, false, false> : apply_kernel<T, A, 1, false, false>));
  kernel<<<grid, kThreads, 0, L.stream>>>(px, gain.const_data_ptr<T>(), bias.const_data_ptr<T>(),
                                          mean.const_data_ptr<A>(), invstd.const_data_ptr<A>(),
                                          numel, d.C, d.HW, relu, py);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename A>
void launch_elemt(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gain, const T* relu_bias,
                  const at::Tensor& mean, const at::Tensor& invstd, const A* sum_a, const A* sum_b,
                  double inv_count, bool nhwc, at::Tensor& dx, const Launch& L) {
  const Dims d = dims(x);
  constexpr int V = vec_width<T>();
  const T* px = x.const_data_ptr<T>();
  const T* pdy = dy.const_data_ptr<T>();
  T* pdx = dx.mutable_data_ptr<T>();
  const bool coef_aligned = !nhwc || (aligned16(gain.const_data_ptr()) && aligned16(mean.const_data_ptr()) &&
                                      aligned16(invstd.const_data_ptr()) && aligned16(sum_a) && aligned16(sum_b) &&
                                      aligned16(relu_bias));
  const bool vec = (nhwc ? d.C % V == 0 : d.HW % V == 0) && aligned16(px) && aligned16(pdy) &&
                   aligned16(pdx) && coef_aligned;
  const int64_t numel = x.numel();
  const int grid = elementwise_grid(vec ? numel / V : numel, L.sms);
  auto kernel = small_index(numel)
      ? (nhwc ? (vec ? elemt_kernel<T, A, V, true, true> : elemt_kernel<T, A, 1, true, true>)
              : (vec ? elemt_kernel<T, A, V, false, true> : elemt_kernel<T, A, 1, false, true>))
      : (nhwc ? (vec ? elemt_kernel<T, A, V, true, false> : elemt_kernel<T, A, 1, true, false>)
              : (vec ? elemt_kernel<T, A, V, false, false> : elemt_kernel<T, A, 1, false, false>));
  kernel<<<grid, kThreads, 0, L.stream>>>(pdy, px, gain.const_data_ptr<T>(), relu_bias, mean.const_data_ptr<A>(),
                                          invstd.const_data_ptr<A>(), sum_a, sum_b, inv_count,
                                          numel, d.C, d.HW, pdx);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Raw per-(n, c) sums into part (shape (2, splits, N, C)); returns splits. relu_bias != nullptr:
// dy masked by the forward's output, recomputed with gain (contiguous (N, C)) and invstd.
template <typename T, typename A>
int64_t launch_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                      const T* gain, const T* relu_bias, const A* invstd, bool nhwc, at::Tensor& part,
                      const Launch& L) {
  const Dims d = dims(x);
  constexpr int V = vec_width<T>();
  const T* px = x.const_data_ptr<T>();
  const T* pdy = dy.const_data_ptr<T>();
  const A* pm = mean.const_data_ptr<A>();
  const at::TensorOptions acc = x.options().dtype(mean.scalar_type());
  if (!nhwc) {
    const bool vec = d.HW % V == 0 && aligned16(px) && aligned16(pdy);
    const int64_t hwv = vec ? d.HW / V : d.HW;
    int G = 1;
    while (G < 32 && G < hwv) G *= 2;
    const int64_t runs = d.N * d.C;
    // Few long runs (small batch, high resolution: N=4, C=16, 128x128 is 64 runs, 64 warps,
    // 8 blocks for 132 SMs) split each run over several warps, down to 4 vectors per lane,
    // until the grid holds ~4 blocks per SM; finalize_backward adds the pieces in order.
    int64_t splits = 1;
    const int64_t target_warps = 4LL * L.sms * (kThreads / 32);
    if (G == 32 && runs < target_warps) {
      splits = clamp64((target_warps + runs - 1) / runs, 1, std::max<int64_t>(1, hwv / (32 * 4)));
      splits = std::min<int64_t>(splits, 1024);
    }
    part = at::empty({2, splits, d.N, d.C}, acc);
    A* pp = part.mutable_data_ptr<A>();
    const int64_t per_warp = 32 / G;
    const int64_t warps = (runs * splits + per_warp - 1) / per_warp;
    const int grid = static_cast<int>(clamp64((warps * 32 + kThreads - 1) / kThreads, 1, static_cast<int64_t>(L.sms) * 16));
    A* pq = pp + splits * runs;
    if (vec) {
      nchw_reduce<T, A, V><<<grid, kThreads, 0, L.stream>>>(pdy, px, pm, gain, relu_bias, invstd, d.N, d.C,
                                                            d.HW, G, splits, pp, pq);
    } else {
      nchw_reduce<T, A, 1><<<grid, kThreads, 0, L.stream>>>(pdy, px, pm, gain, relu_bias, invstd, d.N, d.C,
                                                            d.HW, G, splits, pp, pq);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return splits;
  }
  const bool vec = d.C % V == 0 && aligned16(px) && aligned16(pdy);
  const Lanes lanes = lanes_for(d.C, vec ? V : 1);
  const int64_t width = static_cast<int64_t>(lanes.lanes) * (vec ? V : 1);
  const int64_t gx = (d.C + width - 1) / width;
  // grid.y walks the samples (any N: a block takes samples y, y + 65535, ...)
  const int64_t gy = std::min<int64_t>(d.N, 65535);
  int64_t splits = clamp64((4LL * L.sms + gx * gy - 1) / (gx * gy), 1,
                           std::max<int64_t>(1, d.HW / (lanes.rows * 16LL)));
  splits = std::min<int64_t>(splits, 65535);
  part = at::empty({2, splits, d.N, d.C}, acc);
  A* pp = part.mutable_data_ptr<A>();
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(splits));
  if (vec) {
    nhwc_reduce<T, A, V><<<grid, kThreads, 0, L.stream>>>(pdy, px, pm, gain, relu_bias, invstd, d.N, d.C, d.HW,
                                                          pp, pp + splits * d.N * d.C);
  } else {
    nhwc_reduce<T, A, 1><<<grid, kThreads, 0, L.stream>>>(pdy, px, pm, gain, relu_bias, invstd, d.N, d.C, d.HW,
                                                          pp, pp + splits * d.N * d.C);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits;
}


template <typename T, typename A>
void launch_finalize_backward(const T* gain, const at::Tensor& invstd, Dims d, int64_t splits,
                              const at::Tensor& part, bool training, A* gb_acc, A* gg_acc, T* gb_out,
                              T* gg_out, A* sum_a, A* sum_b, const Launch& L) {
  const A* pp = part.const_data_ptr<A>();
  const dim3 block(32, kRowsPerBlock);
  finalize_backward<T, A><<<static_cast<unsigned>((d.C + 31) / 32), block, 0, L.stream>>>(
      gain, invstd.const_data_ptr<A>(), d.N, d.C, static_cast<int>(splits), pp,
      pp + splits * d.N * d.C, training, gb_acc, gg_acc, gb_out, gg_out, sum_a, sum_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor as_acc(const at::Tensor& t, const at::Tensor& x) {
  return t.to(acc_dtype(x.scalar_type())).contiguous();
}

// ---- ops ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cbn_forward_cuda(
    const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double eps, bool relu) {
  check_forward(x_in, gain_in, bias_in, running_mean, running_var, training);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const Dims d = dims(x);
  const at::TensorOptions acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(layout_of(x_in)));
  at::Tensor mean, var, invstd;
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_forward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    if (training) {
      mean = at::empty({d.C}, acc);
      var = at::empty({d.C}, acc);
      invstd = at::empty({d.C}, acc);
      constexpr int V = vec_width<scalar_t>();
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      scalar_t* py = y.mutable_data_ptr<scalar_t>();
      if (!nhwc && d.HW % V == 0 && aligned16(px) && aligned16(py) &&
          d.N * (d.HW / V) <= static_cast<int64_t>(kThreads) * kHeld) {
        nchw_forward_held<scalar_t, A, V><<<static_cast<unsigned>(d.C), kThreads, 0, L.stream>>>(
            px, gain.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), d.N, d.C, d.HW, eps, relu,
            py, mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(), invstd.mutable_data_ptr<A>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;  // from the dispatch lambda: y and the statistics are written
      }
      batch_stats<scalar_t, A>(x, nhwc, eps, mean, var, &invstd, L);
    } else {
      mean = as_acc(*running_mean, x).clone();
      var = as_acc(*running_var, x).clone();
      invstd = var.add(eps).rsqrt();
    }
    launch_apply<scalar_t, A>(x, gain, bias, mean, invstd, nhwc, relu, y, L);
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cbn_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& gain_in,
    const at::Tensor& mean_in, const at::Tensor& invstd_in, bool training, bool relu,
    const std::optional<at::Tensor>& bias_in) {
  check_backward(grad_y, x_in, gain_in, mean_in, invstd_in);
  check_backward_relu(x_in, relu, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(layout_of(x_in));
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor bias = relu ? bias_in->contiguous() : at::Tensor();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout_of(x_in)));
  at::Tensor grad_gain = at::empty({d.N, d.C}, gain.options());
  at::Tensor grad_bias = at::empty({d.N, d.C}, gain.options());
  at::Tensor sums = at::empty({2, d.C}, mean.options());
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    at::Tensor part;
    const scalar_t* pg = gain.const_data_ptr<scalar_t>();
    const scalar_t* relu_bias = relu ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int64_t splits =
        launch_reduce<scalar_t, A>(dy, x, mean, pg, relu_bias, invstd.const_data_ptr<A>(), nhwc, part, L);
    A* ps = sums.mutable_data_ptr<A>();
    launch_finalize_backward<scalar_t, A>(gain.const_data_ptr<scalar_t>(), invstd, d, splits, part,
                                          training, nullptr, nullptr,
                                          grad_bias.mutable_data_ptr<scalar_t>(),
                                          grad_gain.mutable_data_ptr<scalar_t>(), ps, ps + d.C, L);
    launch_elemt<scalar_t, A>(dy, x, gain, relu_bias, mean, invstd, training ? ps : nullptr,
                              training ? ps + d.C : nullptr, 1.0 / static_cast<double>(d.N * d.HW),
                              nhwc, dx, L);
  });
  return {dx, grad_gain, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> cbn_stats_cuda(const at::Tensor& x_in) {
  check_x(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::TensorOptions acc = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({x.size(1)}, acc), var = at::empty({x.size(1)}, acc);
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_stats_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    batch_stats<scalar_t, A>(x, nhwc, 0.0, mean, var, nullptr, L);
  });
  return {mean, var};
}

at::Tensor cbn_apply_cuda(const at::Tensor& x_in, const at::Tensor& gain_in, const at::Tensor& bias_in,
                          const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_apply(x_in, gain_in, bias_in, mean_in, invstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::Tensor gain = gain_in.contiguous(), bias = bias_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(layout_of(x_in)));
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_apply_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    launch_apply<scalar_t, A>(x, gain, bias, mean, invstd, nhwc, /*relu=*/false, y, L);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> cbn_backward_reduce_cuda(const at::Tensor& grad_y,
                                                            const at::Tensor& x_in,
                                                            const at::Tensor& mean_in,
                                                            const at::Tensor& invstd_in) {
  check_backward_reduce(grad_y, x_in, mean_in, invstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(layout_of(x_in));
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const Dims d = dims(x);
  at::Tensor gg = at::empty({d.N, d.C}, mean.options()), gb = at::empty({d.N, d.C}, mean.options());
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_reduce_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    at::Tensor part;
    const int64_t splits = launch_reduce<scalar_t, A>(dy, x, mean, nullptr, nullptr, nullptr, nhwc, part, L);
    launch_finalize_backward<scalar_t, A>(nullptr, invstd, d, splits, part, true,
                                          gb.mutable_data_ptr<A>(), gg.mutable_data_ptr<A>(), nullptr,
                                          nullptr, nullptr, nullptr, L);
  });
  return {gg, gb};
}

at::Tensor cbn_backward_elemt_cuda(const at::Tensor& grad_y, const at::Tensor& x_in,
                                   const at::Tensor& gain_in, const at::Tensor& mean_in,
                                   const at::Tensor& invstd_in, const at::Tensor& sum_dxhat,
                                   const at::Tensor& sum_dxhat_xhat, int64_t count) {
  check_backward_elemt(grad_y, x_in, gain_in, mean_in, invstd_in, sum_dxhat, sum_dxhat_xhat, count);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_nhwc(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous(layout_of(x_in));
  const at::Tensor gain = gain_in.contiguous();
  const at::Tensor mean = as_acc(mean_in, x), invstd = as_acc(invstd_in, x);
  const at::Tensor sa = as_acc(sum_dxhat, x), sb = as_acc(sum_dxhat_xhat, x);
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout_of(x_in)));
  const Launch L = launch_config();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cbn_backward_elemt_cuda", [&] {
    using A = at::acc_type<scalar_t, true>;
    launch_elemt<scalar_t, A>(dy, x, gain, nullptr, mean, invstd, sa.const_data_ptr<A>(), sb.const_data_ptr<A>(),
                              1.0 / static_cast<double>(count), nhwc, dx, L);
  });
  return dx;
}

void cbn_update_running_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                             const at::Tensor& mean, const at::Tensor& var, int64_t count,
                             double momentum) {
  check_update_running(running_mean, running_var, mean, var, count);
  const c10::cuda::CUDAGuard guard(running_mean.device());
  const int64_t C = running_mean.numel();
  if (C == 0) return;  // as on the CPU; a grid of 0 blocks is a launch error
  // One launch for the buffers a module holds (contiguous, one dtype; fp32/fp64 statistics);
  // strided or mixed-dtype buffers take the CPU's at:: ops, so both devices accept the same.
  const bool fused = running_mean.is_contiguous() && running_var.is_contiguous() &&
                     running_mean.scalar_type() == running_var.scalar_type() &&
                     mean.scalar_type() == var.scalar_type() &&
                     (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble);
  if (!fused) {
    update_running_with_aten(running_mean, running_var, mean, var, count, momentum);
    return;
  }
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>((C + 255) / 256);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "cbn_update_running_cuda_acc", [&] {
    using A = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "cbn_update_running_cuda", [&] {
      update_running_kernel<scalar_t, A><<<grid, 256, 0, stream>>>(
          running_mean.mutable_data_ptr<scalar_t>(), running_var.mutable_data_ptr<scalar_t>(),
          m.const_data_ptr<A>(), v.const_data_ptr<A>(), C, unbias, momentum);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CUDA, m) {
  m.impl("conditional_batch_norm", &cbn_forward_cuda);
  m.impl("conditional_batch_norm_backward", &cbn_backward_cuda);
  m.impl("conditional_batch_norm_stats", &cbn_stats_cuda);
  m.impl("conditional_batch_norm_apply", &cbn_apply_cuda);
  m.impl("conditional_batch_norm_backward_reduce", &cbn_backward_reduce_cuda);
  m.impl("conditional_batch_norm_backward_elemt", &cbn_backward_elemt_cuda);
  m.impl("conditional_batch_norm_update_running", &cbn_update_running_cuda);
}

}  // namespace fastinv
