/*
 * uffdd.peer._native: the peer protocol's hot paths in C, on connections Python set up.
 *
 * Python does everything around a connection: connect, TLS (a TLS connection stays in Python),
 * the HELLO/CHALLENGE/AUTH/WELCOME exchange, key derivation, keepalive timing, reconnects and
 * errors. Once a plain connection is up, it hands the socket to one of these:
 *
 * Link (the destination's urgent connection): requests go out as READ frames (tagged on an
 * authenticated connection); answers are read into a staging buffer, parsed, their tags and
 * every block's crc32c checked, and only then written to the request's destination. Requests
 * come from Python (an event per frame is returned by receive()) or from a C owner, the fault
 * path (uffdd/core/_fastpath.c, through the capsule API of uffdd/csrc/link_api.h), whose
 * destinations are guest memory: written with a SIGBUS-guarded copy, then reported to the
 * owner's sink without the interpreter. Requests survive the connection: detach() marks them
 * unsent, attach() sends them again on the next one.
 *
 * Responder (the source's urgent connection): see _responder.c.
 *
 * Frames are checked exactly as uffdd/peer/protocol checks them; anything unexpected ends the
 * connection with a reason, and Python takes it from there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"
#include "guard.h"
#include "link_api.h"
#include "wire.h"

#define OWNER_ID_BASE 0x80000000u
#define TABLE_SIZE 4096 /* a power of two, > twice the most requests a link holds */
#define MAX_REQUESTS 2048

int native_add_responder(PyObject *module);

/* Demand fills of C fault paths waiting on urgent links in this process: bulk links (_bulk.c)
 * step aside while there are any. */
int native_urgent_waiting;
int native_add_bulk(PyObject *module);

enum { K_FREE = 0, K_OWNER, K_PY, K_DROPPED };

struct req {
	uint32_t id;
	uint8_t kind, sent, tainted;
	uint16_t refetches;
	uint64_t offset;
	uint32_t count, pos;
	char *dest;
	uint64_t cookie;
	Py_buffer buf; /* K_PY: the destination, held until the request is over */
	int has_buf;
};

typedef struct {
	PyObject_HEAD
	int fd;
	int keyed, attached, unavailable;
	uint8_t tx_key[WIRE_KEY_SIZE], rx_key[WIRE_KEY_SIZE];
	uint64_t tx_seq, rx_seq;
	uint32_t max_blocks, max_inflight, checksum_retries, max_blocks_cap;
	struct req *slots; /* open addressing by id */
	uint32_t count, inflight, unsent;
	uint32_t next_owner_id;
	uint8_t *rx;
	size_t rx_cap, rx_start, rx_end;
	uint8_t *tx;
	size_t tx_cap, tx_len;
	void *owner;
	link_sink_fn sink;
	uint64_t last_rx_ns;
	unsigned long long frames, checksum_failures, tampered, owner_done, owner_requests, owner_resent;
	PyObject *events; /* built during receive() */
	char lost[200];
	int lost_protocol; /* the server broke the protocol (else: the connection broke) */
} Link;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- the request table ------------------------------------------------------------------ */

static struct req *lookup(Link *l, uint32_t id)
{
	for (uint32_t i = id & (TABLE_SIZE - 1);; i = (i + 1) & (TABLE_SIZE - 1)) {
		struct req *r = &l->slots[i];
		if (r->kind == K_FREE)
			return NULL;
		if (r->id == id)
			return r;
	}
}

static struct req *insert(Link *l, uint32_t id)
{
	if (l->count >= MAX_REQUESTS || lookup(l, id))
		return NULL;
	for (uint32_t i = id & (TABLE_SIZE - 1);; i = (i + 1) & (TABLE_SIZE - 1)) {
		struct req *r = &l->slots[i];
		if (r->kind == K_FREE) {
			memset(r, 0, sizeof(*r));
			r->id = id;
			l->count++;
			return r;
		}
	}
}

