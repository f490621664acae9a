// The hot CPU loops of every op, as tables of functions over raw pointers, one table per
// instruction set (csrc/cpu/loops_impl.h, compiled by loops_default.cpp, loops_avx2.cpp and
// loops_avx512.cpp), and the runtime choice between them (capability.cpp, where the why is).
//
// Torch-free on purpose: the AVX2/AVX-512 files include this under a target pragma, and an
// inline torch function compiled there would be an AVX copy of a symbol that the rest of the
// extension also emits; the linker keeps one of them, so baseline code could end up running
// AVX instructions (SIGILL on an older CPU). The op files (csrc/cpu/<op>.cpp) keep the torch
// side: checks, allocation, at::parallel_for, and the O(C) work; they hand ranges of rows to
// these loops. csrc/cpu/dispatch.h maps c10's dtypes onto the raw ones here.
#pragma once

#include <cstdint>
#include <type_traits>

// x86 with GCC or Clang: the AVX2 and AVX-512 tables are compiled (target pragmas and
// __builtin_cpu_supports). Elsewhere only the baseline table exists.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FASTINV_CPU_DISPATCH 1
#else
#define FASTINV_CPU_DISPATCH 0
#endif

namespace fastinv {
namespace cpu {

// The bits of c10::BFloat16 and c10::Half (each one uint16_t, same size and alignment).
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

// Accumulation type: double for double, float for float, bf16 and fp16 (as at::acc_type on CUDA).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ---- conditional batch norm -------------------------------------------------------------------

// One pass of conditional batch norm over x of (N, C, HW) in its layout (NCHW: N*C runs of HW
// values; NHWC: N*HW rows of C values). Each pass reads the fields it names.
template <typename T>
struct CbnPass {
  using A = acc_t<T>;
  int64_t N = 0, C = 0, HW = 0;
  const T* x = nullptr;
  const T* dy = nullptr;    // backward: grad_y in x's layout
  const T* gain = nullptr;  // (N, C)
  const T* bias = nullptr;  // (N, C): apply, and the fused ReLU's backward
  T* out = nullptr;         // y (apply) or grad_x (elemt)
  const A* mean = nullptr;  // (C,)
  const A* invstd = nullptr;
  const A* shift = nullptr;                  // stats: the value K per channel the sums are shifted by
  const A* c0 = nullptr;                     // elemt, per channel: grad_x = c1*dy + c2*(x - mean) + c0
  const A* c2 = nullptr;
  double* s = nullptr;                       // stats: per-(n, c) sum(x - K), zero on entry
  double* q = nullptr;                       //        per-(n, c) sum((x - K)^2), zero on entry
  A* gg = nullptr;                           // reduce: per-(n, c) invstd * sum dy (x - mean)
  A* gb = nullptr;                           //         per-(n, c) sum dy
};

// Each loop runs a range [begin, end) of work items: NCHW runs r = n*C + c (stats, apply, reduce,
// elemt), NHWC samples n (stats, reduce) or rows n*HW + hw (apply, elemt). Index [nhwc][relu].
template <typename T>
struct CbnLoops {
  using Range = void (*)(const CbnPass<T>&, int64_t begin, int64_t end);
  Range stats[2];
  Range apply[2][2];
  Range reduce[2][2];  // relu: dy masked where the forward's output (recomputed) was not > 0
  Range elemt[2][2];
};

// ---- hinge loss ---------------------------------------------------------------------------------

template <typename T>
struct HingeLoops {
  using A = acc_t<T>;
  // Σ relu(1 + sign*x) ([1], NaN kept) or Σ x ([0]) over x[0, n), in 16 lanes: the order
  // depends on n only, and is the same for every instruction set.
  double (*sum[2])(const T* x, int64_t n, A sign);
  // g[i] = scale where 1 + sign*x[i] is > 0 or NaN, else 0
  void (*grad)(const T* x, T* g, int64_t n, A sign, A scale);
};

// ---- spectral norm ------------------------------------------------------------------------------

template <typename T>
struct SnLoops {
  using A = acc_t<T>;
  // Rows [r0, r1) of a row-major W with C columns: t[r] = W_r · v; with s != nullptr also
  // s = Σ_r t[r] W_r (s zeroed first; the row is still in L1).
  void (*rows)(const T* W, int64_t r0, int64_t r1, int64_t C, const A* v, A* t, A* s);
  void (*scale)(const T* w, T* out, int64_t n, A sigma);   // out = w / sigma
  A (*dot)(const T* a, const T* b, int64_t n);             // Σ a b, 16 lanes
  void (*grad)(const T* g, const A* v, T* d, int64_t n, A sigma, A a);  // d = g / sigma - a v
};

template <typename T>
struct OpLoops {
  CbnLoops<T> cbn;
  HingeLoops<T> hinge;
  SnLoops<T> sn;
};

struct LoopTable {
  OpLoops<float> f32;
  OpLoops<double> f64;
  OpLoops<bf16> b16;
  OpLoops<fp16> f16;
};

template <typename T>
const OpLoops<T>& of(const LoopTable& t) {
  if constexpr (std::is_same_v<T, float>) return t.f32;
  else if constexpr (std::is_same_v<T, double>) return t.f64;
  else if constexpr (std::is_same_v<T, bf16>) return t.b16;
  else return t.f16;
}

// ---- the choice (capability.cpp) ------------------------------------------------------------

enum class Capability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

const char* capability_name(Capability c);

struct CapabilityChoice {
  Capability used = Capability::kDefault;     // the table the kernels call
  Capability best = Capability::kDefault;     // the widest this CPU runs (and this build has)
  const char* requested = nullptr;            // FASTINV_CPU_CAPABILITY as given, or nullptr
  const char* error = nullptr;                // an unknown FASTINV_CPU_CAPABILITY: what to set
  const char* warning = nullptr;              // asked for more than the CPU has: what is used
};

// Decided once (the first call), from the CPU and FASTINV_CPU_CAPABILITY.
const CapabilityChoice& capability_choice();

// The table of the chosen capability; throws std::invalid_argument for a bad
// FASTINV_CPU_CAPABILITY (import of fastinv._C reports it first, as a ValueError).
const LoopTable& loops();

// Per capability, defined in loops_<name>.cpp (avx2/avx512 where FASTINV_CPU_DISPATCH).
const LoopTable& loop_table_default();
const LoopTable& loop_table_avx2();
const LoopTable& loop_table_avx512();

}  // namespace cpu
}  // namespace fastinv
