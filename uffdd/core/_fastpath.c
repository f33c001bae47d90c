/*
 * uffdd.core._fastpath: the fault loop's common case in C, for shared-memory sessions whose
 * source is a file that can be read with one preadv2.
 *
 * uffdd.core.faultloop does the same in Python; this exists because, per fault, CPython's own
 * work was a large part of the daemon's CPU time. A message is handled here only when it can be
 * finished here, exactly as the Python path would:
 *
 *   - a fault on an EMPTY page fills its fault-around block (the EMPTY pages around it within
 *     the aligned block of fa_pages pages; one page when fault-around is off) with one
 *     preadv2 (RWF_NOWAIT unless the file lives in memory) straight into the second mapping,
 *     then maps the run with one UFFDIO_CONTINUE;
 *   - a fault on a FILLED page (a stale duplicate) issues CONTINUE again and wakes on EEXIST.
 *
 * At anything else (an event, a page in another state, a read that would block or came up
 * short, a refused ioctl) it stops and returns that message's index, and Python handles it, in
 * order, with the full logic:
 *
 *   - a failed or short read puts the run back to EMPTY (its bytes were never mapped), so
 *     Python fills it again from scratch;
 *   - a refused CONTINUE leaves the unmapped rest of the run INSTALLING and reports it through
 *     failed(): Python installs that run (its retries, EEXIST, a guest gone) for that message.
 *
 * Page states, counters, the latency histogram and per-thread blocked time move exactly as the
 * Python path moves them (tests/test_native.py feeds both the same fault sequences). The
 * state values and the bucket count are exported and checked against Python's at import. The
 * GIL is held throughout: every other user of the page states is Python code on the same loop.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/userfaultfd.h>
#include "link_api.h"
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { EMPTY = 0, FILLING = 1, INSTALLING = 2, FILLED = 3 };
#define HIST_BUCKETS 40

struct region {
	uint64_t start, end, offset, base, npages;
	unsigned shift;
	char *mem; /* this region's part of the second mapping */
};

/* What was done since the last take(); Python adds it to the session's counters. */
struct counts {
	unsigned long long faults, minor, inline_fills, pages, demand, fault_around, bytes, ns, already_mapped,
		async_fills;
};

/* A demand fill on its way over a peer link (remote mode). Page indices are global (they
 * survive a region being split while the request is out). */
struct pend {
	uint64_t g, n, gidx, t0;
	uint32_t tid;
	uint8_t used;
};
#define MAX_PEND 1024

/* Why a remote fill comes back to Python (link_failures()). */
enum { LF_FETCH = 1, LF_INSTALL = 2, LF_GONE = 3 };

typedef struct {
	PyObject_HEAD
	int uffd, src_fd, rwf;
	uint64_t fa_pages;
	Py_buffer states, hist;
	int have_states, have_hist;
	Py_buffer *mems;
	Py_ssize_t nmems;
	PyObject *by_tid;
	struct region *regions;
	Py_ssize_t nregions, last;
	struct counts c;
	Py_ssize_t last_region; /* where the latest demand fault was: region position, page */
	unsigned long long last_idx;
	/* A run whose CONTINUE was refused (left INSTALLING) for the message last returned. */
	Py_ssize_t failed_region;
	unsigned long long failed_lo, failed_n;
	/* Pages in place, shared with SessionStats.in_place; the session's total. */
	Py_buffer in_place;
	int have_in_place;
	uint64_t total;
	/* Remote mode: demand fills go to a peer link instead of a file. */
	PyObject *link;
	const struct link_api *api;
	PyObject *notify; /* called (rarely) when Python must look: failures, or everything in place */
	struct pend *pend;
	uint32_t pend_free;
	int submitted;
	PyObject *failures; /* list of (kind, status, g, n, gidx, t0, tid) */
} FastPath;

