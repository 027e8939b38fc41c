// An empty Python module: importing mae_kernels._C loads this library, whose static
// initialisers register the ops with the dispatcher (torch.ops.mae_kernels.*).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
