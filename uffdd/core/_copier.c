/*
 * _copier: background copies from a snapshot file into a shared-memory guest, without the GIL.
 *
 * Background pre-paging (uffdd/core/bulk.py) copies whole runs of a file source into the memory
 * file. Done from Python, the copying thread must take the GIL back after every system call, and
 * while the event loop is busy serving faults that takes milliseconds: a vCPU that faulted on a
 * page of the run waits all that time. Here Copier.run() releases the GIL once for the whole run.
 *
 * A run goes a step at a time. Each page has a claim byte shared with the event loop (the same
 * protocol as the peer's bulk link, claims.h): the thread freezes a step's free pages with a
 * compare-and-swap just before it writes them, so a demand fault can still take over (claim_take)
 * any page the copy has not reached, and such a page is never written here. The frozen pages are
 * written with pwrite() from a read-only mapping of the snapshot into the memory file (the kernel
 * allocates the pages: no fault and no zeroing per page in our own mapping). Each step is then
 * reported through a queue and an eventfd the event loop watches; installing (UFFDIO_CONTINUE)
 * stays with the event loop.
 *
 * A VMM may shrink its memory file: a pwrite() past its end would grow it again. The size is
 * checked before each step and after it; either way the run ends as GONE, and the step's pages are
 * not reported. A failed write (the snapshot shrank under its mapping, an I/O error) unfreezes the
 * step and ends the run with the error; what was reported before stays valid.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include "claims.h"

#define FIRST_RECORDS 256

/* What run() returns, and what a record says of a step. */
enum { RUN_DONE = 0, RUN_GONE = 1, RUN_ERROR = 2 };

struct record {
	uint32_t id, first, n;
};

typedef struct {
	PyObject_HEAD
	Py_buffer src;
	int memfd, done_fd, running;
	uint64_t file_end;
	pthread_mutex_t lock; /* the records */
	struct record *records; /* malloc'd: it grows on the copying thread, without the GIL */
	Py_ssize_t nrecords, cap;
} Copier;

static int Copier_init(Copier *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "src", "memfd", "file_end", NULL };
	unsigned long long file_end;

	if (self->records) {
		PyErr_SetString(PyExc_RuntimeError, "Copier is already initialised");
		return -1;
	}
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*iK", kwlist, &self->src, &self->memfd, &file_end))
		return -1;
	self->file_end = file_end;
	/* Our own descriptor: a run still going when the session closes the VMM's can never write
	 * into whatever file reuses that number. */
	self->memfd = fcntl(self->memfd, F_DUPFD_CLOEXEC, 0);
	self->records = malloc(FIRST_RECORDS * sizeof(struct record));
	self->cap = FIRST_RECORDS;
	self->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	pthread_mutex_init(&self->lock, NULL); /* before any return: release() destroys it with the records */
	if (self->memfd < 0 || !self->records || self->done_fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	return 0;
}

static void release(Copier *self)
{
	if (self->src.obj)
		PyBuffer_Release(&self->src);
	if (self->records) {
		if (self->done_fd >= 0)
			close(self->done_fd);
		if (self->memfd >= 0)
			close(self->memfd);
	}
	if (self->records) {
		free(self->records);
		self->records = NULL;
		pthread_mutex_destroy(&self->lock);
	}
	self->done_fd = self->memfd = -1;
}

