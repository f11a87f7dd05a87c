// The importable module hss_kernels._C. It defines no Python functions: importing it loads the shared
// library, whose static initialisers register the ops with the PyTorch dispatcher (torch.ops.hss_kernels).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
