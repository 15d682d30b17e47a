/*
 * pyqcow_mapread.c - pyqcow._mapread: the per-call path of the mmap-backed
 * guest reads, as a CPython extension (limited API, abi3).
 *
 * pyqcow._native (cffi) does the work: pyqcow_map_read resolves guest offsets
 * through L1/L2 and copies from the read-only mapping.  A cffi call cannot
 * allocate the bytes it returns nor take a bytearray without ffi.from_buffer,
 * and those conversions cost as much as the 4 KiB copy itself; here one
 * METH_FASTCALL method does argument checks, the allocation (or the buffer
 * export) and the call, so a random 4 KiB read is one Python-level call.
 *
 * A Reader holds the handle of pyqcow._native's map (an address, from
 * pyqcow/guestmap.py) and the address of pyqcow_map_read.  The owner
 * (guestmap.GuestMap) calls close() before it unmaps, after which every read
 * goes to the Python fallback.  Results other than "done" come back to Python:
 * 1 (compressed, malformed, an unmapped backing file) calls
 * fallback_into(buffer, length, offset); a negative -errno calls
 * on_error(rc), which raises.  The GIL is held throughout, so a close() from
 * another thread cannot unmap under a running copy.
 */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*map_read_fn)(void *map, char *dst, int64_t length, int64_t offset);

typedef struct {
    PyObject_HEAD
    void *ctx;            /* pyqcow_map_open's handle; NULL once closed */
    map_read_fn read;
    long long size;       /* guest disk size: reads stop there */
    PyObject *fallback;   /* fallback_into(buffer, length, offset) */
    PyObject *on_error;   /* on_error(rc): raises */
} Reader;

static int reader_init(PyObject *self_obj, PyObject *args, PyObject *kwds)
{
    Reader *self = (Reader *)self_obj;
    unsigned long long ctx, read;
    long long size;
    PyObject *fallback, *on_error;

    if (kwds != NULL && PyDict_Size(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Reader() takes positional arguments only");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "KKLOO", &ctx, &read, &size, &fallback, &on_error))
        return -1;
    if (!ctx || !read || size < 0 || !PyCallable_Check(fallback) || !PyCallable_Check(on_error)) {
        PyErr_SetString(PyExc_ValueError, "Reader(ctx, read, size, fallback_into, on_error)");
        return -1;
    }
    self->ctx = (void *)(uintptr_t)ctx;
    self->read = (map_read_fn)(uintptr_t)read;
    self->size = size;
    Py_INCREF(fallback);
    Py_INCREF(on_error);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->on_error);
    self->fallback = fallback;
    self->on_error = on_error;
    return 0;
}

static void reader_dealloc(PyObject *self_obj)
{
    Reader *self = (Reader *)self_obj;
    PyTypeObject *tp = Py_TYPE(self_obj);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);

    PyObject_GC_UnTrack(self_obj);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->on_error);
    tp_free(self_obj);
    Py_DECREF(tp);
}

static int reader_traverse(PyObject *self_obj, visitproc visit, void *arg)
{
    Reader *self = (Reader *)self_obj;

    Py_VISIT(Py_TYPE(self_obj));
    Py_VISIT(self->fallback);
    Py_VISIT(self->on_error);
    return 0;
}

static int reader_clear(PyObject *self_obj)
{
    Reader *self = (Reader *)self_obj;

    Py_CLEAR(self->fallback);
    Py_CLEAR(self->on_error);
    return 0;
}

/* A non-negative Python int as long long; -1 with an exception set. */
static long long nonneg(PyObject *obj, const char *what)
{
    long long v = PyLong_AsLongLong(obj);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %lld", what, v);
        return -1;
    }
    return v;
}

/* Bytes the disk holds from offset, at most want. */
static long long clamp(const Reader *self, long long want, long long offset)
{
    long long left = offset < self->size ? self->size - offset : 0;

    return want < left ? want : left;
}

/* rc < 0: on_error(rc) raises; NULL with an exception set either way. */
static PyObject *raise_rc(Reader *self, int rc)
{
    PyObject *r = PyObject_CallFunction(self->on_error, "i", rc);

    if (r != NULL) {
        Py_DECREF(r);
        PyErr_Format(PyExc_OSError, "guest read failed (%d)", rc);
    }
    return NULL;
}

