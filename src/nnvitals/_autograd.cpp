/* The part of nnvitals that speaks torch's C++ API (see _autograd.h): a tensor's address without four calls into
 * Python, and a gradient kept by a hook that autograd calls without going through a Python hooks dict. Built only
 * where torch and a C++ compiler are there at install; without it the kernel and probes.py do the same through
 * torch's Python API, more slowly. */
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>
#include <vector>

#include "_autograd.h"

namespace {

using torch::autograd::variable_list;

/* Appends the gradient of output `nr` of the node it is attached to to a Python list, and passes the gradients
 * on unchanged. Twice through the node (backward run twice over a retained graph): two entries, which the reader
 * adds up as autograd would. */
struct Keep final : torch::autograd::FunctionPreHook {
    PyObject *cell; /* a strong reference */
    uint32_t nr;

    Keep(PyObject *cell_, uint32_t nr_) : cell(cell_), nr(nr_) { Py_INCREF(cell); }

    ~Keep() override {
        if (Py_IsInitialized()) { /* (the graph may be freed on a thread without the GIL) */
            PyGILState_STATE gil = PyGILState_Ensure();
            Py_DECREF(cell);
            PyGILState_Release(gil);
        }
    }

    variable_list operator()(const variable_list &grads) override {
        if (nr < grads.size()) {
            PyGILState_STATE gil = PyGILState_Ensure();
            PyObject *g = THPVariable_Wrap(grads[nr]); /* (None where autograd has no gradient for it) */
            if (g == nullptr || PyList_Append(cell, g) < 0) PyErr_WriteUnraisable(cell);
            Py_XDECREF(g);
            PyGILState_Release(gil);
        }
        return grads;
    }
};

int64_t address(PyObject *t, int64_t numel) {
    if (t == Py_None) return 0;
    if (!THPVariable_Check(t)) return -1;
    try {
        const at::Tensor &x = THPVariable_Unpack(t);
        if (x.scalar_type() != at::kFloat || !x.is_cpu() || x.numel() != numel || !x.is_contiguous()) return -1;
        return reinterpret_cast<int64_t>(x.data_ptr());
    } catch (...) { /* (a tensor without storage) */
        return -1;
    }
}

int keep_grad(PyObject *out, PyObject *cell) {
    if (!THPVariable_CheckExact(out) || !PyList_Check(cell)) return 0;
    try {
        const at::Tensor &t = THPVariable_Unpack(out);
        const auto &fn = t.grad_fn();
        if (!fn) return 0;
        fn->add_tensor_pre_hook(std::make_unique<Keep>(cell, t.output_nr()));
        return 1;
    } catch (const std::exception &e) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return -1;
    }
}

int same_shape(PyObject *t, PyObject *shape) {
    if (!THPVariable_CheckExact(t) || !PyTuple_Check(shape)) return -1;
    try {
        const at::IntArrayRef sizes = THPVariable_Unpack(t).sizes();
        if (static_cast<size_t>(PyTuple_GET_SIZE(shape)) != sizes.size()) return 0;
        for (size_t i = 0; i < sizes.size(); i++) {
            PyObject *size = PyTuple_GET_ITEM(shape, static_cast<Py_ssize_t>(i));
            if (!PyLong_CheckExact(size)) return -1;
            const long long n = PyLong_AsLongLong(size);
            if (n == -1 && PyErr_Occurred()) {
                PyErr_Clear();
                return -1;
            }
            if (n != sizes[i]) return 0;
        }
        return 1;
    } catch (...) { /* (symbolic sizes) */
        return -1;
    }
}

int64_t tensor_version(PyObject *t) {
    if (!THPVariable_CheckExact(t)) return -1;
    try {
        return static_cast<int64_t>(THPVariable_Unpack(t)._version());
    } catch (...) {
        return -1;
    }
}

int requires_grad(PyObject *t) {
    if (!THPVariable_CheckExact(t)) return -1;
    return THPVariable_Unpack(t).requires_grad() ? 1 : 0;
}

PyObject *keep_grad_py(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "keep_grad(output, cell: list)");
        return nullptr;
    }
    const int done = keep_grad(args[0], args[1]);
    if (done < 0) return nullptr;
    return PyBool_FromLong(done);
}

/* state(tensors): what decides the set of trainable parameters and how they are read (each one's requires_grad,
 * whether it is in host memory, its shape) as one bytes object, compared as a whole from pass to pass: what
 * probes' _PARAM_STATE reads with three Python attribute lookups a parameter. */
PyObject *state(PyObject *, PyObject *tensors) {
    if (!PyList_Check(tensors)) {
        PyErr_SetString(PyExc_TypeError, "state(tensors: list)");
        return nullptr;
    }
    std::vector<int64_t> words;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); i++) {
        PyObject *t = PyList_GET_ITEM(tensors, i);
        if (!THPVariable_Check(t)) {
            PyErr_SetString(PyExc_TypeError, "state: a list of tensors");
            return nullptr;
        }
        try {
            const at::Tensor &x = THPVariable_Unpack(t);
            words.push_back(x.requires_grad() | (x.is_cpu() << 1));
            words.push_back(x.dim());
            for (const int64_t size : x.sizes()) words.push_back(size);
        } catch (const std::exception &e) { /* (a tensor without plain sizes: no C++ exception may cross into C) */
            PyErr_SetString(PyExc_RuntimeError, e.what());
            return nullptr;
        }
    }
    return PyBytes_FromStringAndSize(reinterpret_cast<const char *>(words.data()),
                                     static_cast<Py_ssize_t>(words.size() * sizeof(int64_t)));
}

nnvitals_autograd_api api = {NNVITALS_AUTOGRAD_API_VERSION, address, keep_grad, same_shape, tensor_version,
                             requires_grad};

PyMethodDef methods[] = {
    {"keep_grad", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(keep_grad_py)), METH_FASTCALL,
     "keep_grad(output, cell): have autograd append output's gradient to the list cell; False where that takes a "
     "Python hook (a leaf, a tensor subclass)."},
    {"state", state, METH_O,
     "state(tensors): each one's requires_grad, place (host or not) and shape, as one bytes object to compare."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_autograd", nullptr, -1, methods, nullptr, nullptr, nullptr, nullptr};

} // namespace

PyMODINIT_FUNC PyInit__autograd() {
    PyObject *m = PyModule_Create(&module);
    if (m == nullptr) return nullptr;
    PyObject *capsule = PyCapsule_New(&api, "nnvitals._autograd.API", nullptr);
    if (capsule == nullptr || PyModule_AddObject(m, "API", capsule) < 0) {
        Py_XDECREF(capsule);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