static void release_regions(FastPath *self)
{
	for (Py_ssize_t i = 0; i < self->nmems; i++)
		PyBuffer_Release(&self->mems[i]);
	PyMem_Free(self->mems);
	PyMem_Free(self->regions);
	self->mems = NULL;
	self->regions = NULL;
	self->nmems = self->nregions = 0;
	self->last = 0;
}

static void release_buffers(FastPath *self)
{
	if (self->api && self->link)
		self->api->set_owner(self->link, NULL, NULL); /* nothing is written to guest memory after this */
	self->api = NULL;
	Py_CLEAR(self->link);
	Py_CLEAR(self->notify);
	Py_CLEAR(self->failures);
	PyMem_Free(self->pend);
	self->pend = NULL;
	if (self->have_in_place)
		PyBuffer_Release(&self->in_place);
	self->have_in_place = 0;
	release_regions(self);
	if (self->have_states)
		PyBuffer_Release(&self->states);
	if (self->have_hist)
		PyBuffer_Release(&self->hist);
	self->have_states = self->have_hist = 0;
	Py_CLEAR(self->by_tid);
}

static void remote_sink(void *owner, uint64_t cookie, int status);

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "uffd", "src_fd", "rwf", "fa_pages", "states", "hist", "by_tid", "in_place",
				  "total", "link", "notify", NULL };
	PyObject *states, *hist, *by_tid, *in_place, *link = Py_None, *notify = Py_None;
	unsigned long long fa, total;

	release_buffers(self);
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiKOOO!OK|OO", kwlist, &self->uffd, &self->src_fd, &self->rwf,
					 &fa, &states, &hist, &PyDict_Type, &by_tid, &in_place, &total, &link, &notify))
		return -1;
	if (PyObject_GetBuffer(in_place, &self->in_place, PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
		return -1;
	self->have_in_place = 1;
	if (self->in_place.itemsize != 8 || self->in_place.len < 8) {
		PyErr_SetString(PyExc_ValueError, "in_place must hold a signed 64-bit counter");
		return -1;
	}
	self->total = total;
	if (link != Py_None) {
		PyObject *cap = PyObject_GetAttrString(link, "api");
		if (!cap)
			return -1;
		self->api = PyCapsule_GetPointer(cap, LINK_API_CAPSULE);
		Py_DECREF(cap);
		if (!self->api)
			return -1;
		if (self->api->version != LINK_API_VERSION) {
			self->api = NULL;
			PyErr_SetString(PyExc_ValueError, "the link speaks another version of link_api.h");
			return -1;
		}
		self->pend = PyMem_Calloc(MAX_PEND, sizeof(struct pend));
		self->failures = PyList_New(0);
		if (!self->pend || !self->failures)
			return -1;
		Py_INCREF(link);
		self->link = link;
		Py_INCREF(notify);
		self->notify = notify;
		self->api->set_owner(link, self, remote_sink);
	}
	if (fa < 1 || (fa & (fa - 1)) || fa > 65536) {
		PyErr_SetString(PyExc_ValueError, "fa_pages must be a power of two in 1..65536");
		return -1;
	}
	self->fa_pages = fa;
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
	self->failed_region = -1;
	return 0;
}

static void FastPath_dealloc(FastPath *self)
{
	release_buffers(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(FastPath *self)
{
	if (self->have_states)
		return 0;
	PyErr_SetString(PyExc_ValueError, "fast path is closed");
	return -1;
}

/* set_regions([(start, end, shift, base, offset, mem), ...]) */
static PyObject *FastPath_set_regions(FastPath *self, PyObject *arg)
{
	PyObject *seq;
	Py_ssize_t n, i;
	struct region *table = NULL;
	Py_buffer *mems = NULL;
	Py_ssize_t got = 0;

	if (check_open(self) < 0)
		return NULL;
	seq = PySequence_Fast(arg, "regions must be a sequence of (start, end, shift, base, offset, mem)");
	if (!seq)
		return NULL;
	n = PySequence_Fast_GET_SIZE(seq);
	table = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*table));
	mems = PyMem_Calloc(n ? (size_t)n : 1, sizeof(*mems));
	if (!table || !mems) {
		PyErr_NoMemory();
		goto fail;
	}
	for (i = 0; i < n; i++) {
		struct region *r = &table[i];
		unsigned long long start, end, base, offset;
		unsigned shift;
		PyObject *mem;

		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKIKKO", &start, &end, &shift, &base, &offset,
				      &mem))
			goto fail;
		if (PyObject_GetBuffer(mem, &mems[i], PyBUF_WRITABLE) < 0)
			goto fail;
		got++;
		if (shift < 12 || shift > 30 || end <= start || (end - start) & ((1ull << shift) - 1) ||
		    base > (uint64_t)self->states.len || (end - start) >> shift > (uint64_t)self->states.len - base ||
		    (uint64_t)mems[i].len != end - start) {
			PyErr_Format(PyExc_ValueError, "region %zd does not match the page states or its mapping", i);
			goto fail;
		}
		*r = (struct region){ start, end, offset, base, (end - start) >> shift, shift, mems[i].buf };
	}
	Py_DECREF(seq);
	release_regions(self);
	self->regions = table;
	self->mems = mems;
	self->nregions = self->nmems = n;
	Py_RETURN_NONE;
