// The bodies of the hot CPU loops (declared in loops.h), compiled once per instruction set:
// loops_default.cpp (the baseline the compiler targets), loops_avx2.cpp and loops_avx512.cpp
// include this file inside their `#pragma GCC target` region, after every header it needs
// (<algorithm>, <cstring>, <vector>, cbn_math.h, cpu/loops.h), so that nothing outside fastinv
// is compiled for the wider instruction set. Everything here has internal linkage (the anonymous
// namespace): each file's copy is its own, and only the table at the end leaves the file.
//
// The loops are the ones the op files held before runtime dispatch, moved here unchanged in
// arithmetic and order, so the baseline table computes what they did bit for bit. The wider
// tables differ where the compiler may reassociate (`omp simd reduction` keeps one partial sum
// per vector lane: 8 or 16 lanes instead of 4) or contract a*b + c into one FMA; loops with
// explicit 16 lanes (hinge sums) and pure elementwise maps without a contractible a*b + c give
// the same bits on every table.
//
// 16-bit floats are widened and narrowed with integer and float operations the vectoriser maps
// onto whole registers (bf16: a shift and an integer rounding; fp16: the FP16-library
// conversions c10 uses without F16C, with their selects written as masks), so the loops over
// bf16/fp16 data are vectorised at the table's width. (GCC 12 vectorises neither _Float16 nor
// F16C scalar conversions.) The baseline table keeps fp16 scalar, as before: see to_acc(fp16).

namespace fastinv {
namespace cpu {
namespace {

using cbn::affine;
using cbn::relu_of;

// ---- widening to the accumulation type and narrowing back -----------------------------------

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(bf16 h) { return f32_from_bits(static_cast<uint32_t>(h.bits) << 16); }

// All ones where cond, else 0: selects written as masks, which the vectoriser takes (a ?: over
// float bit patterns stays a branch in GCC 12, and the loop is then not vectorised).
inline uint32_t mask_of(bool cond) { return 0u - static_cast<uint32_t>(cond); }

// fp16 -> fp32, exact: c10::detail::fp16_ieee_to_fp32_value (from the FP16 library) without F16C.
// The baseline table (FASTINV_LOOPS_BASELINE, loops_default.cpp) keeps c10's ?: form, which GCC
// leaves scalar, as the loops were before dispatch: its fp16 reductions then keep their
// sequential order and the baseline its results bit for bit. The wider tables use masks.
inline float to_acc(fp16 h) {
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & UINT32_C(0x80000000);
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = UINT32_C(0xE0) << 23;
  const float exp_scale = f32_from_bits(UINT32_C(15) << 23);  // 0x1.0p-112f
  const float normalized = f32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = UINT32_C(126) << 23;
  const float denormalized = f32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = UINT32_C(1) << 27;
#if defined(FASTINV_LOOPS_BASELINE)
  return f32_from_bits(sign | (two_w < denormalized_cutoff ? f32_to_bits(denormalized) : f32_to_bits(normalized)));
#else
  const uint32_t denormal = mask_of(two_w < denormalized_cutoff);
  return f32_from_bits(sign | (f32_to_bits(denormalized) & denormal) | (f32_to_bits(normalized) & ~denormal));
#endif
}

inline void put(float& out, float v) { out = v; }
inline void put(double& out, double v) { out = v; }

// Round to nearest even, NaN -> quiet NaN 0x7FC0: c10::BFloat16(float) without its branch.
inline void put(bf16& out, float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  out.bits = static_cast<uint16_t>((f != f) ? 0x7FC0u : rounded);
}

// fp32 -> fp16, round to nearest even: c10::detail::fp16_ieee_from_fp32_value without F16C.
inline void put(fp16& out, float f) {
  const float scale_to_inf = f32_from_bits(UINT32_C(239) << 23);  // 0x1.0p+112f
  const float scale_to_zero = f32_from_bits(UINT32_C(17) << 23);  // 0x1.0p-110f
  float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & UINT32_C(0x80000000);
  uint32_t bias = shl1_w & UINT32_C(0xFF000000);
  if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
  base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
  const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
  const uint32_t nonsign = exp_bits + mantissa_bits;
#if defined(FASTINV_LOOPS_BASELINE)  // c10's form, as to_acc(fp16)
  out.bits = static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT16_C(0x7E00) : nonsign));
#else
  const uint32_t nan = mask_of(shl1_w > UINT32_C(0xFF000000));
  out.bits = static_cast<uint16_t>((sign >> 16) | (UINT32_C(0x7E00) & nan) | (nonsign & ~nan));
#endif
}

// ---- conditional batch norm -------------------------------------------------------------------
//
// Reductions are `omp simd reduction` loops: that licenses the compiler to keep one partial sum
// per vector lane (a fixed, shape-determined order), which plain C++ forbids without
// -ffast-math. Runs longer than kChunk are cut so that fp32 partials never sum more than a few
// thousand values before they are added into double. (The why of the pass structure:
// csrc/cpu/conditional_batch_norm.cpp.)

constexpr int64_t kChunk = 512;

// relu=True backward: does dy pass where the forward stored round_T(v)?
template <typename T, typename A>
inline bool relu_passes(A v) {
  if constexpr (std::is_same_v<T, fp16>) {
    return cbn::relu_passes_fp16(v);
  } else if constexpr (std::is_same_v<T, bf16>) {
    return cbn::relu_passes_bf16(v);
  } else {
    return cbn::relu_passes_exact(v);
  }
}

// dy as the backward sees it: with the fused ReLU, 0 where the forward's output was not > 0
// (recomputed from x: scale, shift are the forward's invstd * gain and bias).
template <bool Relu, typename T, typename A>
inline A masked_dy(T dy, A x, A mean, A scale, A shift) {
  const A g = to_acc(dy);
  if constexpr (Relu) {
    return relu_passes<T, A>(affine(x, mean, scale, shift)) ? g : A(0);
  } else {
    return g;
  }
}

// sum(x - k) and sum((x - k)^2) over one contiguous run, added into s, q.
template <typename T, typename A>
inline void shifted_sums(const T* __restrict p, int64_t n, A k, double& s, double& q) {
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    A ts = 0, tq = 0;
#pragma omp simd reduction(+ : ts, tq)
    for (int64_t i = b; i < e; ++i) {
      const A d = to_acc(p[i]) - k;
      ts += d;
      tq += d * d;
    }
    s += ts;
    q += tq;
  }
}