/* Remove r, shifting later entries of its probe chain back (no tombstones). */
static void erase(Link *l, struct req *r)
{
	uint32_t i = (uint32_t)(r - l->slots), j = i;

	if (r->has_buf)
		PyBuffer_Release(&r->buf);
	if (r->kind == K_OWNER)
		__atomic_fetch_sub(&native_urgent_waiting, 1, __ATOMIC_RELAXED);
	if (r->sent)
		l->inflight--;
	else
		l->unsent--;
	l->count--;
	r->kind = K_FREE;
	for (;;) {
		j = (j + 1) & (TABLE_SIZE - 1);
		struct req *s = &l->slots[j];
		if (s->kind == K_FREE)
			return;
		uint32_t home = s->id & (TABLE_SIZE - 1);
		/* s may move to i if its home is not in (i, j] (cyclically) */
		if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
			l->slots[i] = *s;
			s->kind = K_FREE;
			i = j;
		}
	}
}

/* ---- sending ------------------------------------------------------------------------------ */

static int tx_room(Link *l, size_t n)
{
	if (l->tx_len + n <= l->tx_cap)
		return 0;
	size_t cap = l->tx_cap ? l->tx_cap * 2 : 4096;
	while (cap < l->tx_len + n)
		cap *= 2;
	uint8_t *p = PyMem_Realloc(l->tx, cap);
	if (!p)
		return -1;
	l->tx = p;
	l->tx_cap = cap;
	return 0;
}

/* Append a frame with no payload (READ, PING), tagged on an authenticated link. */
static int put_frame(Link *l, uint8_t type, uint32_t id, uint64_t offset, uint16_t count)
{
	struct frame_header h = { type, l->keyed ? FRAME_FLAG_TAGGED : 0, count, id, offset,
				  l->keyed ? FRAME_TAG : 0, 0 };
	if (tx_room(l, FRAME_HEADER + FRAME_TAG) < 0)
		return -1;
	uint8_t *p = l->tx + l->tx_len;
	frame_put_header(p, &h);
	l->tx_len += FRAME_HEADER;
	if (l->keyed) {
		uint8_t nonce[12];
		struct iovec iov = { p, FRAME_HEADER };
		frame_nonce(l->tx_seq++, nonce);
		wire_aead_tag(l->tx_key, nonce, &iov, 1, p + FRAME_HEADER);
		l->tx_len += FRAME_TAG;
	}
	return 0;
}

/* Queue READs for unsent requests, as many as the server lets be in flight. */
static int pump(Link *l)
{
	if (l->fd < 0 || !l->unsent)
		return 0;
	for (uint32_t i = 0; i < TABLE_SIZE && l->unsent && l->inflight < l->max_inflight; i++) {
		struct req *r = &l->slots[i];
		if (r->kind == K_FREE || r->sent || r->kind == K_DROPPED)
			continue;
		if (put_frame(l, F_READ, r->id, r->offset, (uint16_t)r->count) < 0)
			return -1;
		r->sent = 1;
		r->pos = 0;
		r->tainted = 0;
		l->unsent--;
		l->inflight++;
	}
	return 0;
}

/* Write what is queued: 1 all written, 0 some left (the socket is full), -1 error (errno). */
static int flush(Link *l)
{
	size_t done = 0;
	if (l->fd < 0)
		return -1;
	while (done < l->tx_len) {
		ssize_t n = send(l->fd, l->tx + done, l->tx_len - done, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n < 0)
			return -1;
		done += (size_t)n;
	}
	memmove(l->tx, l->tx + done, l->tx_len - done);
	l->tx_len -= done;
	return l->tx_len == 0;
}

/* ---- receiving ---------------------------------------------------------------------------- */

static int lose(Link *l, const char *why)
{
	snprintf(l->lost, sizeof(l->lost), "%s", why);
	l->lost_protocol = 1;
	return -1;
}

static int event(Link *l, PyObject *ev)
{
	if (!ev)
		return -1;
	if (!l->events) {
		l->events = PyList_New(0);
		if (!l->events) {
			Py_DECREF(ev);
			return -1;
		}
	}
	int rc = PyList_Append(l->events, ev);
	Py_DECREF(ev);
	return rc;
}

/* An owner request is over: tell the owner (C, no interpreter) and forget it. */
static void owner_over(Link *l, struct req *r, int status)
{
	uint64_t cookie = r->cookie;
	int kind = r->kind;
	erase(l, r);
	if (kind == K_OWNER && l->sink)
		l->sink(l->owner, cookie, status);
	l->owner_done++;
}