fail:
	for (i = 0; i < got; i++)
		PyBuffer_Release(&mems[i]);
	Py_DECREF(seq);
	PyMem_Free(table);
	PyMem_Free(mems);
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

/* Book a vCPU's wait as SessionStats.book does. */
static int book(FastPath *self, uint32_t tid, uint64_t t0)
{
	uint64_t ns = now_ns() - t0, b = 0;
	uint64_t *hist = self->hist.buf;

	for (uint64_t q = ns >> 10; q; q >>= 1)
		b++;
	hist[b < HIST_BUCKETS ? b : HIST_BUCKETS - 1]++;
	self->c.ns += ns;
	return add_blocked(self->by_tid, tid, ns);
}

/* Pages [lo, lo+n) are mapped: FILLED, and counted as Guest.mark_filled counts them. */
static void mark_filled(FastPath *self, struct region *r, uint64_t lo, uint64_t n, uint64_t idx)
{
	uint8_t *st = (uint8_t *)self->states.buf + r->base;
	int hit = lo <= idx && idx < lo + n;

	memset(st + lo, FILLED, n);
	*(int64_t *)self->in_place.buf += (int64_t)n;
	self->c.pages += n;
	self->c.bytes += n << r->shift;
	self->c.demand += hit;
	self->c.fault_around += n - hit;
}

/* A stale duplicate fault on a FILLED page: map it again, as Guest.remap does. 0: done. */
static int remap(FastPath *self, uint64_t addr, uint64_t ps)
{
	struct uffdio_continue c = { .range = { addr, ps }, .mode = 0 };
	if (ioctl(self->uffd, UFFDIO_CONTINUE, &c) == 0)
		return 0;
	if (errno == EEXIST) {
		struct uffdio_range wake = { addr, ps };
		(void)ioctl(self->uffd, UFFDIO_WAKE, &wake); /* as Python: a failed wake is not retried */
		return 0;
	}
	return -1;
}

enum { SERVED, LEFT, FAILED_RUN };

