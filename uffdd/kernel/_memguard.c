/*
 * uffdd.kernel._memguard: copies into guest memory that survive the memory file shrinking.
 *
 * A VMM may ftruncate() its own memory file at any time. Touching the daemon's second mapping
 * beyond the new end then raises SIGBUS, which would kill the daemon and every other guest it
 * serves. The daemon therefore never touches guest memory in user mode without a guard
 * (uffdd/csrc/guard.h): a copy that faults reports the failure, and the caller ends that one
 * session. Large copies release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "guard.h"

static PyObject *raise_gone(void)
{
	errno = EFAULT;
	return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "guest memory (the memory file shrank)");
}

/* copy(dest, src): copy src into dest (same length); OSError(EFAULT) if dest is not there. */
static PyObject *memguard_copy(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer dst, src;
	int rc;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "copy(dest, src) takes 2 arguments");
		return NULL;
	}
	if (guard_install() < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0) {
		PyBuffer_Release(&dst);
		return NULL;
	}
	if (dst.len != src.len) {
		PyBuffer_Release(&dst);
		PyBuffer_Release(&src);
		return PyErr_Format(PyExc_ValueError, "copy: %zd bytes into %zd", src.len, dst.len);
	}
	if (dst.len >= 65536) {
		Py_BEGIN_ALLOW_THREADS
		rc = guarded_copy(dst.buf, src.buf, (size_t)dst.len);
		Py_END_ALLOW_THREADS
	} else {
		rc = guarded_copy(dst.buf, src.buf, (size_t)dst.len);
	}
	PyBuffer_Release(&dst);
	PyBuffer_Release(&src);
	if (rc < 0)
		return raise_gone();
	Py_RETURN_NONE;
}

/* zero(dest): fill dest with zeros; OSError(EFAULT) if it is not there. */
static PyObject *memguard_zero(PyObject *Py_UNUSED(self), PyObject *arg)
{
	Py_buffer dst;
	int rc;

	if (guard_install() < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	if (PyObject_GetBuffer(arg, &dst, PyBUF_WRITABLE) < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = guarded_copy(dst.buf, NULL, (size_t)dst.len);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&dst);
	if (rc < 0)
		return raise_gone();
	Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
	{ "copy", (PyCFunction)(void (*)(void))memguard_copy, METH_FASTCALL,
	  "copy(dest, src): copy into guest memory; OSError(EFAULT) if it is gone" },
	{ "zero", (PyCFunction)memguard_zero, METH_O, "zero(dest): zero guest memory; OSError(EFAULT) if it is gone" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_memguard", "Copies into guest memory that survive a shrinking memory file.", -1,
	methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__memguard(void)
{
	return PyModule_Create(&module);
}
