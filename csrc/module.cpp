// The Python module fastinv._C. It holds no Python functions: importing it runs the static
// TORCH_LIBRARY_IMPL registrations of csrc/cpu and csrc/cuda, which attach kernels to the op
// schemas that fastinv/ops defines from Python (the one TORCH_LIBRARY "fastinv" DEF).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastinv kernels", -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef FASTINV_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
  return m;
}
