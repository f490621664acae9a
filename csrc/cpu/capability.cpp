// Which instruction set the CPU loops run with (issue #11, "CPU kernels that use the machine").
//
// Why: the extension is compiled for the compiler's default target (x86-64: SSE2, 4 float
// lanes), so that one build runs on every x86-64 machine; the hot loops of the ops then leave
// AVX2's 8 lanes and FMA, or AVX-512's 16 lanes, unused on the machines that train. Building
// with -march=native instead would make a .so that dies with SIGILL on an older CPU than the
// build machine's (a cluster's login node vs its workers). So the loops (loops_impl.h) are
// compiled three times, by loops_default.cpp, loops_avx2.cpp (`#pragma GCC target("avx2,fma")`)
// and loops_avx512.cpp (AVX-512 F/BW/VL/DQ), each into its own table of functions, and this
// file picks one table, once, for the life of the process: the widest the CPU runs
// (`__builtin_cpu_supports`, which also checks that the OS saves the wider registers).
// The same idea as ATen's CPU_CAPABILITY (ATEN_CPU_CAPABILITY), in fastinv's own files: ATen's
// build machinery is not available to an extension. Only the loops are built three times;
// checks, allocation and at::parallel_for stay in the op files, compiled once.
//
// Forcing a path: FASTINV_CPU_CAPABILITY=default|avx2|avx512 caps the choice, read once when
// fastinv._C is imported (set it before starting Python). `default` runs the baseline table,
// which computes what the loops computed before this dispatch existed, bit for bit: use it to
// tell a numerical difference of the wider paths from a bug, or to time them against it.
//   * An unknown value is an error: importing fastinv._C raises ValueError naming the values
//     (and a C++ caller's first kernel call throws std::invalid_argument).
//   * A value above what the CPU runs (avx512 on an AVX2-only CPU) is a cap, as with ATen's
//     ATEN_CPU_CAPABILITY: the widest path the CPU runs serves, with a RuntimeWarning at import
//     saying so. A cap is not a demand: a script written for a large machine still runs.
//   * Unset or empty: the widest the CPU runs.
// What is in use: fastinv._C.cpu_capability ("default", "avx2" or "avx512"),
// fastinv._C.cpu_capability_max (the widest this CPU and build run), and `fastinv info`.
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/loops.h"

namespace fastinv {
namespace cpu {
namespace {

constexpr const char* kEnv = "FASTINV_CPU_CAPABILITY";

Capability widest_supported() {
#if FASTINV_CPU_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512) return Capability::kAvx512;
  if (avx2) return Capability::kAvx2;
#endif
  return Capability::kDefault;
}

bool parse(const std::string& value, Capability& out) {
  for (Capability c : {Capability::kDefault, Capability::kAvx2, Capability::kAvx512}) {
    if (value == capability_name(c)) {
      out = c;
      return true;
    }
  }
  return false;
}

CapabilityChoice choose() {
  // Messages live as long as the process (the choice is made once), so plain const char*.
  static std::string requested, error, warning;
  CapabilityChoice choice;
  choice.best = widest_supported();
  choice.used = choice.best;
  const char* env = std::getenv(kEnv);
  if (env == nullptr) return choice;
  std::string value;
  for (const char* p = env; *p; ++p) {
    if (!std::isspace(static_cast<unsigned char>(*p))) value += static_cast<char>(std::tolower(*p));
  }
  if (value.empty()) return choice;
  requested = value;
  choice.requested = requested.c_str();
  Capability asked;
  if (!parse(value, asked)) {
    error = std::string(kEnv) + "='" + env +
            "' is not a CPU capability fastinv knows; set it to default (the baseline loops), avx2 or "
            "avx512 (a cap: the widest the CPU runs up to it), or unset it for the widest this CPU runs (" +
            capability_name(choice.best) + ")";
    choice.error = error.c_str();
    return choice;
  }
  if (static_cast<int>(asked) > static_cast<int>(choice.best)) {
    warning = std::string("fastinv: ") + kEnv + "=" + value + " asks for " + value +
              " loops, but this CPU (or this build) runs at most " + capability_name(choice.best) +
              "; the CPU kernels use " + capability_name(choice.best);
    choice.warning = warning.c_str();
  } else {
    choice.used = asked;
  }
  return choice;
}

}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAvx2:
      return "avx2";
    case Capability::kAvx512:
      return "avx512";
    default:
      return "default";
  }
}

const CapabilityChoice& capability_choice() {
  static const CapabilityChoice choice = choose();
  return choice;
}

const LoopTable& loops() {
  static const LoopTable* table = [] {
    const CapabilityChoice& c = capability_choice();
    if (c.error != nullptr) return static_cast<const LoopTable*>(nullptr);
#if FASTINV_CPU_DISPATCH
    if (c.used == Capability::kAvx512) return &loop_table_avx512();
    if (c.used == Capability::kAvx2) return &loop_table_avx2();
#endif
    return &loop_table_default();
  }();
  if (table == nullptr) throw std::invalid_argument(capability_choice().error);
  return *table;
}

}  // namespace cpu
}  // namespace fastinv