// sum(dy) and sum(dy * (x - mean)) over one contiguous run (dy masked when Relu).
template <bool Relu, typename T, typename A>
inline std::pair<double, double> run_dot(const T* __restrict dy, const T* __restrict x, int64_t n, A mean,
                                         A scale, A shift) {
  double s = 0, q = 0;
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t e = std::min(n, b + kChunk);
    A ts = 0, tq = 0;
#pragma omp simd reduction(+ : ts, tq)
    for (int64_t i = b; i < e; ++i) {
      const A xv = to_acc(x[i]);
      const A g = masked_dy<Relu, T, A>(dy[i], xv, mean, scale, shift);
      ts += g;
      tq += g * (xv - mean);
    }
    s += ts;
    q += tq;
  }
  return {s, q};
}

// NCHW runs r = n*C + c: shifted partial sums of the run into s[r], q[r].
template <typename T>
void cbn_stats_nchw(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  const int64_t C = p.C, HW = p.HW;
  for (int64_t r = r0; r < r1; ++r) {
    double s = 0, q = 0;
    shifted_sums<T, acc_t<T>>(p.x + r * HW, HW, p.shift[r % C], s, q);
    p.s[r] = s;
    p.q[r] = q;
  }
}

// NHWC samples n: per-sample shifted sums, fp32 row sums flushed into double every 512 rows.
template <typename T>
void cbn_stats_nhwc(const CbnPass<T>& p, int64_t n0, int64_t n1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  const A* k = p.shift;
  std::vector<A> ls(C), lq(C);
  for (int64_t n = n0; n < n1; ++n) {
    double* s = p.s + n * C;
    double* q = p.q + n * C;
    const T* xn = p.x + n * HW * C;
    for (int64_t r0 = 0; r0 < HW; r0 += 512) {
      std::fill(ls.begin(), ls.end(), A(0));
      std::fill(lq.begin(), lq.end(), A(0));
      const int64_t r1 = std::min(HW, r0 + 512);
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = xn + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const A v = to_acc(row[c]) - k[c];
          ls[c] += v;
          lq[c] += v * v;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s[c] += ls[c];
        q[c] += lq[c];
      }
    }
  }
}

template <bool Relu, typename T>
void cbn_apply_nchw(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  for (int64_t r = r0; r < r1; ++r) {  // r = n * C + c, also the (N, C) index of gain/bias
    const int64_t c = r % C;
    const A m = p.mean[c];
    const A scale = p.invstd[c] * to_acc(p.gain[r]);
    const A b = to_acc(p.bias[r]);
    const T* __restrict xs = p.x + r * HW;
    T* __restrict ys = p.out + r * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const A v = affine(to_acc(xs[i]), m, scale, b);
      put(ys[i], Relu ? relu_of(v) : v);
    }
  }
}