/* Remote mode: ask the link for the run; the fault is over for now (the link's sink installs). */
static int submit_remote(FastPath *self, const struct uffd_msg *m, struct region *r, Py_ssize_t pos, uint64_t lo,
			 uint64_t n, uint64_t idx, uint64_t t0)
{
	uint8_t *st = (uint8_t *)self->states.buf + r->base;
	uint32_t slot;

	if (self->pend_free >= MAX_PEND) {
		for (slot = 0; slot < MAX_PEND && self->pend[slot].used; slot++)
			;
		if (slot == MAX_PEND)
			return LEFT;
	} else {
		slot = self->pend_free;
	}
	memset(st + lo, FILLING, n);
	if (self->api->submit(self->link, r->offset + (lo << r->shift), (uint32_t)((n << r->shift) >> 12),
			      r->mem + (lo << r->shift), slot) < 0) {
		memset(st + lo, EMPTY, n);
		return LEFT;
	}
	self->pend[slot] = (struct pend){ r->base + lo, n, r->base + idx, t0, m->arg.pagefault.feat.ptid, 1 };
	self->pend_free = slot + 1 < MAX_PEND && !self->pend[slot + 1].used ? slot + 1 : MAX_PEND;
	self->submitted = 1;
	self->c.faults++;
	self->c.minor += (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
	self->c.async_fills++;
	self->last_region = pos;
	self->last_idx = idx;
	return SERVED;
}

/* Fill and map the fault-around run of a fault on EMPTY page idx. */
static int demand(FastPath *self, const struct uffd_msg *m, struct region *r, Py_ssize_t pos, uint64_t idx,
		  uint64_t t0)
{
	uint8_t *st = (uint8_t *)self->states.buf + r->base;
	uint64_t lo = idx, hi = idx + 1, n, len;
	struct uffdio_continue c;

	if (self->fa_pages > 1) {
		uint64_t b0 = idx & ~(self->fa_pages - 1);
		uint64_t b1 = b0 + self->fa_pages < r->npages ? b0 + self->fa_pages : r->npages;
		while (lo > b0 && st[lo - 1] == EMPTY)
			lo--;
		while (hi < b1 && st[hi] == EMPTY)
			hi++;
	}
	n = hi - lo;
	len = n << r->shift;
	if (self->api)
		return submit_remote(self, m, r, pos, lo, n, idx, t0);
	memset(st + lo, FILLING, n);
	{
		struct iovec iov = { r->mem + (lo << r->shift), len };
		ssize_t got = preadv2(self->src_fd, &iov, 1, (off_t)(r->offset + (lo << r->shift)), self->rwf);
		if (got < 0 || (uint64_t)got != len) {
			memset(st + lo, EMPTY, n);
			return LEFT;
		}
	}
	memset(st + lo, INSTALLING, n);
	self->c.faults++;
	self->c.minor += (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
	self->c.inline_fills++;
	self->last_region = pos;
	self->last_idx = idx;
	c = (struct uffdio_continue){ .range = { r->start + (lo << r->shift), len }, .mode = 0 };
	if (ioctl(self->uffd, UFFDIO_CONTINUE, &c) != 0) {
		uint64_t done = errno == EAGAIN && c.mapped > 0 ? (uint64_t)c.mapped >> r->shift : 0;
		if (done)
			mark_filled(self, r, lo, done, idx);
		self->failed_region = pos;
		self->failed_lo = lo + done;
		self->failed_n = n - done;
		return FAILED_RUN;
	}
	mark_filled(self, r, lo, n, idx);
	return book(self, m->arg.pagefault.feat.ptid, t0) < 0 ? -1 : SERVED;
}

/* Write the READs this batch queued: one system call for all of them. */
static void flush_link(FastPath *self)
{
	if (self->submitted) {
		self->submitted = 0;
		(void)self->api->flush(self->link); /* a link that is down sends them when it is back */
	}
}

/* Find the live region holding global pages [g, g+n) and the index of g in it, or NULL. */
static struct region *region_of(FastPath *self, uint64_t g, uint64_t n, Py_ssize_t *pos, uint64_t *lo)
{
	for (Py_ssize_t i = 0; i < self->nregions; i++) {
		struct region *r = &self->regions[i];
		if (r->base <= g && g + n <= r->base + r->npages) {
			*pos = i;
			*lo = g - r->base;
			return r;
		}
	}
	return NULL;
}

static void call_notify(FastPath *self)
{
	PyObject *res;
	if (!self->notify || self->notify == Py_None)
		return;
	res = PyObject_CallNoArgs(self->notify);
	if (res)
		Py_DECREF(res);
	else
		PyErr_WriteUnraisable(self->notify);
}

static void remote_failure(FastPath *self, int kind, int status, const struct pend *p)
{
	PyObject *t = Py_BuildValue("(iiKKKKI)", kind, status, p->g, p->n, p->gidx, p->t0, p->tid);
	if (!t || PyList_Append(self->failures, t) < 0)
		PyErr_WriteUnraisable(self->link);
	Py_XDECREF(t);
	call_notify(self);
}

/* The link's sink: a remote demand fill is over. Install it as demand() would have, or hand
 * it to Python (the run moved, a page changed state meanwhile, the kernel refused, the fetch
 * failed). Runs inside Link.receive(), with the GIL. */
static void remote_sink(void *owner, uint64_t cookie, int status)
{
	FastPath *self = owner;
	struct pend p = self->pend[cookie];
	uint8_t *states = self->states.buf;
	struct region *r;
	Py_ssize_t pos;
	uint64_t lo;

	self->pend[cookie].used = 0;
	if (cookie < self->pend_free)
		self->pend_free = (uint32_t)cookie;
	if (status != LINK_OK) {
		remote_failure(self, status == LINK_GONE ? LF_GONE : LF_FETCH, status, &p);
		return;
	}
	r = region_of(self, p.g, p.n, &pos, &lo);
	for (uint64_t k = 0; r && k < p.n; k++)
		if (states[p.g + k] != FILLING)
			r = NULL;
	if (!r) { /* moved, split or discarded meanwhile: Python's install handles every case */
		remote_failure(self, LF_INSTALL, 0, &p);
		return;
	}
	memset(states + p.g, INSTALLING, p.n);
	struct uffdio_continue c = { .range = { r->start + (lo << r->shift), p.n << r->shift }, .mode = 0 };
	if (ioctl(self->uffd, UFFDIO_CONTINUE, &c) != 0) {
		uint64_t done = errno == EAGAIN && c.mapped > 0 ? (uint64_t)c.mapped >> r->shift : 0;
		if (done)
			mark_filled(self, r, lo, done, p.gidx - r->base);
		p.g += done;
		p.n -= done;
		remote_failure(self, LF_INSTALL, 0, &p);
		return;
	}
	mark_filled(self, r, lo, p.n, p.gidx - r->base);
	if (book(self, p.tid, p.t0) < 0)
		PyErr_WriteUnraisable(self->link);
	if (*(int64_t *)self->in_place.buf >= (int64_t)self->total)
		call_notify(self);
}

/* Handle msgs[i..end) until one must go to Python; returns its index (end: all handled), or -1
 * with an exception set. */
static Py_ssize_t serve_msgs(FastPath *self, const struct uffd_msg *msgs, Py_ssize_t i, Py_ssize_t end,
			     uint64_t t0)
{
	uint8_t *states = self->states.buf;

	self->failed_region = -1;
	for (; i < end; i++) {
		const struct uffd_msg *m = &msgs[i];
		uint64_t addr, idx;
		struct region *r;
		Py_ssize_t pos;
		int rc;

		if (m->event != UFFD_EVENT_PAGEFAULT)
			break;
		addr = m->arg.pagefault.address;
		r = find(self, addr, &pos);
		if (!r)
			break;
		idx = (addr - r->start) >> r->shift;
		switch (states[r->base + idx]) {
		case EMPTY:
			rc = demand(self, m, r, pos, idx, t0);
			if (rc < 0)
				return -1;
			if (rc != SERVED)
				return i;
			break;
		case FILLED:
			if (remap(self, r->start + (idx << r->shift), (uint64_t)1 << r->shift) != 0)
				return i;
			self->c.faults++;
			self->c.minor += (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
			self->c.already_mapped++;
			break;
		default:
			return i;
		}
	}
	return i;
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
	flush_link(self);
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
		flush_link(self);
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

/* take() -> counters since the last take (see COUNTERS), region position, page index; resets. */
static PyObject *FastPath_take(FastPath *self, PyObject *Py_UNUSED(ignored))
{
	struct counts *c = &self->c;
	PyObject *res = Py_BuildValue("(KKKKKKKKKKnK)", c->faults, c->minor, c->inline_fills, c->pages, c->demand,
				      c->fault_around, c->bytes, c->ns, c->already_mapped, c->async_fills,
				      self->last_region, self->last_idx);
	if (res)
		memset(c, 0, sizeof(*c));
	return res;
}

/* failed() -> None, or (region position, first page, pages) of the run whose CONTINUE was
 * refused for the message serve() or drain() last returned; the run is INSTALLING. */
static PyObject *FastPath_failed(FastPath *self, PyObject *Py_UNUSED(ignored))
{
	if (self->failed_region < 0)
		Py_RETURN_NONE;
	return Py_BuildValue("(nKK)", self->failed_region, self->failed_lo, self->failed_n);
}

/* link_failures() -> list of (kind, status, first global page, pages, global page faulted on, t0,
 * tid): remote fills Python must take over (kind 1: fetch again; 2: install the run, its bytes
 * are complete; 3: the memory file no longer holds it). */
static PyObject *FastPath_link_failures(FastPath *self, PyObject *Py_UNUSED(ignored))
{
	PyObject *out;
	if (!self->failures)
		return PyList_New(0);
	out = self->failures;
	self->failures = PyList_New(0);
	if (!self->failures) {
		self->failures = out;
		return NULL;
	}
	return out;
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
	{ "take", (PyCFunction)FastPath_take, METH_NOARGS, "take() -> (COUNTERS..., region, index) since the last take" },
	{ "link_failures", (PyCFunction)FastPath_link_failures, METH_NOARGS,
	  "link_failures() -> [(kind, status, g, n, gidx, t0, tid)]: remote fills for Python to take over" },
	{ "failed", (PyCFunction)FastPath_failed, METH_NOARGS,
	  "failed() -> None or (region, lo, n): the INSTALLING run of the message last returned" },
	{ "set_regions", (PyCFunction)FastPath_set_regions, METH_O,
	  "set_regions([(start, end, shift, base, offset, mem), ...])" },
	{ "close", (PyCFunction)FastPath_close, METH_NOARGS, "release the buffers (states, hist, mappings)" },
	{ NULL, NULL, 0, NULL },
};

static PyTypeObject FastPathType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.core._fastpath.FastPath",
	.tp_basicsize = sizeof(FastPath),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Demand fills (with fault-around) + UFFDIO_CONTINUE for one shared-memory session.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)FastPath_init,
	.tp_dealloc = (destructor)FastPath_dealloc,
	.tp_methods = FastPath_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastpath", "The fault loop's common case in C (see the file's comment).", -1,
	NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
	PyObject *m, *counters;
	if (PyType_Ready(&FastPathType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&FastPathType);
	if (PyModule_AddObject(m, "FastPath", (PyObject *)&FastPathType) < 0) {
		Py_DECREF(&FastPathType);
		goto fail;
	}
	counters = Py_BuildValue("(ssssssssss)", "fault_msgs", "minor_faults", "fills_inline", "pages_filled",
				 "pages_demand", "pages_fault_around", "bytes_filled", "blocked_ns", "already_mapped",
				 "fills_async");
	if (!counters || PyModule_AddObject(m, "COUNTERS", counters) < 0) {
		Py_XDECREF(counters);
		goto fail;
	}
	if (PyModule_AddIntConstant(m, "HIST_BUCKETS", HIST_BUCKETS) < 0 ||
	    PyModule_AddIntConstant(m, "EMPTY", EMPTY) < 0 || PyModule_AddIntConstant(m, "FILLING", FILLING) < 0 ||
	    PyModule_AddIntConstant(m, "INSTALLING", INSTALLING) < 0 ||
	    PyModule_AddIntConstant(m, "FILLED", FILLED) < 0)
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}
