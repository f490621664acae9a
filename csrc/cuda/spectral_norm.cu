// CUDA kernels of the multi-tensor spectral norm (schemas, reference and the math in
// fastinv/ops/spectral_norm.py; CPU twin in csrc/cpu/spectral_norm.cpp).
//
// Multi-tensor apply: the host writes one table (an Entry per weight: pointers and sizes, the
// first block of each weight in each kernel's grid, and zeroed per-weight tickets) into pinned
// memory and copies it to the device with ONE async copy per op call. Every kernel then runs
// over ALL weights in one launch: a block finds its weight by binary search in the table.
//
// Forward, per power iteration (training):
//   row_dot     t = W v                 one warp per row
//   col_dot     Wᵀ t, in row chunks     one thread per column, partial sums per row chunk;
//               the LAST block of each column block (a ticket counter) adds its columns'
//               partials in chunk order, w = Wᵀt/max(|t|,eps), and the last of those per
//               weight (a second ticket) finishes: u = t/max(|t|,eps), v = w/max(|w|,eps),
//               σ = w·v
// then scale    out = W / σ.
// Eval: row_dot whose last block per weight computes σ = u·t; then scale. So a training
// forward with one iteration is 3 launches and the backward 2 (gw_dot: c = Σ g∘W / σ² with the
// same last-block finish; grad: dW = g/σ - c u vᵀ), for the whole model.
// Every reduction has a fixed shape and order (warp shuffles, fixed partial order): results are
// bitwise reproducible run to run. Accumulation in float (double for double weights).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "spectral_norm.h"

namespace fastinv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kRowsPerRowBlock = 32;     // row_dot: 4 rows per warp
constexpr int64_t kRowsPerColBlock = 64;     // col_dot: rows summed per partial
constexpr int64_t kElemsPerBlock = 2048;     // scale, gw_dot, grad: elements per block

struct Entry {
  const void* w;
  void* out;        // forward: W/σ; backward: dW
  const void* g;    // backward: dL/d(W/σ)
  const void* u_in;
  const void* v_in;
  void* u;          // forward: new u (written); backward: saved u (read)
  void* v;
  int64_t rows, cols;
  int64_t t_off;    // into the t workspace (rows of all weights)
  int64_t p_off;    // into the partials workspace
  int64_t cb_off;   // col_dot's column blocks: into col_tickets and the colsq workspace (make_table)
};

// Kernel grids, each as first-block prefix sums over the weights (K + 1 entries).
enum Grid { kRowGrid = 0, kColGrid = 1, kElemGrid = 2, kGradGrid = 3, kNumGrids = 4 };

struct Table {
  const Entry* entries;
  const int64_t* starts;  // kNumGrids x (K + 1)
  unsigned int* tickets;  // K, zero at the start of each kernel (the last block resets its own)
  unsigned int* col_tickets;  // one per col_dot column block of every weight, likewise
  int K;
};

__device__ __forceinline__ int find_weight(const int64_t* starts, int K, int64_t block) {
  int lo = 0, hi = K - 1;  // the last k with starts[k] <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in lane 0
}

// Sum over the block, returned to every thread. Fixed order.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T buf[kWarps + 1];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T s = 0;
    for (int i = 0; i < kWarps; ++i) s += buf[i];
    buf[kWarps] = s;
  }
  __syncthreads();
  const T r = buf[kWarps];
  __syncthreads();  // buf may be reused by the next call
  return r;
}

// True in every thread of the last block of weight k to get here. Each thread's global writes
// are fenced before the ticket, so the last block sees all of them (read with __ldcg: not L1).
__device__ bool is_last_block(unsigned int* ticket, int64_t nblocks) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(ticket, 1u) == static_cast<unsigned int>(nblocks - 1);
  __syncthreads();
  if (last) __threadfence();
  return last;
}

template <typename acc_t>
__device__ __forceinline__ acc_t guard_sigma(acc_t s, acc_t eps) {
  return fabs(s) < eps ? eps : s;  // all-zero W gives 0, not 0/0
}

