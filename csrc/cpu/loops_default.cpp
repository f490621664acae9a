// The CPU loops for the instruction set the compiler targets by default (x86-64: SSE2): the
// baseline every machine runs, and FASTINV_CPU_CAPABILITY=default. See capability.cpp.
#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "cbn_math.h"
#include "cpu/loops.h"

#define FASTINV_LOOPS_BASELINE 1  // fp16 conversions as before dispatch: see to_acc(fp16)
#include "cpu/loops_impl.h"

namespace fastinv {
namespace cpu {
const LoopTable& loop_table_default() { return kTable; }
}  // namespace cpu
}  // namespace fastinv