static const uint32_t ZERO_CRC_VALUE = 0x98F94189u; /* crc32c of a 4 KiB block of zeros, checked at init */

/* A whole DATA frame at f (payload plen bytes after the header, tag already checked). */
static int on_data(Link *l, const struct frame_header *h, const uint8_t *f, uint32_t plen)
{
	struct req *r = lookup(l, h->id);
	const uint8_t *table = f + FRAME_HEADER, *payload;
	uint32_t n = h->count, total = 0;
	int ok = 1;

	if (!n || n > l->max_blocks)
		return lose(l, "DATA count out of range");
	if (plen < n * FRAME_DESC || plen > n * (FRAME_DESC + FRAME_BLOCK))
		return lose(l, "DATA length impossible for its count");
	if (!r || !r->sent)
		return lose(l, "DATA for a request that is not in flight");
	if (h->offset != r->offset + ((uint64_t)r->pos << FRAME_BLOCK_SHIFT) || n > r->count - r->pos)
		return lose(l, "DATA does not continue its request");
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *d = table + i * FRAME_DESC;
		uint32_t stored = (uint32_t)(d[4] | d[5] << 8);
		if (d[7] || (d[6] == ENC_RAW && stored != FRAME_BLOCK) || (d[6] == ENC_ZERO && stored != 0) ||
		    d[6] > ENC_ZERO)
			return lose(l, "DATA block descriptor not allowed on this link");
		total += stored;
	}
	if (total != plen - n * FRAME_DESC)
		return lose(l, "DATA blocks do not add up to its length");
	payload = table + n * FRAME_DESC;
	for (uint32_t i = 0, off = 0; i < n; i++) {
		const uint8_t *d = table + i * FRAME_DESC;
		uint32_t crc = wire_load_le32(d);
		if (d[6] == ENC_RAW) {
			ok &= wire_crc32c(0, payload + off, FRAME_BLOCK) == crc;
			off += FRAME_BLOCK;
		} else {
			ok &= crc == ZERO_CRC_VALUE;
		}
	}
	if (ok && r->dest) {
		char *dest = r->dest + ((size_t)r->pos << FRAME_BLOCK_SHIFT);
		for (uint32_t i = 0, off = 0; i < n; i++) {
			const uint8_t *d = table + i * FRAME_DESC;
			const uint8_t *src = d[6] == ENC_RAW ? payload + off : NULL;
			if (guarded_copy(dest + ((size_t)i << FRAME_BLOCK_SHIFT), src, FRAME_BLOCK) < 0) {
				if (r->kind != K_PY) {
					owner_over(l, r, LINK_GONE);
					return 0;
				}
				return lose(l, "a request's buffer could not be written");
			}
			if (src)
				off += FRAME_BLOCK;
		}
	}
	r->pos += n;
	if (!ok)
		r->tainted = 1;
	if (r->kind == K_PY) {
		PyObject *ev = Py_BuildValue("(sIIO)", "data", h->id, n, ok ? Py_True : Py_False);
		if (r->pos == r->count)
			erase(l, r); /* the channel decides about a refetch and submits again */
		return event(l, ev);
	}
	if (r->pos < r->count)
		return 0;
	if (r->kind == K_DROPPED) {
		erase(l, r);
		return 0;
	}
	if (r->tainted) {
		l->checksum_failures++; /* Python counts its own requests' */
		if (r->refetches++ >= l->checksum_retries) {
			owner_over(l, r, LINK_CHECKSUM);
			return 0;
		}
		r->sent = 0; /* fetch it again: the bytes at dest were never reported */
		l->inflight--;
		l->unsent++;
		return pump(l);
	}
	owner_over(l, r, LINK_OK);
	return 0;
}

