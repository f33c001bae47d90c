/*
 * uffdd.kernel._fastpath: the single-page fault path of a shared-memory session, in C.
 *
 * Session._on_fault does the same in Python; this module exists because, for the most common
 * fault (one page, bytes in the page cache), CPython's own work was a fifth of the daemon's
 * CPU time. It handles a message only when it can finish it: page state EMPTY, one preadv2
 * from the source (with RWF_NOWAIT unless the file lives in memory) straight into the second
 * mapping, then UFFDIO_CONTINUE. At anything else (another event, a page not EMPTY, a read
 * that would block or came up short, a CONTINUE that failed) it stops and returns the
 * message's index, so that Python handles that message, in order, with the full logic:
 *
 *   - a failed or short read puts the page back to EMPTY (its bytes were never mapped);
 *   - a failed CONTINUE leaves the page INSTALLING, whose bytes are complete, which is what
 *     Session._on_fault resolves with _install_run (retries, EEXIST, a guest gone).
 *
 * The page-state values and the order FILLING -> INSTALLING -> FILLED are pagestate.py's: a
 * successor daemon reads the same states after a crash. The GIL is held throughout: the
 * session's other users of the page states are Python code on the same loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { EMPTY = 0, FILLING = 1, INSTALLING = 2, FILLED = 3 };
#define HIST_BUCKETS 40

struct region {
	uint64_t start, end, offset, base;
	unsigned shift;
};

typedef struct {
	PyObject_HEAD
	int uffd, src_fd, rwf;
	Py_buffer mapping, states, hist;
	int have_mapping, have_states, have_hist;
	PyObject *by_tid;
	struct region *regions;
	Py_ssize_t nregions, last;
	/* Since the last take(): pages installed, of which minor faults, bytes, blocked ns, and
	 * where the latest one was (region position, page index). */
	unsigned long long done, minor, bytes, ns;
	Py_ssize_t last_region;
	unsigned long long last_idx;
} FastPath;

static void release_buffers(FastPath *self)
{
	if (self->have_mapping)
		PyBuffer_Release(&self->mapping);
	if (self->have_states)
		PyBuffer_Release(&self->states);
	if (self->have_hist)
		PyBuffer_Release(&self->hist);
	self->have_mapping = self->have_states = self->have_hist = 0;
	PyMem_Free(self->regions);
	self->regions = NULL;
	self->nregions = 0;
	self->last = 0;
	Py_CLEAR(self->by_tid);
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "uffd", "src_fd", "rwf", "mapping", "states", "hist", "by_tid", NULL };
	PyObject *mapping, *states, *hist, *by_tid;

	release_buffers(self);
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiOOOO!", kwlist, &self->uffd, &self->src_fd,
					 &self->rwf, &mapping, &states, &hist, &PyDict_Type, &by_tid))
		return -1;
	if (PyObject_GetBuffer(mapping, &self->mapping, PyBUF_WRITABLE) < 0)
		return -1;
	self->have_mapping = 1;
	if (PyObject_GetBuffer(states, &self->states, PyBUF_WRITABLE) < 0)
		return -1;
	self->have_states = 1;
	if (PyObject_GetBuffer(hist, &self->hist, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
		return -1;
	self->have_hist = 1;
	if (self->hist.itemsize != 8 || self->hist.len != 8 * HIST_BUCKETS) {
		PyErr_Format(PyExc_ValueError, "hist must hold %d unsigned 64-bit counters", HIST_BUCKETS);
		return -1;
	}
	Py_INCREF(by_tid);
	self->by_tid = by_tid;
	return 0;
}

static void FastPath_dealloc(FastPath *self)
{
	release_buffers(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *FastPath_set_regions(FastPath *self, PyObject *arg)
{
	PyObject *seq = PySequence_Fast(arg, "regions must be a sequence of (start, end, shift, base, offset)");
	Py_ssize_t n, i;
	struct region *table;

	if (!seq)
		return NULL;
	if (!self->have_mapping) {
		Py_DECREF(seq);
		PyErr_SetString(PyExc_ValueError, "fast path is closed");
		return NULL;
	}
	n = PySequence_Fast_GET_SIZE(seq);
	table = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*table));
	if (!table) {
		Py_DECREF(seq);
		return PyErr_NoMemory();
	}
	for (i = 0; i < n; i++) {
		struct region *r = &table[i];
		unsigned long long start, end, base, offset;
		unsigned shift;
		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKIKK", &start, &end, &shift, &base,
				      &offset))
			goto fail;
		if (shift < 12 || shift > 30 || end <= start || base > (uint64_t)self->states.len ||
		    (end - start) >> shift > (uint64_t)self->states.len - base ||
		    offset + (end - start) > (uint64_t)self->mapping.len) {
			PyErr_Format(PyExc_ValueError, "region %zd lies outside the page states or the mapping", i);
			goto fail;
		}
		*r = (struct region){ start, end, offset, base, shift };
	}
	Py_DECREF(seq);
	PyMem_Free(self->regions);
	self->regions = table;
	self->nregions = n;
	self->last = 0;
	Py_RETURN_NONE;
