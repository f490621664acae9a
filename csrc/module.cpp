// The Python module fastinv._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of csrc/cpu and csrc/cuda, which attach kernels to the op
// schemas that fastinv/ops defines from Python (the one TORCH_LIBRARY "fastinv" DEF).
// Two constants describe the build: with_cuda (0/1) and cuda_archs, the GPU targets compiled
// in ("sm_80 sm_90 ... compute_120": machine code, and PTX the driver can compile for newer
// GPUs), written by setup.py into a generated header. And which instruction set the CPU loops
// run with (csrc/cpu/capability.cpp): cpu_capability ("default", "avx2" or "avx512") and
// cpu_capability_max, the widest this CPU and build run. FASTINV_CPU_CAPABILITY is read here, at
// import: an unknown value raises ValueError, a cap above the CPU's warns.
#include <Python.h>

#include "cpu/loops.h"

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

  const fastinv::cpu::CapabilityChoice& cpu = fastinv::cpu::capability_choice();
  if (cpu.error != nullptr) {
    PyErr_SetString(PyExc_ValueError, cpu.error);
    Py_DECREF(m);
    return nullptr;
  }
  if (cpu.warning != nullptr && PyErr_WarnEx(PyExc_RuntimeWarning, cpu.warning, 1) < 0) {
    Py_DECREF(m);  // warnings turned into errors (-W error)
    return nullptr;
  }
  PyModule_AddStringConstant(m, "cpu_capability", fastinv::cpu::capability_name(cpu.used));
  PyModule_AddStringConstant(m, "cpu_capability_max", fastinv::cpu::capability_name(cpu.best));
  return m;
}