static int on_error(Link *l, const struct frame_header *h, const uint8_t *payload, uint32_t plen)
{
	struct req *r;

	if (plen > FRAME_MAX_ERROR)
		return lose(l, "ERROR message too long");
	if (h->id == 0)
		return event(l, Py_BuildValue("(sIy#)", "server", h->aux, payload, (Py_ssize_t)plen));
	r = lookup(l, h->id);
	if (!r || !r->sent)
		return lose(l, "ERROR for a request that is not in flight");
	if (r->kind == K_PY) {
		erase(l, r);
		return event(l, Py_BuildValue("(sIIy#)", "error", h->id, h->aux, payload, (Py_ssize_t)plen));
	}
	owner_over(l, r, (int)(h->aux ? h->aux : 1));
	return 0;
}

/* Handle every whole frame in the staging buffer; -1 when the connection must end. */
static int parse(Link *l)
{
	while (l->rx_end - l->rx_start >= FRAME_HEADER) {
		uint8_t *f = l->rx + l->rx_start;
		struct frame_header h;
		uint32_t plen;
		int tagged;

		frame_get_header(f, &h);
		tagged = h.flags & FRAME_FLAG_TAGGED;
		if (h.type != F_DATA && h.type != F_PONG && h.type != F_ERROR)
			return lose(l, "unexpected frame type");
		if (h.flags & ~FRAME_FLAG_TAGGED)
			return lose(l, "undefined flags");
		if (tagged != l->keyed) {
			l->tampered += l->keyed;
			return lose(l, l->keyed ? "tampered: untagged frame on an authenticated connection"
						: "tagged frame on a connection without keys");
		}
		if (h.length > (uint64_t)l->max_blocks * (FRAME_DESC + FRAME_BLOCK) + FRAME_TAG + FRAME_MAX_ERROR ||
		    (tagged && h.length < FRAME_TAG))
			return lose(l, "frame length out of range");
		if (l->rx_end - l->rx_start < (size_t)FRAME_HEADER + h.length)
			return 0; /* not whole yet */
		plen = h.length - (tagged ? FRAME_TAG : 0);
		if (tagged) {
			uint8_t nonce[12];
			struct iovec iov = { f, FRAME_HEADER + plen };
			frame_nonce(l->rx_seq++, nonce);
			if (wire_aead_verify(l->rx_key, nonce, &iov, 1, f + FRAME_HEADER + plen) != 0) {
				l->tampered++;
				return lose(l, "tampered: a frame failed its tag");
			}
		}
		if ((h.type == F_ERROR && (h.count || h.offset)) || (h.type == F_DATA && h.aux))
			return lose(l, h.type == F_ERROR ? "ERROR must have count and offset 0" : "DATA aux field must be 0");
		l->rx_start += FRAME_HEADER + h.length;
		l->frames++;
		int rc = 0;
		if (h.type == F_DATA)
			rc = on_data(l, &h, f, plen);
		else if (h.type == F_ERROR)
			rc = on_error(l, &h, f + FRAME_HEADER, plen);
		else if (plen || h.count || h.offset || h.aux)
			rc = lose(l, "malformed PONG");
		if (rc < 0)
			return -1;
	}
	return 0;
}

/* ---- Python interface --------------------------------------------------------------------- */

static int Link_init(Link *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "max_blocks", "max_inflight", "checksum_retries", NULL };
	unsigned int mb = 1024, mi = 256, cr = 5;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|III", kwlist, &mb, &mi, &cr))
		return -1;
	if (!mb || mb > 0xFFFF || !mi || mi > MAX_REQUESTS) {
		PyErr_SetString(PyExc_ValueError, "max_blocks 1..65535, max_inflight 1..2048");
		return -1;
	}
	if (guard_install() < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	self->fd = -1;
	self->max_blocks = self->max_blocks_cap = mb;
	self->max_inflight = mi;
	self->checksum_retries = cr;
	self->next_owner_id = OWNER_ID_BASE;
	if (!self->slots)
		self->slots = PyMem_Calloc(TABLE_SIZE, sizeof(struct req));
	if (!self->slots) {
		PyErr_NoMemory();
		return -1;
	}
	return 0;
}

static void drop_all(Link *self)
{
	if (!self->slots)
		return;
	for (uint32_t i = 0; i < TABLE_SIZE; i++) {
		struct req *r = &self->slots[i];
		if (r->kind != K_FREE && r->has_buf) {
			PyBuffer_Release(&r->buf);
			r->has_buf = 0;
		}
		if (r->kind == K_OWNER)
			__atomic_fetch_sub(&native_urgent_waiting, 1, __ATOMIC_RELAXED);
		r->kind = K_FREE;
	}
	self->count = self->inflight = self->unsent = 0;
}

