// An empty Python module named after the extension (TORCH_EXTENSION_NAME), so that `import` loads the
// shared library and runs its static TORCH_LIBRARY / TORCH_LIBRARY_IMPL registrations.
#pragma once
#include <Python.h>

#define RF_CONCAT_(a, b) a##b
#define RF_CONCAT(a, b) RF_CONCAT_(a, b)
#define RF_STR_(a) #a
#define RF_STR(a) RF_STR_(a)

#define RF_PYTHON_MODULE() RF_PYTHON_MODULE_WITH(nullptr)

// ... with these module-level functions (a PyMethodDef array ending in a null entry)
#define RF_PYTHON_MODULE_WITH(methods)                                                          \
  extern "C" PyMODINIT_FUNC RF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                    \
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, RF_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods}; \
    return PyModule_Create(&def);                                                               \
  }