fail:
	Py_DECREF(seq);
	PyMem_Free(table);
	return NULL;
}

static struct region *find(FastPath *self, uint64_t addr, Py_ssize_t *pos)
{
	Py_ssize_t i = self->last;
	if (i < self->nregions && self->regions[i].start <= addr && addr < self->regions[i].end) {
		*pos = i;
		return &self->regions[i];
	}
	for (i = 0; i < self->nregions; i++) {
		if (self->regions[i].start <= addr && addr < self->regions[i].end) {
			self->last = *pos = i;
			return &self->regions[i];
		}
	}
	return NULL;
}

static int add_blocked(PyObject *by_tid, uint32_t tid, uint64_t ns)
{
	PyObject *key = PyLong_FromUnsignedLong(tid), *old, *sum;
	unsigned long long prev = 0;
	int rc;

	if (!key)
		return -1;
	old = PyDict_GetItemWithError(by_tid, key);
	if (old) {
		prev = PyLong_AsUnsignedLongLong(old);
		if (prev == (unsigned long long)-1 && PyErr_Occurred()) {
			Py_DECREF(key);
			return -1;
		}
	} else if (PyErr_Occurred()) {
		Py_DECREF(key);
		return -1;
	}
	sum = PyLong_FromUnsignedLongLong(prev + ns);
	if (!sum) {
		Py_DECREF(key);
		return -1;
	}
	rc = PyDict_SetItem(by_tid, key, sum);
	Py_DECREF(key);
	Py_DECREF(sum);
	return rc;
}