static void Link_dealloc(Link *self)
{
	if (self->fd >= 0)
		close(self->fd);
	drop_all(self);
	PyMem_Free(self->slots);
	PyMem_Free(self->rx);
	PyMem_Free(self->tx);
	Py_CLEAR(self->events);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The connection is over: the owner's requests go back to unsent (they are sent again on the
 * next one); Python's are forgotten (its channel sends them again itself); buffers emptied. */
static void reset_connection(Link *self)
{
	if (self->fd >= 0)
		close(self->fd);
	self->fd = -1;
	for (uint32_t i = 0; i < TABLE_SIZE; i++) {
		struct req *r = &self->slots[i];
		if (r->kind == K_FREE || (r->kind == K_OWNER && !r->sent))
			continue;
		if (r->kind != K_OWNER) {
			erase(self, r);
			i--; /* erase may have moved another entry into this slot */
			continue;
		}
		r->sent = 0;
		r->pos = 0;
		r->tainted = 0;
		self->inflight--;
		self->unsent++;
	}
	self->rx_start = self->rx_end = 0;
	self->tx_len = 0;
}

/* attach(fd, tx_key, rx_key, tx_seq, rx_seq, max_blocks, max_inflight): take a connected socket
 * (the link owns it from now on); keys are None on a connection without a shared secret, the
 * sequence numbers are those of the next frame each way. Unsent requests are queued at once
 * (call flush()). */
static PyObject *Link_attach(Link *self, PyObject *args)
{
	int fd;
	Py_buffer txk = { 0 }, rxk = { 0 };
	PyObject *txo, *rxo;
	unsigned long long tx_seq, rx_seq;
	unsigned int mb, mi;

	if (!PyArg_ParseTuple(args, "iOOKKII", &fd, &txo, &rxo, &tx_seq, &rx_seq, &mb, &mi))
		return NULL;
	if (!mb || mb > 0xFFFF || !mi) {
		PyErr_SetString(PyExc_ValueError, "limits out of range");
		return NULL;
	}
	reset_connection(self);
	self->keyed = txo != Py_None;
	if (self->keyed) {
		if (PyObject_GetBuffer(txo, &txk, PyBUF_SIMPLE) < 0)
			return NULL;
		if (PyObject_GetBuffer(rxo, &rxk, PyBUF_SIMPLE) < 0) {
			PyBuffer_Release(&txk);
			return NULL;
		}
		if (txk.len != WIRE_KEY_SIZE || rxk.len != WIRE_KEY_SIZE) {
			PyBuffer_Release(&txk);
			PyBuffer_Release(&rxk);
			PyErr_SetString(PyExc_ValueError, "keys have 32 bytes");
			return NULL;
		}
		memcpy(self->tx_key, txk.buf, WIRE_KEY_SIZE);
		memcpy(self->rx_key, rxk.buf, WIRE_KEY_SIZE);
		PyBuffer_Release(&txk);
		PyBuffer_Release(&rxk);
	}
	self->tx_seq = tx_seq;
	self->rx_seq = rx_seq;
	self->max_blocks = mb < self->max_blocks_cap ? mb : self->max_blocks_cap; /* this server's limit */
	self->max_inflight = mi < MAX_REQUESTS ? mi : MAX_REQUESTS;
	size_t need = FRAME_HEADER + (size_t)self->max_blocks * (FRAME_DESC + FRAME_BLOCK) + FRAME_TAG + 4096;
	if (self->rx_cap < need) {
		uint8_t *p = PyMem_Realloc(self->rx, need);
		if (!p)
			return PyErr_NoMemory();
		self->rx = p;
		self->rx_cap = need;
	}
	self->fd = fd;
	self->last_rx_ns = now_ns();
	for (uint32_t i = 0; self->attached && i < TABLE_SIZE; i++)
		self->owner_resent += self->slots[i].kind == K_OWNER; /* waited through the outage */
	self->attached = 1;
	self->unavailable = 0;
	if (pump(self) < 0)
		return PyErr_NoMemory();
	Py_RETURN_NONE;
}

