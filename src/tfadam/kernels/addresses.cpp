/* The data addresses of many tensors in one call (see addresses.py).
 *
 * addresses(tensors, out, types): out[i] = tensors[i].data_ptr(), for a
 * sequence of tensors whose Python types are all in the tuple `types`
 * (plain ones: a subclass may override data_ptr through __torch_function__,
 * which only Python's own call would honour). Raises TypeError for another
 * object, RuntimeError where torch's data_ptr() raises (no storage), and
 * ValueError where `out` (a writable buffer of uint64) has the wrong size;
 * out is only written once every address is known.
 *
 * Why C++: a step that reuses its plan (engine.reuse) re-reads the address
 * of every variable, slot and gradient, 8,000 of them for 2,000 parameters.
 * One Python call per tensor costs 0.1-0.4 us; here a read is a few loads,
 * and the loads of successive tensors overlap where their metadata is cold.
 */
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

static PyObject *addresses(PyObject *, PyObject *args) {
    PyObject *tensors, *types;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "Ow*O!", &tensors, &out, &PyTuple_Type, &types)) return nullptr;
    PyObject *seq = PySequence_Fast(tensors, "addresses: expected a sequence of tensors");
    if (seq == nullptr) {
        PyBuffer_Release(&out);
        return nullptr;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *error_type = nullptr;
    const char *error = nullptr;
    std::string message;
    std::vector<uint64_t> found(static_cast<size_t>(n));
    if (out.len != static_cast<Py_ssize_t>(n * sizeof(uint64_t))) {
        error_type = PyExc_ValueError, error = "addresses: the output buffer has the wrong size";
    }
    for (Py_ssize_t i = 0; error == nullptr && i < n; i++) {
        PyObject *type = reinterpret_cast<PyObject *>(Py_TYPE(items[i]));
        bool plain = false;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(types) && !plain; k++) {
            plain = PyTuple_GET_ITEM(types, k) == type;
        }
        if (!plain || !THPVariable_Check(items[i])) {
            error_type = PyExc_TypeError, error = "addresses: not a plain tensor";
            break;
        }
        try {
            found[i] = reinterpret_cast<uint64_t>(THPVariable_Unpack(items[i]).data_ptr());
        } catch (const std::exception &e) {
            message = e.what();
            error_type = PyExc_RuntimeError, error = message.c_str();
        }
    }
    if (error == nullptr && n > 0) std::copy(found.begin(), found.end(), static_cast<uint64_t *>(out.buf));
    PyBuffer_Release(&out);
    Py_DECREF(seq);
    if (error != nullptr) {
        PyErr_SetString(error_type, error);
        return nullptr;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"addresses", addresses, METH_VARARGS, "out[i] = tensors[i].data_ptr() (see addresses.cpp)"},
    {nullptr, nullptr, 0, nullptr},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tfadam_addresses", nullptr, -1, methods};

PyMODINIT_FUNC PyInit_tfadam_addresses(void) { return PyModule_Create(&module); }