template <bool Relu, typename T>
void cbn_apply_nhwc(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  const A* mean = p.mean;
  std::vector<A> scale(C), shift(C);
  int64_t cur = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / HW;
    if (n != cur) {
      cur = n;
      for (int64_t c = 0; c < C; ++c) {
        scale[c] = p.invstd[c] * to_acc(p.gain[n * C + c]);
        shift[c] = to_acc(p.bias[n * C + c]);
      }
    }
    const T* xr = p.x + r * C;
    T* yr = p.out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A v = affine(to_acc(xr[c]), mean[c], scale[c], shift[c]);
      put(yr[c], Relu ? relu_of(v) : v);
    }
  }
}

// Per-(n, c) sums: gb[n,c] = sum dy, gg[n,c] = invstd * sum dy (x - mean). Relu: dy masked
// by the forward's output (gain, bias: the forward's; unused otherwise).
template <bool Relu, typename T>
void cbn_reduce_nchw(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    const A scale = Relu ? p.invstd[c] * to_acc(p.gain[r]) : A(0);
    const A shift = Relu ? to_acc(p.bias[r]) : A(0);
    const auto [s, q] = run_dot<Relu, T, A>(p.dy + r * HW, p.x + r * HW, HW, p.mean[c], scale, shift);
    p.gb[r] = static_cast<A>(s);
    p.gg[r] = static_cast<A>(q * static_cast<double>(p.invstd[c]));
  }
}

template <bool Relu, typename T>
void cbn_reduce_nhwc(const CbnPass<T>& p, int64_t n0, int64_t n1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  const A* mean = p.mean;
  std::vector<A> ls(C), lq(C), scale(C), shift(C);
  std::vector<double> s(C), q(C);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(s.begin(), s.end(), 0.0);
    std::fill(q.begin(), q.end(), 0.0);
    if constexpr (Relu) {
      for (int64_t c = 0; c < C; ++c) {
        scale[c] = p.invstd[c] * to_acc(p.gain[n * C + c]);
        shift[c] = to_acc(p.bias[n * C + c]);
      }
    }
    for (int64_t r0 = 0; r0 < HW; r0 += 512) {
      std::fill(ls.begin(), ls.end(), A(0));
      std::fill(lq.begin(), lq.end(), A(0));
      const int64_t r1 = std::min(HW, r0 + 512);
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = p.x + (n * HW + r) * C;
        const T* gr = p.dy + (n * HW + r) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const A xv = to_acc(xr[c]);
          const A g = masked_dy<Relu, T, A>(gr[c], xv, mean[c], scale[c], shift[c]);
          ls[c] += g;
          lq[c] += g * (xv - mean[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s[c] += ls[c];
        q[c] += lq[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      p.gb[n * C + c] = static_cast<A>(s[c]);
      p.gg[n * C + c] = static_cast<A>(q[c] * static_cast<double>(p.invstd[c]));
    }
  }
}

// grad_x = invstd*gain*dy + c2*(x - mean) + c0, c0 = -invstd*A/M, c2 = -invstd^2*B/M (both 0 in
// eval); dy masked by the forward's output when Relu, bias unused otherwise.
template <bool Relu, typename T>
void cbn_elemt_nchw(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % C;
    const A m = p.mean[c];
    const A c0 = p.c0[c];
    const A c2 = p.c2[c];
    const A c1 = p.invstd[c] * to_acc(p.gain[r]);  // also the forward's scale
    const A shift = Relu ? to_acc(p.bias[r]) : A(0);
    const T* __restrict xs = p.x + r * HW;
    const T* __restrict gs = p.dy + r * HW;
    T* __restrict out = p.out + r * HW;
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) {
      const A xv = to_acc(xs[i]);
      const A g = masked_dy<Relu, T, A>(gs[i], xv, m, c1, shift);
      put(out[i], c1 * g + c2 * (xv - m) + c0);
    }
  }
}

template <bool Relu, typename T>
void cbn_elemt_nhwc(const CbnPass<T>& p, int64_t r0, int64_t r1) {
  using A = acc_t<T>;
  const int64_t C = p.C, HW = p.HW;
  const A* mean = p.mean;
  const A* c0 = p.c0;
  const A* c2 = p.c2;
  std::vector<A> c1(C), shift(C);  // c1: also the forward's scale
  int64_t cur = -1;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / HW;
    if (n != cur) {
      cur = n;
      for (int64_t c = 0; c < C; ++c) {
        c1[c] = p.invstd[c] * to_acc(p.gain[n * C + c]);
        if constexpr (Relu) shift[c] = to_acc(p.bias[n * C + c]);
      }
    }
    const T* xr = p.x + r * C;
    const T* gr = p.dy + r * C;
    T* out = p.out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xv = to_acc(xr[c]);
      const A g = masked_dy<Relu, T, A>(gr[c], xv, mean[c], c1[c], shift[c]);
      put(out[c], c1[c] * g + c2[c] * (xv - mean[c]) + c0[c]);
    }
  }
}

