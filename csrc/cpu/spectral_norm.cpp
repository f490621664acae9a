// CPU kernels of the multi-tensor spectral norm (schemas, reference and the math in
// fastinv/ops/spectral_norm.py; CUDA twin in csrc/cuda/spectral_norm.cu).
//
// Each weight is a row-major matrix W (rows x cols). One power iteration,
//   t = W v,  u = t / max(|t|, eps),  w = Wᵀ u = (Wᵀ t) / max(|t|, eps),  v = w / max(|w|, eps),
// reads W ONCE: a work item owns a few rows and, row by row, takes t_r = W_r · v and then adds
// t_r W_r into its own partial Wᵀt (the row is still in L1). σ = uᵀ W v = w · v needs no more
// passes. Then out = W / σ. The work is cut into items of ~64K elements over ALL weights
// together, so 60 small weights or one big one keep both cores busy; item boundaries depend
// only on the shapes and partial sums are added in item order, so results do not depend on
// the thread count. Accumulation in float (double for double weights).
//
// Backward: c = (Σ g∘W) / σ² per weight (chunked partial dots), then dW = g / σ - c u vᵀ.
//
// The loops over W and its gradient (cpu/loops_impl.h) are compiled per instruction set and
// chosen at runtime (cpu/capability.cpp); the O(rows + cols) vector work stays here.
#include <ATen/ATen.h>  // host-only: the whole of ATen (the .cu files include only what they use)
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/dispatch.h"
#include "spectral_norm.h"

namespace fastinv {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kItemElems = 1 << 16;  // elements of W per work item
constexpr int64_t kMinRowsPerItem = 8;   // partial Wᵀt sums cost at most 1/8 of W

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// sum_c a[c] * b[c] with kLanes independent accumulators (vectorised without -ffast-math), for
// the acc_t vectors here; the loops over W: cpu/loops_impl.h.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const acc_t* b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += static_cast<acc_t>(a[c + j]) * b[c + j];
  }
  acc_t s = 0;
  for (; c < n; ++c) s += static_cast<acc_t>(a[c]) * b[c];
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

template <typename acc_t>
inline acc_t norm2(const acc_t* x, int64_t n) {
  return std::sqrt(dot<acc_t, acc_t>(x, x, n));
}

struct RowItem {
  int64_t k, r0, r1;
  int64_t partial;  // offset of this item's cols-long partial Wᵀt
};

struct ElemItem {
  int64_t k, e0, e1;
};

