// The op files' side of the CPU loop tables (cpu/loops.h): c10's dtypes onto the raw ones the
// loops take, and the chosen table's loops for a dtype. The choice itself: capability.cpp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "cpu/loops.h"

namespace fastinv {
namespace cpu {

template <typename scalar_t>
struct raw_of {
  using type = scalar_t;  // float, double
};
template <>
struct raw_of<c10::BFloat16> {
  using type = bf16;
};
template <>
struct raw_of<c10::Half> {
  using type = fp16;
};
template <typename scalar_t>
using raw_t = typename raw_of<scalar_t>::type;

static_assert(sizeof(bf16) == sizeof(c10::BFloat16) && alignof(bf16) == alignof(c10::BFloat16));
static_assert(sizeof(fp16) == sizeof(c10::Half) && alignof(fp16) == alignof(c10::Half));

template <typename scalar_t>
inline const raw_t<scalar_t>* raw(const scalar_t* p) {
  return reinterpret_cast<const raw_t<scalar_t>*>(p);
}
template <typename scalar_t>
inline raw_t<scalar_t>* raw(scalar_t* p) {
  return reinterpret_cast<raw_t<scalar_t>*>(p);
}

// The loops of every op for scalar_t, from the table FASTINV_CPU_CAPABILITY and the CPU chose.
template <typename scalar_t>
inline const OpLoops<raw_t<scalar_t>>& loops_for() {
  return of<raw_t<scalar_t>>(loops());
}

}  // namespace cpu
}  // namespace fastinv