/* fallback_into(obj, n, offset); 0 or -1 with an exception set. */
static int call_fallback(Reader *self, PyObject *obj, long long n, long long offset)
{
    PyObject *r = PyObject_CallFunction(self->fallback, "OLL", obj, n, offset);

    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* pread(size, offset) -> bytes: up to size guest bytes at offset (fewer at
 * the end of the disk, b"" past it), as os.pread. */
static PyObject *reader_pread(PyObject *self_obj, PyObject *const *args, Py_ssize_t nargs)
{
    Reader *self = (Reader *)self_obj;
    long long size, offset, n;
    PyObject *out, *array;
    int rc = 1;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pread(size, offset) takes 2 arguments");
        return NULL;
    }
    if ((size = nonneg(args[0], "size")) < 0 || (offset = nonneg(args[1], "offset")) < 0)
        return NULL;
    n = clamp(self, size, offset);
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (out == NULL || n == 0)
        return out;
    if (self->ctx != NULL)
        rc = self->read(self->ctx, PyBytes_AsString(out), n, offset);
    if (rc == 0)
        return out;
    Py_DECREF(out);
    if (rc < 0)
        return raise_rc(self, rc);
    /* the Python path fills a bytearray, returned as bytes */
    array = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (array == NULL)
        return NULL;
    if (call_fallback(self, array, n, offset) < 0) {
        Py_DECREF(array);
        return NULL;
    }
    out = PyBytes_FromObject(array);
    Py_DECREF(array);
    return out;
}

/* preadinto(buffer, offset) -> int: fill the writable buffer with guest
 * bytes at offset, up to the end of the disk; the number of bytes read. */
static PyObject *reader_preadinto(PyObject *self_obj, PyObject *const *args, Py_ssize_t nargs)
{
    Reader *self = (Reader *)self_obj;
    long long offset, n;
    Py_buffer view;
    int rc = 1;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "preadinto(buffer, offset) takes 2 arguments");
        return NULL;
    }
    if ((offset = nonneg(args[1], "offset")) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0) {
        /* not a writable contiguous buffer: the Python path says why (or
         * copes, e.g. a non-contiguous view) */
        long long len;
        PyObject *mv, *nbytes;

        PyErr_Clear();
        mv = PyMemoryView_FromObject(args[0]);
        if (mv == NULL)
            return NULL;
        nbytes = PyObject_GetAttrString(mv, "nbytes");
        Py_DECREF(mv);
        if (nbytes == NULL)
            return NULL;
        len = PyLong_AsLongLong(nbytes);
        Py_DECREF(nbytes);
        if (len == -1 && PyErr_Occurred())
            return NULL;
        n = clamp(self, len, offset);
        if (call_fallback(self, args[0], n, offset) < 0)
            return NULL;
        return PyLong_FromLongLong(n);
    }
    n = clamp(self, (long long)view.len, offset);
    if (n > 0 && self->ctx != NULL)
        rc = self->read(self->ctx, (char *)view.buf, n, offset);
    PyBuffer_Release(&view);
    if (n > 0 && rc < 0)
        return raise_rc(self, rc);
    if (n > 0 && rc != 0 && call_fallback(self, args[0], n, offset) < 0)
        return NULL;
    return PyLong_FromLongLong(n);
}

static PyObject *reader_close(PyObject *self_obj, PyObject *unused)
{
    (void)unused;
    ((Reader *)self_obj)->ctx = NULL;
    Py_RETURN_NONE;
}

static PyObject *reader_closed(PyObject *self_obj, void *unused)
{
    (void)unused;
    return PyBool_FromLong(((Reader *)self_obj)->ctx == NULL);
}

static PyMethodDef reader_methods[] = {
    {"pread", (PyCFunction)(void (*)(void))reader_pread, METH_FASTCALL,
     "pread(size, offset) -> bytes: guest bytes at offset, fewer at the end of the disk."},
    {"preadinto", (PyCFunction)(void (*)(void))reader_preadinto, METH_FASTCALL,
     "preadinto(buffer, offset) -> int: fill buffer with guest bytes at offset."},
    {"close", reader_close, METH_NOARGS,
     "Forget the map handle (before it is unmapped): reads go to the fallback."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef reader_getset[] = {
    {"closed", reader_closed, NULL, "True once close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot reader_slots[] = {
    {Py_tp_doc, "Reader(ctx, read, size, fallback_into, on_error): guest reads through "
                "pyqcow._native's pyqcow_map_read."},
    {Py_tp_init, reader_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, reader_dealloc},
    {Py_tp_traverse, reader_traverse},
    {Py_tp_clear, reader_clear},
    {Py_tp_methods, reader_methods},
    {Py_tp_getset, reader_getset},
    {0, NULL},
};

static PyType_Spec reader_spec = {
    "pyqcow._mapread.Reader",
    sizeof(Reader),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    reader_slots,
};

static int mapread_exec(PyObject *module)
{
    PyObject *type = PyType_FromSpec(&reader_spec);

    if (type == NULL)
        return -1;
    if (PyModule_AddObject(module, "Reader", type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot mapread_module_slots[] = {
    {Py_mod_exec, mapread_exec},
    {0, NULL},
};

static struct PyModuleDef mapread_module = {
    PyModuleDef_HEAD_INIT,
    "pyqcow._mapread",
    "The per-call path of pyqcow's mmap-backed guest reads (see pyqcow/guestmap.py).",
    0,
    NULL,
    mapread_module_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__mapread(void)
{
    return PyModuleDef_Init(&mapread_module);
}
