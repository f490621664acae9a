// The CPU loops compiled for AVX2 + FMA (Intel Haswell, AMD Zen and later): 8 float lanes.
// Chosen at runtime where the CPU has them (capability.cpp). Every header is included before
// the target region, so only fastinv's own loops (internal linkage) get AVX2 code.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cbn_math.h"
#include "cpu/loops.h"

#if FASTINV_CPU_DISPATCH

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#include "cpu/loops_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fastinv {
namespace cpu {
const LoopTable& loop_table_avx2() { return kTable; }
}  // namespace cpu
}  // namespace fastinv

#endif  // FASTINV_CPU_DISPATCH