std::vector<ElemItem> elem_items(const std::vector<at::Tensor>& W) {
  std::vector<ElemItem> items;
  for (int64_t k = 0; k < static_cast<int64_t>(W.size()); ++k) {
    const int64_t n = W[k].numel();
    for (int64_t e = 0; e < n; e += kItemElems) items.push_back({k, e, std::min(n, e + kItemElems)});
  }
  return items;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
spectral_norm_cpu(at::TensorList weights, at::TensorList us, at::TensorList vs, int64_t n_iter, double eps) {
  sn::check_forward(weights, us, vs, n_iter, eps);
  const int64_t K = static_cast<int64_t>(weights.size());
  if (K == 0) return {{}, {}, {}, at::empty({0}, at::TensorOptions().dtype(at::kFloat))};
  std::vector<at::Tensor> W(K), U(K), V(K), out(K);
  std::vector<int64_t> rows(K), cols(K);
  for (int64_t k = 0; k < K; ++k) {
    W[k] = weights[k].contiguous();
    U[k] = us[k].clone(at::MemoryFormat::Contiguous);
    V[k] = vs[k].clone(at::MemoryFormat::Contiguous);
    out[k] = at::empty(W[k].sizes(), W[k].options());
    rows[k] = W[k].size(0);
    cols[k] = W[k].numel() / rows[k];
  }
  at::Tensor sigma = at::empty({K}, U[0].options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "spectral_norm_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    std::vector<const scalar_t*> wp(K);
    std::vector<acc_t*> up(K), vp(K);
    std::vector<int64_t> t_off(K + 1, 0), p_off(K + 1, 0);
    std::vector<RowItem> row_items;     // rows of the large weights
    std::vector<int64_t> small, large;  // a small weight is one work item from start to end
    for (int64_t k = 0; k < K; ++k) {
      wp[k] = W[k].const_data_ptr<scalar_t>();
      up[k] = U[k].mutable_data_ptr<acc_t>();
      vp[k] = V[k].mutable_data_ptr<acc_t>();
      const int64_t rpi = std::min(rows[k], std::max(kMinRowsPerItem, (kItemElems + cols[k] - 1) / cols[k]));
      const int64_t chunks = (rows[k] + rpi - 1) / rpi;
      (chunks == 1 ? small : large).push_back(k);
      if (chunks > 1) {
        for (int64_t r = 0; r < rows[k]; r += rpi) {
          row_items.push_back({k, r, std::min(rows[k], r + rpi), p_off[k] + (r / rpi) * cols[k]});
        }
      }
      t_off[k + 1] = t_off[k] + rows[k];
      p_off[k + 1] = p_off[k] + chunks * cols[k];
    }
    std::vector<acc_t> t(t_off[K]);
    std::vector<acc_t> partial(p_off[K]);
    acc_t* sig = sigma.mutable_data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);

    const cpu::SnLoops<cpu::raw_t<scalar_t>>& L = cpu::loops_for<scalar_t>().sn;
    // t_r = W_r · v for rows [r0, r1); with s, also s += t_r W_r (the row is still in L1)
    auto row_pass = [&](int64_t k, int64_t r0, int64_t r1, acc_t* s) {
      L.rows(cpu::raw(wp[k]), r0, r1, cols[k], vp[k], t.data() + t_off[k], s);
    };
    // after the row passes of one iteration: Wᵀt = Σ partials (chunk order), then u, v, σ
    auto finish_iteration = [&](int64_t k) {
      const int64_t R = rows[k], C = cols[k];
      acc_t* s = partial.data() + p_off[k];
      const int64_t chunks = (p_off[k + 1] - p_off[k]) / C;
      for (int64_t ch = 1; ch < chunks; ++ch) {
        const acc_t* p = s + ch * C;
        for (int64_t c = 0; c < C; ++c) s[c] += p[c];
      }
      const acc_t* tk = t.data() + t_off[k];
      const acc_t tn = std::max(norm2(tk, R), e);
      for (int64_t r = 0; r < R; ++r) up[k][r] = tk[r] / tn;
      for (int64_t c = 0; c < C; ++c) s[c] = s[c] / tn;  // s = Wᵀ u
      const acc_t sn = std::max(norm2(s, C), e);
      for (int64_t c = 0; c < C; ++c) vp[k][c] = s[c] / sn;
      sig[k] = dot<acc_t, acc_t>(s, vp[k], C);  // uᵀ W v = (Wᵀ u) · v
    };
    // eval: σ = uᵀ (W v) with the stored u, v
    auto finish_eval = [&](int64_t k) { sig[k] = dot<acc_t, acc_t>(up[k], t.data() + t_off[k], rows[k]); };
    // |σ| < eps becomes eps, so that an all-zero weight gives 0, not 0/0 (torch gives NaN)
    auto guard = [&](int64_t k) { sig[k] = std::abs(sig[k]) < e ? e : sig[k]; };
    auto scale = [&](int64_t k, int64_t e0, int64_t e1) {
      L.scale(cpu::raw(wp[k]) + e0, cpu::raw(out[k].mutable_data_ptr<scalar_t>()) + e0, e1 - e0, sig[k]);
    };

    // Small weights: everything in one item while the weight is in cache (one read from memory).
    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const int64_t k = small[i];
        for (int64_t it = 0; it < n_iter; ++it) {
          row_pass(k, 0, rows[k], partial.data() + p_off[k]);
          finish_iteration(k);
        }
        if (n_iter == 0) {
          row_pass(k, 0, rows[k], nullptr);
          finish_eval(k);
        }
        guard(k);
        scale(k, 0, rows[k] * cols[k]);
      }
    });
    if (large.empty()) return;
    // Large weights: stages over items of all of them.
    const int64_t nrow_items = static_cast<int64_t>(row_items.size());
    auto over_rows = [&](bool with_s) {
      at::parallel_for(0, nrow_items, 1, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          const RowItem& item = row_items[i];
          row_pass(item.k, item.r0, item.r1, with_s ? partial.data() + item.partial : nullptr);
        }
      });
    };
    const int64_t nlarge = static_cast<int64_t>(large.size());
    for (int64_t it = 0; it < n_iter; ++it) {
      over_rows(true);
      at::parallel_for(0, nlarge, 1, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) finish_iteration(large[i]);
      });
    }
    if (n_iter == 0) {
      over_rows(false);
      for (int64_t k : large) finish_eval(k);
    }
    for (int64_t k : large) guard(k);
    std::vector<ElemItem> items;
    for (int64_t k : large) {
      const int64_t n = rows[k] * cols[k];
      for (int64_t j = 0; j < n; j += kItemElems) items.push_back({k, j, std::min(n, j + kItemElems)});
    }
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) scale(items[i].k, items[i].e0, items[i].e1);
    });
  });
  return {out, U, V, sigma};
}