static PyObject *Link_detach(Link *self, PyObject *Py_UNUSED(ignored))
{
	reset_connection(self);
	Py_RETURN_NONE;
}

/* submit(id, offset, count, dest): a request of Python's (id below 2**31); the bytes go to dest. */
static PyObject *Link_submit(Link *self, PyObject *args)
{
	unsigned int id, count;
	unsigned long long offset;
	PyObject *dest;
	struct req *r;

	if (!PyArg_ParseTuple(args, "IKIO", &id, &offset, &count, &dest))
		return NULL;
	if (!id || id >= OWNER_ID_BASE || !count || count > self->max_blocks || offset & (FRAME_BLOCK - 1)) {
		PyErr_SetString(PyExc_ValueError, "id 1..2**31-1, count 1..max_blocks, offset block aligned");
		return NULL;
	}
	r = insert(self, id);
	if (!r)
		return PyErr_Format(PyExc_ValueError, "request %u is already pending, or too many are", id);
	if (PyObject_GetBuffer(dest, &r->buf, PyBUF_WRITABLE) < 0) {
		r->kind = K_PY; /* so that erase() accounts for it */
		self->unsent++;
		erase(self, r);
		return NULL;
	}
	r->has_buf = 1;
	r->kind = K_PY;
	r->offset = offset;
	r->count = count;
	self->unsent++;
	if (r->buf.len != (Py_ssize_t)count << FRAME_BLOCK_SHIFT) {
		erase(self, r);
		PyErr_SetString(PyExc_ValueError, "dest must hold count blocks");
		return NULL;
	}
	r->dest = r->buf.buf;
	if (pump(self) < 0)
		return PyErr_NoMemory();
	Py_RETURN_NONE;
}

/* discard(id): Python no longer waits for request id; its bytes, if they still come, are dropped
 * (and its buffer is let go of at once). */
static PyObject *Link_discard(Link *self, PyObject *arg)
{
	unsigned long id = PyLong_AsUnsignedLong(arg);
	struct req *r;

	if (PyErr_Occurred())
		return NULL;
	r = lookup(self, (uint32_t)id);
	if (r && r->kind == K_PY) {
		if (!r->sent) {
			erase(self, r);
		} else { /* its answer still comes to Python (the channel counts it), without bytes */
			if (r->has_buf)
				PyBuffer_Release(&r->buf);
			r->has_buf = 0;
			r->dest = NULL;
		}
	}
	Py_RETURN_NONE;
}

/* unavailable(): the peer has been unreachable past its deadline: the owner's requests end
 * with LINK_UNAVAILABLE (it fails them loudly and retries its own way), and new ones are refused
 * until the next attach(). */
static PyObject *Link_unavailable(Link *self, PyObject *Py_UNUSED(ignored))
{
	self->unavailable = 1;
	for (uint32_t i = 0; i < TABLE_SIZE; i++) {
		struct req *r = &self->slots[i];
		if (r->kind == K_OWNER) {
			owner_over(self, r, LINK_UNAVAILABLE);
			i--; /* erase may have moved another entry into this slot */
		}
	}
	Py_RETURN_NONE;
}

static PyObject *Link_ping(Link *self, PyObject *arg)
{
	unsigned long id = PyLong_AsUnsignedLong(arg);

	if (PyErr_Occurred())
		return NULL;
	if (self->fd >= 0 && put_frame(self, F_PING, (uint32_t)id, 0, 0) < 0)
		return PyErr_NoMemory();
	Py_RETURN_NONE;
}

