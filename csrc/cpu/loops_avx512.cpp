// The CPU loops compiled for AVX-512 F/BW/VL/DQ (Intel Skylake-SP, AMD Zen 4 and later):
// 16 float lanes.
// Chosen at runtime where the CPU has them (capability.cpp). Every header is included before
// the target region, so only fastinv's own loops (internal linkage) get AVX-512 code.
// No AVX512_BF16: its vcvtneps2bf16 flushes subnormals to zero, where c10 and the other
// tables round them; the integer rounding of loops_impl.h vectorises at 16 lanes as well.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cbn_math.h"
#include "cpu/loops.h"

#if FASTINV_CPU_DISPATCH

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq"), \
                                            min_vector_width(512))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,prefer-vector-width=512")
#endif

#include "cpu/loops_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fastinv {
namespace cpu {
const LoopTable& loop_table_avx512() { return kTable; }
}  // namespace cpu
}  // namespace fastinv

#endif  // FASTINV_CPU_DISPATCH