std::vector<at::Tensor> spectral_norm_backward_cpu(at::TensorList grads, at::TensorList weights, at::TensorList us,
                                                   at::TensorList vs, const at::Tensor& sigma) {
  sn::check_backward(grads, weights, us, vs, sigma);
  const int64_t K = static_cast<int64_t>(weights.size());
  if (K == 0) return {};
  std::vector<at::Tensor> G(K), W(K), U(K), V(K), dW(K);
  for (int64_t k = 0; k < K; ++k) {
    W[k] = weights[k].contiguous();
    G[k] = grads[k].to(W[k].scalar_type()).contiguous();
    U[k] = us[k].contiguous();
    V[k] = vs[k].contiguous();
    dW[k] = at::empty(W[k].sizes(), W[k].options());
  }
  const at::Tensor sig_t = sigma.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W[0].scalar_type(), "spectral_norm_backward_cpu", [&] {
    using acc_t = acc_type_t<scalar_t>;
    const cpu::SnLoops<cpu::raw_t<scalar_t>>& L = cpu::loops_for<scalar_t>().sn;
    const acc_t* sig = sig_t.const_data_ptr<acc_t>();
    const std::vector<ElemItem> items = elem_items(W);
    const int64_t n_items = static_cast<int64_t>(items.size());
    std::vector<acc_t> pdot(n_items);
    std::vector<acc_t> coef(K, acc_t(0));
    // weights that are ONE item (whole, in cache) are finished by that item in the first pass
    std::vector<char> whole(n_items);
    for (int64_t i = 0; i < n_items; ++i) whole[i] = items[i].e0 == 0 && items[i].e1 == W[items[i].k].numel();
    auto write = [&](const ElemItem& it) {
      const int64_t C = W[it.k].numel() / W[it.k].size(0);
      const scalar_t* g = G[it.k].const_data_ptr<scalar_t>();
      const acc_t* u = U[it.k].const_data_ptr<acc_t>();
      const acc_t* v = V[it.k].const_data_ptr<acc_t>();
      scalar_t* d = dW[it.k].mutable_data_ptr<scalar_t>();
      const acc_t s = sig[it.k], c = coef[it.k];
      // walk the item's elements row by row so the inner loop has no division
      for (int64_t e = it.e0; e < it.e1;) {
        const int64_t r = e / C, c0 = e - r * C, c1 = std::min(C, c0 + (it.e1 - e));
        L.grad(cpu::raw(g) + r * C + c0, v + c0, cpu::raw(d) + r * C + c0, c1 - c0, s, c * u[r]);
        e += c1 - c0;
      }
    };
    at::parallel_for(0, n_items, 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        const ElemItem& it = items[i];
        pdot[i] = L.dot(cpu::raw(G[it.k].const_data_ptr<scalar_t>()) + it.e0,
                        cpu::raw(W[it.k].const_data_ptr<scalar_t>()) + it.e0, it.e1 - it.e0);
        if (whole[i]) {
          coef[it.k] = pdot[i] / (sig[it.k] * sig[it.k]);
          write(it);
        }
      }
    });
    bool any_large = false;
    for (int64_t i = 0; i < n_items; ++i) any_large |= !whole[i];
    if (!any_large) return;
    for (int64_t i = 0; i < n_items; ++i) {
      if (!whole[i]) coef[items[i].k] += pdot[i];  // item order: deterministic
    }
    std::vector<char> done(K, 0);
    for (int64_t i = 0; i < n_items; ++i) {
      const int64_t k = items[i].k;
      if (!whole[i] && !done[k]) {
        coef[k] = coef[k] / (sig[k] * sig[k]);
        done[k] = 1;
      }
    }
    at::parallel_for(0, n_items, 1, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        if (!whole[i]) write(items[i]);
      }
    });
  });
  return dW;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastinv, CPU, m) {
  m.impl("spectral_norm", &spectral_norm_cpu);
  m.impl("spectral_norm_backward", &spectral_norm_backward_cpu);
}

}  // namespace fastinv