/* flush() -> True (everything written) or False (the rest waits for the socket); OSError if it broke. */
static PyObject *Link_flush(Link *self, PyObject *Py_UNUSED(ignored))
{
	int rc = flush(self);
	if (rc < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	return PyBool_FromLong(rc);
}

/* receive() -> None, or a list of events: ("data", id, blocks, ok), ("error", id, code, message),
 * ("server", code, message), and last ("lost", reason, protocol) when the connection must end
 * (protocol: the server broke the protocol, else the connection broke). Owner
 * requests are completed inside, through the owner's sink. */
static PyObject *Link_receive(Link *self, PyObject *Py_UNUSED(ignored))
{
	int lost = 0;

	Py_CLEAR(self->events);
	self->lost[0] = '\0';
	self->lost_protocol = 0;
	while (self->fd >= 0) {
		if (self->rx_start && self->rx_start == self->rx_end)
			self->rx_start = self->rx_end = 0;
		if (self->rx_end == self->rx_cap) { /* a partial frame at the end: move it to the front */
			memmove(self->rx, self->rx + self->rx_start, self->rx_end - self->rx_start);
			self->rx_end -= self->rx_start;
			self->rx_start = 0;
		}
		ssize_t n = recv(self->fd, self->rx + self->rx_end, self->rx_cap - self->rx_end, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n <= 0) {
			lost = 1;
			snprintf(self->lost, sizeof(self->lost), "%s", n == 0 ? "server closed the connection"
									     : strerror(errno));
			break;
		}
		self->rx_end += (size_t)n;
		self->last_rx_ns = now_ns();
		if (parse(self) < 0) {
			if (PyErr_Occurred())
				return NULL;
			lost = 1;
			break;
		}
	}
	if (!lost && self->unsent && self->fd >= 0 && flush(self) < 0 && errno != EAGAIN) {
		lost = 1;
		snprintf(self->lost, sizeof(self->lost), "%s", strerror(errno));
	}
	if (lost && event(self, Py_BuildValue("(ssO)", "lost", self->lost, self->lost_protocol ? Py_True : Py_False)) < 0)
		return NULL;
	if (!self->events)
		Py_RETURN_NONE;
	PyObject *out = self->events;
	self->events = NULL;
	return out;
}

static PyObject *Link_get_stats(Link *self, void *Py_UNUSED(closure))
{
	return Py_BuildValue("{sKsKsKsKsKsKsIsIsI}", "frames", self->frames, "checksum_failures",
			     self->checksum_failures, "tampered", self->tampered, "owner_done", self->owner_done,
			     "owner_requests", self->owner_requests, "owner_resent", self->owner_resent, "pending",
			     self->count, "inflight", self->inflight, "unsent", self->unsent);
}

static PyObject *Link_get_fd(Link *self, void *Py_UNUSED(closure))
{
	return PyLong_FromLong(self->fd);
}

static PyObject *Link_get_last_rx(Link *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(self->last_rx_ns);
}

static PyObject *Link_get_tx_pending(Link *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(self->tx_len);
}

/* ---- the owner's C interface (link_api.h) --------------------------------------------------- */

static void api_set_owner(void *link, void *owner, link_sink_fn sink)
{
	Link *l = link;
	if (!owner) {
		/* The owner goes away (its destinations with it): nothing is written there any more. */
		for (uint32_t i = 0; i < TABLE_SIZE; i++) {
			struct req *r = &l->slots[i];
			if (r->kind != K_OWNER)
				continue;
			if (r->sent) {
				__atomic_fetch_sub(&native_urgent_waiting, 1, __ATOMIC_RELAXED);
				r->kind = K_DROPPED;
				r->dest = NULL;
			} else {
				erase(l, r);
				i--;
			}
		}
	}
	l->owner = owner;
	l->sink = sink;
}

static int api_submit(void *link, uint64_t offset, uint32_t count, char *dest, uint64_t cookie)
{
	Link *l = link;
	struct req *r;
	uint32_t id;

	if (!l->owner || l->unavailable || !count || count > l->max_blocks || l->count >= MAX_REQUESTS - 1)
		return -1;
	do {
		id = l->next_owner_id++;
		if (l->next_owner_id == 0)
			l->next_owner_id = OWNER_ID_BASE;
	} while (lookup(l, id));
	r = insert(l, id);
	if (!r)
		return -1;
	r->kind = K_OWNER;
	r->offset = offset;
	r->count = count;
	r->dest = dest;
	r->cookie = cookie;
	l->unsent++;
	l->owner_requests++;
	__atomic_fetch_add(&native_urgent_waiting, 1, __ATOMIC_RELAXED);
	return pump(l);
}

static int api_flush(void *link)
{
	Link *l = link;
	if (l->fd < 0)
		return -1;
	return flush(l) < 0 ? -1 : 0;
}

static struct link_api link_api = { LINK_API_VERSION, api_set_owner, api_submit, api_flush };

static PyObject *Link_get_api(Link *Py_UNUSED(self), void *Py_UNUSED(closure))
{
	return PyCapsule_New(&link_api, LINK_API_CAPSULE, NULL);
}

static PyMethodDef Link_methods[] = {
	{ "attach", (PyCFunction)Link_attach, METH_VARARGS,
	  "attach(fd, tx_key, rx_key, tx_seq, rx_seq, max_blocks, max_inflight)" },
	{ "detach", (PyCFunction)Link_detach, METH_NOARGS, "close the socket; requests in flight go back to unsent" },
	{ "submit", (PyCFunction)Link_submit, METH_VARARGS, "submit(id, offset, count, dest)" },
	{ "discard", (PyCFunction)Link_discard, METH_O, "discard(id): nobody waits for it any more" },
	{ "ping", (PyCFunction)Link_ping, METH_O, "ping(id): queue a PING" },
	{ "unavailable", (PyCFunction)Link_unavailable, METH_NOARGS,
	  "unavailable(): end the owner's requests (past the deadline), refuse new ones until attach()" },
	{ "flush", (PyCFunction)Link_flush, METH_NOARGS, "flush() -> whether everything was written" },
	{ "receive", (PyCFunction)Link_receive, METH_NOARGS, "receive() -> None or a list of events" },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef Link_getset[] = {
	{ "stats", (getter)Link_get_stats, NULL, "counters", NULL },
	{ "fd", (getter)Link_get_fd, NULL, "the socket, -1 when detached", NULL },
	{ "last_rx_ns", (getter)Link_get_last_rx, NULL, "CLOCK_MONOTONIC ns of the last bytes received", NULL },
	{ "tx_pending", (getter)Link_get_tx_pending, NULL, "bytes queued but not yet written", NULL },
	{ "api", (getter)Link_get_api, NULL, "the owner's C interface (a capsule, link_api.h)", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject LinkType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.peer._native.Link",
	.tp_basicsize = sizeof(Link),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The destination's urgent connection, after the handshake (see the file's comment).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Link_init,
	.tp_dealloc = (destructor)Link_dealloc,
	.tp_methods = Link_methods,
	.tp_getset = Link_getset,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_native", "The peer protocol's hot paths in C (see _native.c).", -1,
	NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
	PyObject *m;
	static const uint8_t zeros[FRAME_BLOCK];

	if (wire_crc32c(0, zeros, FRAME_BLOCK) != ZERO_CRC_VALUE) {
		PyErr_SetString(PyExc_ImportError, "crc32c of a zero block is not what the protocol says");
		return NULL;
	}
	if (PyType_Ready(&LinkType) < 0)
		return NULL;
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&LinkType);
	if (PyModule_AddObject(m, "Link", (PyObject *)&LinkType) < 0) {
		Py_DECREF(&LinkType);
		Py_DECREF(m);
		return NULL;
	}
	if (native_add_responder(m) < 0 || native_add_bulk(m) < 0 ||
	    PyModule_AddIntConstant(m, "OWNER_ID_BASE", OWNER_ID_BASE) < 0 ||
	    PyModule_AddIntConstant(m, "ZERO_CRC", ZERO_CRC_VALUE) < 0 ||
	    PyModule_AddIntConstant(m, "HEADER_SIZE", FRAME_HEADER) < 0 ||
	    PyModule_AddIntConstant(m, "DESC_SIZE", FRAME_DESC) < 0 || PyModule_AddIntConstant(m, "TAG_SIZE", FRAME_TAG) < 0 ||
	    PyModule_AddIntConstant(m, "FLAG_TAGGED", FRAME_FLAG_TAGGED) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_ERROR_MESSAGE", FRAME_MAX_ERROR) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_HELLO", FRAME_MAX_HELLO) < 0 ||
	    PyModule_AddIntConstant(m, "MAX_AUTH", FRAME_MAX_AUTH) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
