// The Python module fastinv._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of csrc/cpu and csrc/cuda, which attach kernels to the op
// schemas that fastinv/ops defines from Python (the one TORCH_LIBRARY "fastinv" DEF).
// Two constants describe the build: with_cuda (0/1) and cuda_archs, the GPU targets compiled
// in ("sm_80 sm_90 ... compute_120": machine code, and PTX the driver can compile for newer
// GPUs), written by setup.py into a generated header.
#include <Python.h>

#if defined(FASTINV_WITH_CUDA) && __has_include("fastinv_build_info.h")
#include "fastinv_build_info.h"
#endif
#ifndef FASTINV_CUDA_ARCHS
#define FASTINV_CUDA_ARCHS ""
#endif

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastinv kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef FASTINV_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(m, "cuda_archs", FASTINV_CUDA_ARCHS);
  return m;
}