// t = W v (one warp per row). EVAL: the last block of each weight also takes σ = u·t and
// copies u, v to the outputs.
template <typename scalar_t, typename acc_t, bool EVAL>
__global__ void __launch_bounds__(kThreads)
row_dot_kernel(Table tab, acc_t* t_ws, acc_t* sigma, acc_t eps, bool v_from_out) {
  const int64_t* starts = tab.starts + kRowGrid * (tab.K + 1);
  const int k = find_weight(starts, tab.K, blockIdx.x);
  const Entry e = tab.entries[k];
  const int64_t local = blockIdx.x - starts[k];
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  const acc_t* v = static_cast<const acc_t*>(v_from_out ? e.v : e.v_in);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t r_end = min(e.rows, (local + 1) * kRowsPerRowBlock);
  for (int64_t r = local * kRowsPerRowBlock + warp; r < r_end; r += kWarps) {
    const scalar_t* row = w + r * e.cols;
    acc_t acc = 0;
    for (int64_t c = lane; c < e.cols; c += 32) acc += static_cast<acc_t>(row[c]) * v[c];
    acc = warp_sum(acc);
    if (lane == 0) t_ws[e.t_off + r] = acc;
  }
  if (!EVAL) return;
  if (!is_last_block(tab.tickets + k, starts[k + 1] - starts[k])) return;
  const acc_t* u_in = static_cast<const acc_t*>(e.u_in);
  acc_t part = 0;
  for (int64_t r = threadIdx.x; r < e.rows; r += kThreads) part += u_in[r] * __ldcg(t_ws + e.t_off + r);
  const acc_t s = block_sum(part);
  acc_t* u = static_cast<acc_t*>(e.u);
  acc_t* vo = static_cast<acc_t*>(e.v);
  const acc_t* vi = static_cast<const acc_t*>(e.v_in);
  for (int64_t r = threadIdx.x; r < e.rows; r += kThreads) u[r] = u_in[r];
  for (int64_t c = threadIdx.x; c < e.cols; c += kThreads) vo[c] = vi[c];
  if (threadIdx.x == 0) {
    sigma[k] = guard_sigma(s, eps);
    tab.tickets[k] = 0u;
  }
}

// Partials of Wᵀ t over row chunks; then two levels of last blocks: the last of a column
// block's `chunks` blocks adds that block's partials (chunk order) into (Wᵀ u)_c, and the last
// such column block of the weight normalises: v, σ, u. (One last block per weight used to add
// all chunks x cols partials alone: rows/64 serial reads per column on one SM.)
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
col_dot_kernel(Table tab, const acc_t* t_ws, acc_t* partial, acc_t* colsq, acc_t* sigma, acc_t eps) {
  const int64_t* starts = tab.starts + kColGrid * (tab.K + 1);
  const int k = find_weight(starts, tab.K, blockIdx.x);
  const Entry e = tab.entries[k];
  const int64_t local = blockIdx.x - starts[k];
  const int64_t col_blocks = (e.cols + kThreads - 1) / kThreads;
  const int64_t chunk = local / col_blocks, cb = local % col_blocks;
  const int64_t c = cb * kThreads + threadIdx.x;
  const int64_t chunks = (e.rows + kRowsPerColBlock - 1) / kRowsPerColBlock;
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  const acc_t* t = t_ws + e.t_off;
  if (c < e.cols) {
    acc_t acc = 0;
    const int64_t r_end = min(e.rows, (chunk + 1) * kRowsPerColBlock);
    for (int64_t r = chunk * kRowsPerColBlock; r < r_end; ++r) acc += t[r] * static_cast<acc_t>(w[r * e.cols + c]);
    partial[e.p_off + chunk * e.cols + c] = acc;
  }
  // level 1: this column block's chunks are all written
  if (!is_last_block(tab.col_tickets + e.cb_off + cb, chunks)) return;
  acc_t part = 0;
  for (int64_t r = threadIdx.x; r < e.rows; r += kThreads) part += t[r] * t[r];
  const acc_t tn = max(sqrt(block_sum(part)), eps);  // the same value in every block (fixed order)
  acc_t* p = partial + e.p_off;
  part = 0;
  if (c < e.cols) {
    acc_t s = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += __ldcg(p + ch * e.cols + c);
    const acc_t wc = s / tn;  // (Wᵀ u)_c, kept in chunk 0's row
    p[c] = wc;
    part = wc * wc;
  }
  part = block_sum(part);
  if (threadIdx.x == 0) {
    colsq[e.cb_off + cb] = part;
    tab.col_tickets[e.cb_off + cb] = 0u;
  }
  // level 2: every column block of the weight is folded
  if (!is_last_block(tab.tickets + k, col_blocks)) return;
  part = 0;
  for (int64_t b = threadIdx.x; b < col_blocks; b += kThreads) part += __ldcg(colsq + e.cb_off + b);
  const acc_t wn = max(sqrt(block_sum(part)), eps);
  acc_t* v = static_cast<acc_t*>(e.v);
  part = 0;
  for (int64_t cc = threadIdx.x; cc < e.cols; cc += kThreads) {
    const acc_t wc = __ldcg(p + cc);  // written by other blocks
    const acc_t vc = wc / wn;
    v[cc] = vc;
    part += wc * vc;
  }
  const acc_t s = block_sum(part);  // σ = uᵀ W v = (Wᵀ u) · v
  acc_t* u = static_cast<acc_t*>(e.u);
  for (int64_t r = threadIdx.x; r < e.rows; r += kThreads) u[r] = t[r] / tn;
  if (threadIdx.x == 0) {
    sigma[k] = guard_sigma(s, eps);
    tab.tickets[k] = 0u;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scale_kernel(Table tab, const acc_t* sigma) {
  const int64_t* starts = tab.starts + kElemGrid * (tab.K + 1);
  const int k = find_weight(starts, tab.K, blockIdx.x);
  const Entry e = tab.entries[k];
  const int64_t n = e.rows * e.cols;
  const int64_t begin = (blockIdx.x - starts[k]) * kElemsPerBlock;
  const int64_t end = min(n, begin + kElemsPerBlock);
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  scalar_t* out = static_cast<scalar_t*>(e.out);
  const acc_t s = sigma[k];
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(w[i]) / s);
  }
}

