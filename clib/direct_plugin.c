/* libflexnpu_direct.so: FlexNPU's translator for direct mode, in an embedded CPython. The frames are those of
 * every other transport; they go to interposer/shim/flexnpu_client/direct.py's DirectTransport, which answers
 * them with the translator the Python client's direct mode uses. Built only where a shared libpython exists. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>
#include <string.h>

#include "direct_abi.h"

#define EXPORT __attribute__((visibility("default")))
#define INTERNAL_ERROR 500000
#define NO_DEVICE 207004

static PyObject *topology;

struct translator {
    PyObject *transport;
    char *body;
    size_t cap;
};

/* The pending exception as an aclError (its `code`, as FlexNPU's exceptions carry one) and a message. */
static int failed(char *err, const char *what) {
    PyObject *type, *value, *trace;
    PyErr_Fetch(&type, &value, &trace);
    PyErr_NormalizeException(&type, &value, &trace);
    int code = INTERNAL_ERROR;
    PyObject *attr = value ? PyObject_GetAttrString(value, "code") : NULL;
    if (attr && PyLong_Check(attr)) {
        code = (int)PyLong_AsLong(attr);
    }
    PyErr_Clear();
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
    snprintf(err, FNPU_DIRECT_ERR, "%s%s%s", what, message ? ": " : "", message ? message : "");
    PyErr_Clear();
    Py_XDECREF(text);
    Py_XDECREF(attr);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(trace);
    return code;
}

EXPORT int fnpu_direct_init(const char *python, const char *config, char *err) {
    if (!Py_IsInitialized()) {
        PyConfig c;
        PyConfig_InitPythonConfig(&c);
        c.install_signal_handlers = 0; /* the program's signals stay the program's */
        c.parse_argv = 0;
        PyStatus status = python ? PyConfig_SetBytesString(&c, &c.program_name, python) : PyStatus_Ok();
        if (!PyStatus_Exception(status)) {
            status = Py_InitializeFromConfig(&c);
        }
        PyConfig_Clear(&c);
        if (PyStatus_Exception(status)) {
            snprintf(err, FNPU_DIRECT_ERR, "direct mode: cannot start Python %s: %s", python ? python : "",
                     status.err_msg ? status.err_msg : "");
            return NO_DEVICE;
        }
        PyEval_SaveThread(); /* every call below takes the GIL for itself */
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int ret = 0;
    PyObject *module = PyImport_ImportModule("interposer.shim.flexnpu_client.direct");
    if (!module) {
        ret = failed(err, "direct mode needs FlexNPU importable by FLEXNPU_PYTHON (`vdevctl run --direct` sets it)");
        ret = NO_DEVICE;
    } else {
        topology = PyObject_CallMethod(module, "DirectTopology", "z", config);
        if (!topology) {
            ret = failed(err, "direct mode");
        }
        Py_DECREF(module);
    }
    PyGILState_Release(gil);
    return ret;
}

EXPORT int fnpu_direct_names(char *out, size_t cap, char *err) {
    PyGILState_STATE gil = PyGILState_Ensure();
    int ret = 0;
    PyObject *names = PyObject_GetAttrString(topology, "names");
    PyObject *comma = PyUnicode_FromString(",");
    PyObject *joined = names && comma ? PyUnicode_Join(comma, names) : NULL;
    const char *text = joined ? PyUnicode_AsUTF8(joined) : NULL;
    if (!text) {
        ret = failed(err, "direct mode: the virtual NPUs");
    } else {
        snprintf(out, cap, "%s", text);
    }
    Py_XDECREF(joined);
    Py_XDECREF(comma);
    Py_XDECREF(names);
    PyGILState_Release(gil);
    return ret;
}

EXPORT int fnpu_direct_open(const char *name, void **out, char *err) {
    struct translator *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, FNPU_DIRECT_ERR, "no host memory for a translator");
        return 200000;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int ret = 0;
    t->transport = PyObject_CallMethod(topology, "transport", "s", name);
    if (!t->transport) {
        ret = failed(err, name);
        free(t);
    } else {
        *out = t;
    }
    PyGILState_Release(gil);
    return ret;
}

EXPORT int fnpu_direct_call(void *handle, const struct iovec *iov, int n, const uint8_t **body, size_t *len,
                            char *err) {
    struct translator *t = handle;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        total += iov[i].iov_len;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    int ret = 0;
    PyObject *frame = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (frame) {
        char *to = PyBytes_AS_STRING(frame);
        for (int i = 0; i < n; i++) {
            memcpy(to, iov[i].iov_base, iov[i].iov_len);
            to += iov[i].iov_len;
        }
    }
    PyObject *reply = frame ? PyObject_CallMethod(t->transport, "call", "O", frame) : NULL;
    /* A reply still in pieces (interposer.wire.Body) is read whole through its read(offset, n). */
    if (reply && PyObject_HasAttrString(reply, "read")) {
        Py_ssize_t size = PyObject_Length(reply);
        PyObject *whole = size >= 0 ? PyObject_CallMethod(reply, "read", "nn", (Py_ssize_t)0, size) : NULL;
        Py_DECREF(reply);
        reply = whole;
    }
    Py_buffer view;
    if (!reply || PyObject_GetBuffer(reply, &view, PyBUF_C_CONTIGUOUS) != 0) {
        ret = failed(err, "direct mode");
    } else {
        if ((size_t)view.len > t->cap) {
            char *grown = realloc(t->body, (size_t)view.len);
            if (grown) {
                t->body = grown;
                t->cap = (size_t)view.len;
            }
        }
        if ((size_t)view.len > t->cap) {
            snprintf(err, FNPU_DIRECT_ERR, "no host memory for a %zd-byte reply", view.len);
            ret = 200000;
        } else {
            memcpy(t->body, view.buf, (size_t)view.len);
            *body = (const uint8_t *)t->body;
            *len = (size_t)view.len;
        }
        PyBuffer_Release(&view);
    }
    Py_XDECREF(reply);
    Py_XDECREF(frame);
    PyGILState_Release(gil);
    return ret;
}

EXPORT void fnpu_direct_close(void *handle) {
    struct translator *t = handle;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *done = PyObject_CallMethod(t->transport, "close", NULL);
    if (!done) {
        PyErr_Clear();
    }
    Py_XDECREF(done);
    Py_DECREF(t->transport);
    PyGILState_Release(gil);
    free(t->body);
    free(t);
}