static uint64_t now_ns(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* Handle msgs[i..end) until one must go to Python; returns its index (end: all handled), or -1
 * with an exception set. */
static Py_ssize_t serve_msgs(FastPath *self, const struct uffd_msg *msgs, Py_ssize_t i, Py_ssize_t end,
			     uint64_t t0)
{
	uint8_t *states = self->states.buf;
	char *mapping = self->mapping.buf;
	uint64_t *hist = self->hist.buf;

	for (; i < end; i++) {
		const struct uffd_msg *m = &msgs[i];
		uint64_t addr, ps, idx, off, ns, b;
		struct region *r;
		Py_ssize_t pos;
		uint8_t *st;

		if (m->event != UFFD_EVENT_PAGEFAULT)
			break;
		addr = m->arg.pagefault.address;
		r = find(self, addr, &pos);
		if (!r)
			break;
		idx = (addr - r->start) >> r->shift;
		st = &states[r->base + idx];
		if (*st != EMPTY)
			break;
		ps = (uint64_t)1 << r->shift;
		off = r->offset + (idx << r->shift);
		*st = FILLING;
		{
			struct iovec iov = { mapping + off, ps };
			ssize_t got = preadv2(self->src_fd, &iov, 1, (off_t)off, self->rwf);
			if (got < 0 || (uint64_t)got != ps) {
				*st = EMPTY;
				break;
			}
		}
		*st = INSTALLING;
		{
			struct uffdio_continue c = { .range = { addr & ~(ps - 1), ps }, .mode = 0 };
			if (ioctl(self->uffd, UFFDIO_CONTINUE, &c) != 0)
				break;
		}
		*st = FILLED;
		ns = now_ns() - t0;
		self->done++;
		self->minor += (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
		self->bytes += ps;
		self->ns += ns;
		self->last_region = pos;
		self->last_idx = idx;
		b = 0;
		for (uint64_t q = ns >> 10; q; q >>= 1)
			b++;
		hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1]++;
		if (m->arg.pagefault.feat.ptid && add_blocked(self->by_tid, m->arg.pagefault.feat.ptid, ns) < 0)
			return -1;
	}
	return i;
}

static int check_open(FastPath *self)
{
	if (self->have_mapping)
		return 0;
	PyErr_SetString(PyExc_ValueError, "fast path is closed");
	return -1;
}

/* serve(msgs, start, end, t0) -> index of the first message not handled (end if all were). */
static PyObject *FastPath_serve(FastPath *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer msgs;
	Py_ssize_t i, end;
	unsigned long long t0;

	if (nargs != 4) {
		PyErr_SetString(PyExc_TypeError, "serve(msgs, start, end, t0) takes 4 arguments");
		return NULL;
	}
	if (check_open(self) < 0)
		return NULL;
	i = PyLong_AsSsize_t(args[1]);
	end = PyLong_AsSsize_t(args[2]);
	t0 = PyLong_AsUnsignedLongLong(args[3]);
	if (PyErr_Occurred())
		return NULL;
	if (PyObject_GetBuffer(args[0], &msgs, PyBUF_SIMPLE) < 0)
		return NULL;
	if (i < 0 || end < i || (size_t)end * sizeof(struct uffd_msg) > (size_t)msgs.len) {
		PyBuffer_Release(&msgs);
		PyErr_SetString(PyExc_ValueError, "message range outside the buffer");
		return NULL;
	}
	i = serve_msgs(self, msgs.buf, i, end, t0);
	PyBuffer_Release(&msgs);
	return i < 0 ? NULL : PyLong_FromSsize_t(i);
}

/* drain(buf) -> None when the queue is empty, else (first message left for Python, messages
 * in buf, t0 of that read). Reads the userfaultfd into buf and serves what it can, read after
 * read, until a read comes back short (the queue was empty then) or a message needs Python. */
static PyObject *FastPath_drain(FastPath *self, PyObject *arg)
{
	Py_buffer buf;
	Py_ssize_t cap, count, i;
	uint64_t t0;
	ssize_t n;

	if (check_open(self) < 0)
		return NULL;
	if (PyObject_GetBuffer(arg, &buf, PyBUF_WRITABLE) < 0)
		return NULL;
	cap = buf.len / (Py_ssize_t)sizeof(struct uffd_msg);
	if (cap < 1) {
		PyBuffer_Release(&buf);
		PyErr_SetString(PyExc_ValueError, "buffer holds no message");
		return NULL;
	}
	for (;;) {
		n = read(self->uffd, buf.buf, (size_t)cap * sizeof(struct uffd_msg));
		if (n < 0) {
			int err = errno;
			PyBuffer_Release(&buf);
			if (err == EAGAIN)
				Py_RETURN_NONE;
			errno = err;
			return PyErr_SetFromErrno(PyExc_OSError);
		}
		t0 = now_ns();
		count = n / (Py_ssize_t)sizeof(struct uffd_msg);
		i = serve_msgs(self, buf.buf, 0, count, t0);
		if (i < 0) {
			PyBuffer_Release(&buf);
			return NULL;
		}
		if (i < count || count < cap)
			break;
	}
	PyBuffer_Release(&buf);
	if (i == count)
		Py_RETURN_NONE;
	return Py_BuildValue("(nnK)", i, count, (unsigned long long)t0);
}

/* take() -> (pages, minor faults, bytes, blocked ns, region position, page index); resets. */
static PyObject *FastPath_take(FastPath *self, PyObject *Py_UNUSED(ignored))
{
	PyObject *res = Py_BuildValue("(KKKKnK)", self->done, self->minor, self->bytes, self->ns,
				      self->last_region, self->last_idx);
	if (res)
		self->done = self->minor = self->bytes = self->ns = 0;
	return res;
}

static PyObject *FastPath_close(FastPath *self, PyObject *Py_UNUSED(ignored))
{
	release_buffers(self);
	Py_RETURN_NONE;
}

static PyMethodDef FastPath_methods[] = {
	{ "serve", (PyCFunction)(void (*)(void))FastPath_serve, METH_FASTCALL,
	  "serve(msgs, start, end, t0) -> index of the first message left for Python" },
	{ "drain", (PyCFunction)FastPath_drain, METH_O,
	  "drain(buf) -> None, or (first message left for Python, messages in buf, t0)" },
	{ "take", (PyCFunction)FastPath_take, METH_NOARGS,
	  "take() -> (pages, minor, bytes, blocked_ns, region, index) since the last take" },
	{ "set_regions", (PyCFunction)FastPath_set_regions, METH_O,
	  "set_regions([(start, end, shift, base, offset), ...])" },
	{ "close", (PyCFunction)FastPath_close, METH_NOARGS, "release the buffers (mapping, states, hist)" },
	{ NULL, NULL, 0, NULL },
};

static PyTypeObject FastPathType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.kernel._fastpath.FastPath",
	.tp_basicsize = sizeof(FastPath),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Single-page fill + UFFDIO_CONTINUE for one shared-memory session.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)FastPath_init,
	.tp_dealloc = (destructor)FastPath_dealloc,
	.tp_methods = FastPath_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastpath", "The single-page fault path in C (see the file's comment).", -1,
	NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
	PyObject *m;
	if (PyType_Ready(&FastPathType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&FastPathType);
	if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType) < 0) {
		Py_DECREF(&FastPathType);
		Py_DECREF(m);
		return NULL;
	}
	if (PyModule_AddIntConstant(m, "HIST_BUCKETS", HIST_BUCKETS) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