// coef[k] = Σ g∘W / σ²: a partial per block, the last block of each weight adds them in order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gw_dot_kernel(Table tab, acc_t* partial, const acc_t* sigma, acc_t* coef) {
  const int64_t* starts = tab.starts + kElemGrid * (tab.K + 1);
  const int k = find_weight(starts, tab.K, blockIdx.x);
  const Entry e = tab.entries[k];
  const int64_t n = e.rows * e.cols;
  const int64_t begin = (blockIdx.x - starts[k]) * kElemsPerBlock;
  const int64_t end = min(n, begin + kElemsPerBlock);
  const scalar_t* w = static_cast<const scalar_t*>(e.w);
  const scalar_t* g = static_cast<const scalar_t*>(e.g);
  acc_t part = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    part += static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]);
  }
  part = block_sum(part);
  if (threadIdx.x == 0) partial[blockIdx.x] = part;
  const int64_t nblocks = starts[k + 1] - starts[k];
  if (!is_last_block(tab.tickets + k, nblocks)) return;
  part = 0;
  for (int64_t b = threadIdx.x; b < nblocks; b += kThreads) part += __ldcg(partial + starts[k] + b);
  const acc_t total = block_sum(part);
  if (threadIdx.x == 0) {
    const acc_t s = sigma[k];
    coef[k] = total / (s * s);
    tab.tickets[k] = 0u;
  }
}

// dW = g/σ - coef u vᵀ. A block owns whole rows (at least kElemsPerBlock elements' worth).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
grad_kernel(Table tab, const acc_t* sigma, const acc_t* coef) {
  const int64_t* starts = tab.starts + kGradGrid * (tab.K + 1);
  const int k = find_weight(starts, tab.K, blockIdx.x);
  const Entry e = tab.entries[k];
  const int64_t rows_per_block = e.cols >= kElemsPerBlock ? 1 : kElemsPerBlock / e.cols;
  const int64_t r0 = (blockIdx.x - starts[k]) * rows_per_block;
  const int64_t r1 = min(e.rows, r0 + rows_per_block);
  const scalar_t* g = static_cast<const scalar_t*>(e.g) + r0 * e.cols;
  scalar_t* d = static_cast<scalar_t*>(e.out) + r0 * e.cols;
  const acc_t* u = static_cast<const acc_t*>(e.u);
  const acc_t* v = static_cast<const acc_t*>(e.v);
  const acc_t s = sigma[k], c = coef[k];
  const int64_t n = (r1 - r0) * e.cols;
  // A block's share is at most max(kElemsPerBlock, cols) elements: its indices fit 32 bits
  // unless a row has 2^32 columns, so the row of each element takes a 32-bit division (~20
  // instructions) instead of the 64-bit software routine (~100, as much as the element's
  // memory traffic allows).
  if (n <= static_cast<int64_t>(UINT32_MAX) - kThreads) {  // j + kThreads never wraps
    const uint32_t n32 = static_cast<uint32_t>(n), cols32 = static_cast<uint32_t>(e.cols);
    for (uint32_t j = threadIdx.x; j < n32; j += kThreads) {
      const uint32_t r = j / cols32, col = j - r * cols32;
      d[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) / s - (c * u[r0 + r]) * v[col]);
    }
    return;
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t r = j / e.cols, col = j - r * e.cols;
    d[j] = static_cast<scalar_t>(static_cast<acc_t>(g[j]) / s - (c * u[r0 + r]) * v[col]);
  }
}

