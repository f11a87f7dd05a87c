// The Python module hss_kernels._C: empty. Importing it runs the static TORCH_LIBRARY registrations of
// the other sources; the ops are then reached through torch.ops.hss_kernels.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