static void Copier_dealloc(Copier *self)
{
	release(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Queue a written step for the event loop; 0, or ENOMEM (the step cannot be reported). */
static int report(Copier *self, uint32_t id, uint32_t first, uint32_t n)
{
	uint64_t one = 1;
	int err = 0;

	pthread_mutex_lock(&self->lock);
	if (self->nrecords == self->cap) {
		struct record *more = realloc(self->records, 2 * (size_t)self->cap * sizeof(struct record));
		if (more) {
			self->records = more;
			self->cap *= 2;
		}
	}
	if (self->nrecords < self->cap)
		self->records[self->nrecords++] = (struct record){ id, first, n };
	else
		err = ENOMEM;
	pthread_mutex_unlock(&self->lock);
	if (!err && write(self->done_fd, &one, sizeof(one)) < 0 && errno != EAGAIN) {
		/* the counter cannot overflow in practice; the reader drains the queue either way */
	}
	return err;
}

static void unfreeze_step(uint8_t *claims, uint32_t first, uint32_t end)
{
	for (uint32_t k = first; k < end; k++)
		claims_unfreeze(&claims[k]);
}

static int covers(int memfd, uint64_t end)
{
	struct stat st;
	return fstat(memfd, &st) == 0 && (uint64_t)st.st_size >= end;
}

/* Write pages [p, q) of the run (frozen by us) into the memory file; 0 or an errno. */
static int write_span(Copier *self, uint64_t offset, uint32_t p, uint32_t q, unsigned shift)
{
	uint64_t off = offset + ((uint64_t)p << shift), len = (uint64_t)(q - p) << shift, done = 0;
	const char *from = (const char *)self->src.buf + off;

	while (done < len) {
		ssize_t n = pwrite(self->memfd, from + done, len - done, (off_t)(off + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? errno : EIO;
		done += (uint64_t)n;
	}
	return 0;
}

/* One run, without the GIL (see the file's comment). *err is set for RUN_ERROR. */
static int copy_run(Copier *self, uint32_t id, uint64_t offset, uint8_t *claims, uint32_t count, unsigned shift,
		    uint32_t step, int *err)
{
	for (uint32_t first = 0; first < count; first += step) {
		uint32_t end = first + step < count ? first + step : count, p, q;
		int frozen = 0;

		for (p = first; p < end; p++)
			frozen += claims_freeze(&claims[p]);
		if (!frozen)
			continue;
		if (!covers(self->memfd, offset + ((uint64_t)end << shift)))
			return RUN_GONE;
		for (p = first; p < end; p = q) {
			if (__atomic_load_n(&claims[p], __ATOMIC_ACQUIRE) != CLAIM_FROZEN) {
				q = p + 1;
				continue;
			}
			for (q = p + 1; q < end && __atomic_load_n(&claims[q], __ATOMIC_ACQUIRE) == CLAIM_FROZEN; q++)
				;
			*err = write_span(self, offset, p, q, shift);
			if (*err) {
				unfreeze_step(claims, first, end);
				return RUN_ERROR;
			}
		}
		if (!covers(self->memfd, self->file_end))
			return RUN_GONE;
		*err = report(self, id, first, end - first);
		if (*err) { /* written, never to be installed: free again, to be fetched again */
			unfreeze_step(claims, first, end);
			return RUN_ERROR;
		}
	}
	return RUN_DONE;
}

/* run(id, offset, claims, page_shift, step_pages) -> (status, errno): copy the run of
 * len(claims) pages at file offset ``offset``; blocks, without the GIL. */
static PyObject *Copier_run(Copier *self, PyObject *args)
{
	unsigned int id, shift, step;
	unsigned long long offset;
	Py_buffer claims;
	int status, err = 0;

	if (!self->records) {
		PyErr_SetString(PyExc_ValueError, "Copier is closed");
		return NULL;
	}
	if (!PyArg_ParseTuple(args, "IKw*II", &id, &offset, &claims, &shift, &step))
		return NULL;
	if (shift < 12 || shift > 30 || step < 1 || claims.len > UINT32_MAX ||
	    offset + ((uint64_t)claims.len << shift) > (uint64_t)self->src.len) {
		PyBuffer_Release(&claims);
		PyErr_SetString(PyExc_ValueError, "the run is outside the snapshot, or its shape is wrong");
		return NULL;
	}
	self->running++;
	Py_BEGIN_ALLOW_THREADS
	status = copy_run(self, id, offset, claims.buf, (uint32_t)claims.len, shift, step, &err);
	Py_END_ALLOW_THREADS
	self->running--;
	PyBuffer_Release(&claims);
	return Py_BuildValue("(ii)", status, err);
}

/* drain() -> [(id, first page, pages)]: the steps written since the last drain. */
static PyObject *Copier_drain(Copier *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t count;
	PyObject *out;

	if (!self->records)
		return PyList_New(0);
	if (read(self->done_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
		return PyErr_SetFromErrno(PyExc_OSError);
	pthread_mutex_lock(&self->lock);
	out = PyList_New(self->nrecords);
	for (Py_ssize_t i = 0; out && i < self->nrecords; i++) {
		struct record *r = &self->records[i];
		PyObject *t = Py_BuildValue("(III)", r->id, r->first, r->n);
		if (!t) {
			Py_CLEAR(out);
			break;
		}
		PyList_SET_ITEM(out, i, t);
	}
	if (out)
		self->nrecords = 0;
	pthread_mutex_unlock(&self->lock);
	return out;
}

static PyObject *Copier_close(Copier *self, PyObject *Py_UNUSED(ignored))
{
	if (self->running) {
		PyErr_SetString(PyExc_RuntimeError, "a run is in progress");
		return NULL;
	}
	release(self);
	Py_RETURN_NONE;
}

static PyObject *Copier_get_done_fd(Copier *self, void *Py_UNUSED(closure))
{
	return PyLong_FromLong(self->done_fd);
}

static PyMethodDef Copier_methods[] = {
	{ "run", (PyCFunction)Copier_run, METH_VARARGS, "run(id, offset, claims, page_shift, step_pages) -> (status, errno)" },
	{ "drain", (PyCFunction)Copier_drain, METH_NOARGS, "drain() -> [(id, first, pages)] written since the last drain" },
	{ "close", (PyCFunction)Copier_close, METH_NOARGS, "release the snapshot's buffer and the eventfd" },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef Copier_getset[] = {
	{ "done_fd", (getter)Copier_get_done_fd, NULL, "an eventfd, readable when drain() has records", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject CopierType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.core._copier.Copier",
	.tp_basicsize = sizeof(Copier),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Background runs from a snapshot into a shared-memory guest, without the GIL (see _copier.c).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Copier_init,
	.tp_dealloc = (destructor)Copier_dealloc,
	.tp_methods = Copier_methods,
	.tp_getset = Copier_getset,
};

static PyMethodDef functions[] = {
	{ "claim_take", claim_take, METH_VARARGS, "claim_take(claims, index) -> whether the caller has the page" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_copier", "Background copies without the GIL (see the file's comment).", -1,
	functions, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__copier(void)
{
	PyObject *m;

	if (PyType_Ready(&CopierType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&CopierType);
	if (PyModule_AddObject(m, "Copier", (PyObject *)&CopierType) < 0 ||
	    PyModule_AddIntConstant(m, "RUN_DONE", RUN_DONE) < 0 || PyModule_AddIntConstant(m, "RUN_GONE", RUN_GONE) < 0 ||
	    PyModule_AddIntConstant(m, "RUN_ERROR", RUN_ERROR) < 0) {
		Py_DECREF(&CopierType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