// Builds the table on the host (pinned) and copies it to the device in one async copy.
struct DeviceTable {
  at::Tensor buffer;
  Table tab;
  std::vector<int64_t> grid_blocks;  // total blocks of each grid
  int64_t col_blocks_total = 0;      // col_dot column blocks over all weights
};

DeviceTable make_table(std::vector<Entry>& entries, const at::Device& device) {
  const int K = static_cast<int>(entries.size());
  int64_t col_blocks_total = 0;
  for (Entry& e : entries) {
    e.cb_off = col_blocks_total;
    col_blocks_total += (e.cols + kThreads - 1) / kThreads;
  }
  std::vector<int64_t> starts(kNumGrids * (K + 1), 0);
  for (int k = 0; k < K; ++k) {
    const Entry& e = entries[k];
    const int64_t blocks[kNumGrids] = {
        (e.rows + kRowsPerRowBlock - 1) / kRowsPerRowBlock,
        ((e.cols + kThreads - 1) / kThreads) * ((e.rows + kRowsPerColBlock - 1) / kRowsPerColBlock),
        (e.rows * e.cols + kElemsPerBlock - 1) / kElemsPerBlock,
        (e.rows + std::max<int64_t>(1, kElemsPerBlock / e.cols) - 1) / std::max<int64_t>(1, kElemsPerBlock / e.cols),
    };
    for (int gi = 0; gi < kNumGrids; ++gi) starts[gi * (K + 1) + k + 1] = starts[gi * (K + 1) + k] + blocks[gi];
  }
  const size_t entries_bytes = sizeof(Entry) * K;
  const size_t starts_bytes = sizeof(int64_t) * starts.size();
  const size_t tickets_bytes = sizeof(unsigned int) * (K + col_blocks_total);
  const size_t total = entries_bytes + starts_bytes + tickets_bytes;
  at::Tensor host = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* h = host.mutable_data_ptr<uint8_t>();
  std::memcpy(h, entries.data(), entries_bytes);
  std::memcpy(h + entries_bytes, starts.data(), starts_bytes);
  std::memset(h + entries_bytes + starts_bytes, 0, tickets_bytes);
  DeviceTable out;
  out.buffer = at::empty({static_cast<int64_t>(total)}, at::TensorOptions().dtype(at::kByte).device(device));
  out.buffer.copy_(host, /*non_blocking=*/true);  // the caching host allocator keeps `host` alive until done
  uint8_t* d = out.buffer.mutable_data_ptr<uint8_t>();
  out.tab.entries = reinterpret_cast<const Entry*>(d);
  out.tab.starts = reinterpret_cast<const int64_t*>(d + entries_bytes);
  out.tab.tickets = reinterpret_cast<unsigned int*>(d + entries_bytes + starts_bytes);
  out.tab.col_tickets = out.tab.tickets + K;
  out.col_blocks_total = col_blocks_total;
  out.tab.K = K;
  for (int gi = 0; gi < kNumGrids; ++gi) out.grid_blocks.push_back(starts[gi * (K + 1) + K]);
  return out;
}