// ---- hinge loss -----------------------------------------------------------------------------

constexpr int kLanes = 16;

// relu(t) that lets NaN through, as torch.relu does (NaN < 0 is false). Written so that the
// compiler emits a select (maxps), not a branch: on random data a branch mispredicts half
// the time.
template <typename A>
inline A relu_nan(A t) { return std::max(t, A(0)); }  // (t < 0) ? 0 : t

// sum over x of relu(1 + sign * x) (Hinge) or of x (linear), 16 independent accumulators.
template <typename T, bool Hinge>
double hinge_sum(const T* x, int64_t n, acc_t<T> sign) {
  using A = acc_t<T>;
  A lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const A v = to_acc(x[i + j]);
      lane[j] += Hinge ? relu_nan<A>(A(1) + sign * v) : v;
    }
  }
  A tail = 0;
  for (; i < n; ++i) {
    const A v = to_acc(x[i]);
    tail += Hinge ? relu_nan<A>(A(1) + sign * v) : v;
  }
  A s = tail;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return static_cast<double>(s);
}

// threshold_backward semantics: NaN passes.
template <typename T>
void hinge_grad(const T* __restrict x, T* __restrict g, int64_t n, acc_t<T> sign, acc_t<T> scale) {
  using A = acc_t<T>;
  for (int64_t i = 0; i < n; ++i) {
    const A t = A(1) + sign * to_acc(x[i]);
    put(g[i], scale * static_cast<A>(!(t <= A(0))));
  }
}

// ---- spectral norm --------------------------------------------------------------------------

// sum_c a[c] * b[c] with kLanes independent accumulators (vectorised without -ffast-math).
template <typename T, typename A>
inline A lanes_dot(const T* a, const A* b, int64_t n) {
  A lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += to_acc(a[c + j]) * b[c + j];
  }
  A s = 0;
  for (; c < n; ++c) s += to_acc(a[c]) * b[c];
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

template <typename T>
acc_t<T> sn_dot(const T* a, const T* b, int64_t n) {
  using A = acc_t<T>;
  A lane[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += to_acc(a[c + j]) * to_acc(b[c + j]);
  }
  A s = 0;
  for (; c < n; ++c) s += to_acc(a[c]) * to_acc(b[c]);
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

template <typename T>
void sn_rows(const T* W, int64_t r0, int64_t r1, int64_t C, const acc_t<T>* v, acc_t<T>* t, acc_t<T>* s) {
  using A = acc_t<T>;
  if (s != nullptr) std::fill(s, s + C, A(0));
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = W + r * C;
    const A tr = lanes_dot<T, A>(row, v, C);
    t[r] = tr;
    if (s != nullptr) {
      for (int64_t c = 0; c < C; ++c) s[c] += tr * to_acc(row[c]);
    }
  }
}

template <typename T>
void sn_scale(const T* __restrict w, T* __restrict out, int64_t n, acc_t<T> sigma) {
  for (int64_t j = 0; j < n; ++j) put(out[j], to_acc(w[j]) / sigma);
}

template <typename T>
void sn_grad(const T* __restrict g, const acc_t<T>* __restrict v, T* __restrict d, int64_t n, acc_t<T> sigma,
             acc_t<T> a) {
  for (int64_t j = 0; j < n; ++j) put(d[j], to_acc(g[j]) / sigma - a * v[j]);
}

// ---- the table ------------------------------------------------------------------------------

template <typename T>
constexpr OpLoops<T> op_loops() {
  return {
      CbnLoops<T>{
          {cbn_stats_nchw<T>, cbn_stats_nhwc<T>},
          {{cbn_apply_nchw<false, T>, cbn_apply_nchw<true, T>}, {cbn_apply_nhwc<false, T>, cbn_apply_nhwc<true, T>}},
          {{cbn_reduce_nchw<false, T>, cbn_reduce_nchw<true, T>},
           {cbn_reduce_nhwc<false, T>, cbn_reduce_nhwc<true, T>}},
          {{cbn_elemt_nchw<false, T>, cbn_elemt_nchw<true, T>}, {cbn_elemt_nhwc<false, T>, cbn_elemt_nhwc<true, T>}},
      },
      HingeLoops<T>{{hinge_sum<T, false>, hinge_sum<T, true>}, hinge_grad<T>},
      SnLoops<T>{sn_rows<T>, sn_scale<T>, sn_dot<T>, sn_grad<T>},
  };
}

// Constant-initialised (addresses only): no code of this file runs before the table is chosen.
constexpr LoopTable kTable = {op_loops<float>(), op_loops<double>(), op_loops<bf16>(), op_loops<fp16>()};

}  // namespace
}  // namespace cpu
}  // namespace fastinv