void check_grid(int64_t blocks) {
  TORCH_CHECK(blocks < (int64_t{1} << 31), "fastinv.spectral_norm: ", blocks,
              " blocks exceed the CUDA grid limit; split the weights over several calls");
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
spectral_norm_cuda(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter, double eps) {
  sn::check_forward(weights, us, vs, n_iter, eps);
  const int64_t K = static_cast<int64_t>(weights.size());
  if (K == 0) return {{}, {}, {}, at::empty({0}, at::TensorOptions().dtype(at::kFloat))};
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<at::Tensor> W(K), Uin(K), Vin(K), U(K), V(K), out(K);
  std::vector<Entry> entries(K);
  int64_t t_total = 0, p_total = 0;
  for (int64_t k = 0; k < K; ++k) {
    W[k] = weights[k].contiguous();
    Uin[k] = us[k].contiguous();
    Vin[k] = vs[k].contiguous();
    U[k] = at::empty_like(Uin[k]);
    V[k] = at::empty_like(Vin[k]);
    out[k] = at::empty(W[k].sizes(), W[k].options());
    const int64_t rows = W[k].size(0), cols = W[k].numel() / rows;
    entries[k] = Entry{W[k].const_data_ptr(), out[k].mutable_data_ptr(), nullptr, Uin[k].const_data_ptr(),
                       Vin[k].const_data_ptr(), U[k].mutable_data_ptr(), V[k].mutable_data_ptr(), rows, cols,
                       t_total, p_total};
    t_total += rows;
    p_total += ((rows + kRowsPerColBlock - 1) / kRowsPerColBlock) * cols;
  }
  const at::TensorOptions acc_opts = Uin[0].options();
  at::Tensor sigma = at::empty({K}, acc_opts);
  at::Tensor t_ws = at::empty({t_total}, acc_opts);
  at::Tensor p_ws = at::empty({n_iter > 0 ? p_total : 1}, acc_opts);
  DeviceTable dt = make_table(entries, W[0].device());
  for (int64_t b : dt.grid_blocks) check_grid(b);
  at::Tensor colsq_ws = at::empty({n_iter > 0 ? dt.col_blocks_total : 1}, acc_opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "spectral_norm_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const acc_t e = static_cast<acc_t>(eps);
    acc_t* t = t_ws.mutable_data_ptr<acc_t>();
    acc_t* sig = sigma.mutable_data_ptr<acc_t>();
    const auto row_grid = static_cast<unsigned int>(dt.grid_blocks[kRowGrid]);
    if (n_iter == 0) {
      row_dot_kernel<scalar_t, acc_t, true><<<row_grid, kThreads, 0, stream>>>(dt.tab, t, sig, e, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for (int64_t it = 0; it < n_iter; ++it) {
      row_dot_kernel<scalar_t, acc_t, false><<<row_grid, kThreads, 0, stream>>>(dt.tab, t, sig, e, it > 0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_dot_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(dt.grid_blocks[kColGrid]), kThreads, 0, stream>>>(
          dt.tab, t, p_ws.mutable_data_ptr<acc_t>(), colsq_ws.mutable_data_ptr<acc_t>(), sig, e);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    scale_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(dt.grid_blocks[kElemGrid]), kThreads, 0, stream>>>(
        dt.tab, sig);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, U, V, sigma};
}

std::vector<at::Tensor> spectral_norm_backward_cuda(at::TensorList grads, at::TensorList weights, at::TensorList us,
                                                    at::TensorList vs, const at::Tensor& sigma) {
  sn::check_backward(grads, weights, us, vs, sigma);
  const int64_t K = static_cast<int64_t>(weights.size());
  if (K == 0) return {};
  const c10::cuda::CUDAGuard guard(weights[0].device());
  std::vector<at::Tensor> G(K), W(K), U(K), V(K), dW(K);
  std::vector<Entry> entries(K);
  for (int64_t k = 0; k < K; ++k) {
    W[k] = weights[k].contiguous();
    G[k] = grads[k].to(W[k].scalar_type()).contiguous();
    U[k] = us[k].contiguous();
    V[k] = vs[k].contiguous();
    dW[k] = at::empty(W[k].sizes(), W[k].options());
    const int64_t rows = W[k].size(0), cols = W[k].numel() / rows;
    entries[k] = Entry{W[k].const_data_ptr(), dW[k].mutable_data_ptr(), G[k].const_data_ptr(), nullptr, nullptr,
                       const_cast<void*>(U[k].const_data_ptr()), const_cast<void*>(V[k].const_data_ptr()), rows, cols,
                       0, 0};
  }
  const at::Tensor sig = sigma.contiguous();
  at::Tensor coef = at::empty({K}, sig.options());
  DeviceTable dt = make_table(entries, W[0].device());
  for (int64_t b : dt.grid_blocks) check_grid(b);
  at::Tensor partial = at::empty({dt.grid_blocks[kElemGrid]}, sig.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "spectral_norm_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    gw_dot_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(dt.grid_blocks[kElemGrid]), kThreads, 0, stream>>>(
        dt.tab, partial.mutable_data_ptr<acc_t>(), sig.const_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(dt.grid_blocks[kGradGrid]), kThreads, 0, stream>>>(
        dt.tab, sig.const_data_ptr<acc_t>(), coef.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dW;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CUDA, m) {
  m.impl("spectral_norm", &spectral_norm_cuda);
  m.impl("spectral_norm_backward", &spectral_norm_backward_cuda);
}

}  // namespace fastinv
