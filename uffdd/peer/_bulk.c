/*
 * Bulk (part of uffdd.peer._native): the destination's bulk connection, after the handshake.
 *
 * Background pre-paging moves a whole guest; here its bytes go straight from the socket into
 * guest memory, off the event loop. Python (uffdd/core/bulk.py) claims a run of pages, hands
 * its destination (the session's mapping of the memory file) and its claim bytes to submit(),
 * and a thread of its own runs run(), which releases the GIL and does the rest: it sends the
 * READs, reads each DATA frame's header and descriptor table, then readv()s the payload
 * directly into the pages, checks every block's crc32c and, on an authenticated connection,
 * the frame's tag, and reports each frame (ok or not) through a queue and an eventfd the event
 * loop watches. Installing the pages (UFFDIO_CONTINUE) stays with the event loop.
 *
 * A claim byte per page (claims.h) arbitrates between this thread and demand faults (the event loop):
 * 0 free, 1 taken (a fault fetches the page itself, or the guest discarded it), 2 frozen (a
 * frame is writing it: a fault waits for it). A page is frozen with an atomic compare-and-swap
 * from 0 just before its bytes are read into it, and one that was taken is read into a scratch
 * buffer instead: a page a fault took over is never written here. A frame whose checks fail
 * unfreezes its pages (they are not installed, and are fetched again).
 *
 * Guest memory the VMM truncated faults the kernel's copy (readv fails with EFAULT) and our
 * reads (the checks run under the SIGBUS guard of guard.h); either ends the request with
 * GONE, never the process.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "claims.h"
#include "frame.h"
#include "guard.h"
#include "wire.h"

int native_add_bulk(PyObject *module);
extern int native_urgent_waiting; /* _native.c: demand fills waiting on urgent links */


#define MAX_REQS 256
#define MAX_FRAME_BLOCKS 1024
#define MAX_DONE 65536

enum { Q_FREE = 0, Q_ACTIVE, Q_OVER }; /* Q_OVER: reported, its buffers await release by Python */
/* What a record says: a frame's pages are in (FRAME_OK) or not (FRAME_BAD, unfrozen); a request
 * is over (DONE; GONE: its memory is gone; ERROR: the server refused the rest, code = its code;
 * UNAVAILABLE: given up on, past the deadline). */
enum { R_FRAME_OK = 0, R_FRAME_BAD, R_DONE, R_GONE, R_ERROR, R_UNAVAILABLE };
enum { P_HEADER, P_TABLE, P_BODY, P_PAYLOAD, P_TAG };

struct breq {
	uint32_t id, count, pos, state;
	uint64_t offset;
	int sent;
	char *dest;
	uint8_t *claims;
	Py_buffer dest_buf, claims_buf;
};

struct record {
	uint32_t kind, id, first, n, code;
};

typedef struct {
	PyObject_HEAD
	int fd, wake_fd, done_fd, keyed;
	uint8_t tx_key[WIRE_KEY_SIZE], rx_key[WIRE_KEY_SIZE];
	uint64_t tx_seq, rx_seq;
	uint32_t max_blocks, max_inflight;
	double keepalive, io_timeout;
	pthread_mutex_t lock; /* requests' state, the records, the flags below */
	int running, stop, held;
	struct breq reqs[MAX_REQS];
	struct record *done;
	size_t ndone;
	/* the thread's own */
	uint8_t rx[FRAME_HEADER + MAX_FRAME_BLOCKS * FRAME_DESC + FRAME_MAX_ERROR + FRAME_TAG];
	size_t got, need;
	int phase;
	struct frame_header h;
	struct breq *cur;
	uint8_t *scratch; /* MAX_FRAME_BLOCKS blocks: the bytes of pages we must not write */
	struct iovec iov[MAX_FRAME_BLOCKS + 2];
	int iov_at, iov_n;
	uint8_t *tx;
	size_t tx_len, tx_cap;
	uint64_t last_rx_ns, last_ping_ns, last_frame_ns;
	uint32_t ping_id;
	unsigned long long frames, blocks, bad_frames, tampered;
	char lost[200];
} Bulk;

/* Held: by Python (demand faults wait on its urgent connection), or by the C fault paths. */
static int held(Bulk *b)
{
	return __atomic_load_n(&b->held, __ATOMIC_RELAXED) || __atomic_load_n(&native_urgent_waiting, __ATOMIC_RELAXED);
}

static uint64_t bulk_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- records (thread -> event loop) -------------------------------------------------------- */

static void post(Bulk *b, uint32_t kind, uint32_t id, uint32_t first, uint32_t n, uint32_t code)
{
	uint64_t one = 1;

	pthread_mutex_lock(&b->lock);
	if (b->ndone < MAX_DONE)
		b->done[b->ndone++] = (struct record){ kind, id, first, n, code };
	pthread_mutex_unlock(&b->lock);
	(void)!write(b->done_fd, &one, sizeof(one));
}

/* A request is over: report it; Python releases its buffers when it reads the record. */
static void finish(Bulk *b, struct breq *r, uint32_t kind, uint32_t code)
{
	pthread_mutex_lock(&b->lock);
	r->state = Q_OVER;
	pthread_mutex_unlock(&b->lock);
	post(b, kind, r->id, r->pos, r->count - r->pos, code);
}

static struct breq *find_req(Bulk *b, uint32_t id)
{
	for (int i = 0; i < MAX_REQS; i++)
		if (b->reqs[i].state == Q_ACTIVE && b->reqs[i].id == id)
			return &b->reqs[i];
	return NULL;
}

/* ---- sending ---------------------------------------------------------------------------- */

static int put_frame(Bulk *b, uint8_t type, uint32_t id, uint64_t offset, uint16_t count)
{
	struct frame_header h = { type, b->keyed ? FRAME_FLAG_TAGGED : 0, count, id, offset, b->keyed ? FRAME_TAG : 0, 0 };
	size_t need = b->tx_len + FRAME_HEADER + FRAME_TAG;

	if (need > b->tx_cap) {
		size_t cap = b->tx_cap ? b->tx_cap * 2 : 4096;
		while (cap < need)
			cap *= 2;
		uint8_t *p = realloc(b->tx, cap);
		if (!p)
			return -1;
		b->tx = p;
		b->tx_cap = cap;
	}
	uint8_t *p = b->tx + b->tx_len;
	frame_put_header(p, &h);
	b->tx_len += FRAME_HEADER;
	if (b->keyed) {
		uint8_t nonce[12];
		struct iovec iov = { p, FRAME_HEADER };
		frame_nonce(b->tx_seq++, nonce);
		wire_aead_tag(b->tx_key, nonce, &iov, 1, p + FRAME_HEADER);
		b->tx_len += FRAME_TAG;
	}
	return 0;
}

/* READs for requests not sent on this connection yet (the rest of each, from where it got to). */
static int queue_reads(Bulk *b)
{
	uint32_t inflight = 0;

	pthread_mutex_lock(&b->lock);
	for (int i = 0; i < MAX_REQS; i++)
		inflight += b->reqs[i].state == Q_ACTIVE && b->reqs[i].sent;
	for (int i = 0; i < MAX_REQS && inflight < b->max_inflight; i++) {
		struct breq *r = &b->reqs[i];
		if (r->state != Q_ACTIVE || r->sent)
			continue;
		if (put_frame(b, F_READ, r->id, r->offset + ((uint64_t)r->pos << FRAME_BLOCK_SHIFT),
			      (uint16_t)(r->count - r->pos)) < 0) {
			pthread_mutex_unlock(&b->lock);
			return -1;
		}
		r->sent = 1;
		inflight++;
	}
	pthread_mutex_unlock(&b->lock);
	return 0;
}

static int send_some(Bulk *b)
{
	size_t done = 0;
	while (done < b->tx_len) {
		ssize_t n = send(b->fd, b->tx + done, b->tx_len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n < 0)
			return -1;
		done += (size_t)n;
	}
	memmove(b->tx, b->tx + done, b->tx_len - done);
	b->tx_len -= done;
	return 0;
}

/* ---- receiving ---------------------------------------------------------------------------- */

static int lose(Bulk *b, const char *why)
{
	snprintf(b->lost, sizeof(b->lost), "%s", why);
	return -1;
}

/* Pages of the frame in flight that we froze go back to free: not installed, fetched again. */
static void unfreeze(Bulk *b)
{
	struct breq *r = b->cur;
	if (!r || b->phase < P_PAYLOAD)
		return;
	for (uint32_t i = 0; i < b->h.count; i++)
		claims_unfreeze(&r->claims[r->pos + i]);
}

/* The header of a frame has arrived: is it one this connection may carry? */
static int on_header(Bulk *b)
{
	struct frame_header *h = &b->h;
	uint32_t plen;

	frame_get_header(b->rx, h);
	if (h->type != F_DATA && h->type != F_PONG && h->type != F_ERROR)
		return lose(b, "unexpected frame type on the bulk connection");
	if (h->flags & ~FRAME_FLAG_TAGGED)
		return lose(b, "undefined flags");
	if (!!(h->flags & FRAME_FLAG_TAGGED) != b->keyed) {
		b->tampered += b->keyed;
		return lose(b, b->keyed ? "tampered: untagged frame on an authenticated connection"
					: "tagged frame on a connection without keys");
	}
	if (b->keyed && h->length < FRAME_TAG)
		return lose(b, "frame length out of range");
	plen = h->length - (b->keyed ? FRAME_TAG : 0);
	if (h->type != F_DATA) {
		if (plen > FRAME_MAX_ERROR || (h->type == F_PONG && (plen || h->count || h->offset || h->aux)))
			return lose(b, "malformed PONG or ERROR");
		b->phase = P_BODY;
		b->need = FRAME_HEADER + h->length;
		return 0;
	}
	if (!h->count || h->count > b->max_blocks || h->count > MAX_FRAME_BLOCKS)
		return lose(b, "DATA count out of range");
	if (plen < (uint32_t)h->count * FRAME_DESC || plen > (uint32_t)h->count * (FRAME_DESC + FRAME_BLOCK))
		return lose(b, "DATA length impossible for its count");
	b->cur = find_req(b, h->id);
	if (!b->cur || !b->cur->sent)
		return lose(b, "DATA for a request that is not in flight");
	if (h->offset != b->cur->offset + ((uint64_t)b->cur->pos << FRAME_BLOCK_SHIFT) ||
	    h->count > b->cur->count - b->cur->pos)
		return lose(b, "DATA does not continue its request");
	b->phase = P_TABLE;
	b->need = FRAME_HEADER + (size_t)h->count * FRAME_DESC;
	return 0;
}

/* The descriptor table has arrived: freeze the pages and aim the payload at them. */
static int on_table(Bulk *b)
{
	struct frame_header *h = &b->h;
	struct breq *r = b->cur;
	const uint8_t *table = b->rx + FRAME_HEADER;
	uint32_t total = 0, plen = h->length - (b->keyed ? FRAME_TAG : 0);

	for (uint32_t i = 0; i < h->count; i++) {
		const uint8_t *d = table + i * FRAME_DESC;
		uint32_t stored = (uint32_t)(d[4] | d[5] << 8);
		if (d[7] || (d[6] == ENC_RAW && stored != FRAME_BLOCK) || (d[6] == ENC_ZERO && stored != 0) ||
		    d[6] > ENC_ZERO)
			return lose(b, "DATA block descriptor not allowed on this link");
		total += stored;
	}
	if (total != plen - (uint32_t)h->count * FRAME_DESC)
		return lose(b, "DATA blocks do not add up to its length");
	b->phase = P_PAYLOAD; /* from here on, unfreeze() knows the frame's pages may be frozen */
	b->iov_at = b->iov_n = 0;
	for (uint32_t i = 0; i < h->count; i++) {
		int mine = claims_freeze(&r->claims[r->pos + i]);
		if (table[i * FRAME_DESC + 6] != ENC_RAW)
			continue;
		char *to = mine ? r->dest + ((size_t)(r->pos + i) << FRAME_BLOCK_SHIFT)
				: (char *)b->scratch + ((size_t)i << FRAME_BLOCK_SHIFT);
		struct iovec *last = b->iov_n ? &b->iov[b->iov_n - 1] : NULL;
		if (last && (char *)last->iov_base + last->iov_len == to)
			last->iov_len += FRAME_BLOCK;
		else
			b->iov[b->iov_n++] = (struct iovec){ to, FRAME_BLOCK };
	}
	return 0;
}

struct check {
	Bulk *b;
	int ok, tag_ok;
};

/* Under the SIGBUS guard: every block's crc32c and the frame's tag, read where the bytes are. */
static void check_frame(void *arg)
{
	struct check *c = arg;
	Bulk *b = c->b;
	struct frame_header *h = &b->h;
	struct breq *r = b->cur;
	const uint8_t *table = b->rx + FRAME_HEADER;
	struct iovec aad[MAX_FRAME_BLOCKS + 2];
	int naad = 0;

	c->ok = 1;
	aad[naad++] = (struct iovec){ b->rx, FRAME_HEADER };
	aad[naad++] = (struct iovec){ (void *)table, (size_t)h->count * FRAME_DESC };
	for (uint32_t i = 0; i < h->count; i++) {
		const uint8_t *d = table + i * FRAME_DESC;
		uint32_t crc = wire_load_le32(d);
		if (d[6] != ENC_RAW) {
			c->ok &= crc == 0x98F94189u;
			continue;
		}
		const uint8_t *at = r->claims[r->pos + i] == CLAIM_FROZEN
					    ? (uint8_t *)r->dest + ((size_t)(r->pos + i) << FRAME_BLOCK_SHIFT)
					    : b->scratch + ((size_t)i << FRAME_BLOCK_SHIFT);
		c->ok &= wire_crc32c(0, at, FRAME_BLOCK) == crc;
		aad[naad++] = (struct iovec){ (void *)at, FRAME_BLOCK };
	}
	c->tag_ok = 1;
	if (b->keyed) {
		uint8_t nonce[12];
		frame_nonce(b->rx_seq++, nonce);
		c->tag_ok = wire_aead_verify(b->rx_key, nonce, aad, naad, b->rx + FRAME_HEADER + h->count * FRAME_DESC) == 0;
	}
}

/* Zero blocks of the frame, into the pages we froze. */
static void zero_blocks(void *arg)
{
	Bulk *b = arg;
	struct breq *r = b->cur;
	const uint8_t *table = b->rx + FRAME_HEADER;
	for (uint32_t i = 0; i < b->h.count; i++)
		if (table[i * FRAME_DESC + 6] == ENC_ZERO && r->claims[r->pos + i] == CLAIM_FROZEN)
			memset(r->dest + ((size_t)(r->pos + i) << FRAME_BLOCK_SHIFT), 0, FRAME_BLOCK);
}

/* A whole DATA frame is here (its tag read into rx after the table). */
static int on_data_done(Bulk *b)
{
	struct breq *r = b->cur;
	uint32_t n = b->h.count, first = r->pos;
	struct check c = { b, 0, 0 };
	char *lo = r->dest + ((size_t)first << FRAME_BLOCK_SHIFT);
	size_t span = (size_t)n << FRAME_BLOCK_SHIFT;

	if (guarded_call(check_frame, &c, lo, span) < 0 || (c.ok && guarded_call(zero_blocks, b, lo, span) < 0)) {
		unfreeze(b);
		b->cur = NULL;
		finish(b, r, R_GONE, 0);
		return lose(b, "guest memory gone under a frame");
	}
	if (!c.tag_ok) {
		b->tampered++;
		unfreeze(b);
		b->cur = NULL;
		return lose(b, "tampered: a frame failed its tag");
	}
	b->frames++;
	if (!c.ok) {
		b->bad_frames++;
		unfreeze(b);
	} else {
		b->blocks += n;
	}
	r->pos += n;
	b->cur = NULL;
	b->last_frame_ns = bulk_now_ns();
	post(b, c.ok ? R_FRAME_OK : R_FRAME_BAD, r->id, first, n, 0);
	if (r->pos == r->count)
		finish(b, r, R_DONE, 0);
	return 0;
}

static int on_body_done(Bulk *b)
{
	struct frame_header *h = &b->h;
	uint32_t plen = h->length - (b->keyed ? FRAME_TAG : 0);

	if (b->keyed) {
		uint8_t nonce[12];
		struct iovec iov = { b->rx, FRAME_HEADER + plen };
		frame_nonce(b->rx_seq++, nonce);
		if (wire_aead_verify(b->rx_key, nonce, &iov, 1, b->rx + FRAME_HEADER + plen) != 0) {
			b->tampered++;
			return lose(b, "tampered: a frame failed its tag");
		}
	}
	if (h->type == F_PONG)
		return 0;
	if (h->id == 0) {
		char msg[FRAME_MAX_ERROR + 1];
		memcpy(msg, b->rx + FRAME_HEADER, plen);
		msg[plen] = '\0';
		snprintf(b->lost, sizeof(b->lost), "server: %u: %.150s", h->aux, msg);
		return -1;
	}
	struct breq *r = find_req(b, h->id);
	if (!r || !r->sent)
		return lose(b, "ERROR for a request that is not in flight");
	finish(b, r, R_ERROR, h->aux ? h->aux : 1);
	return 0;
}

static int frame_whole(Bulk *b)
{
	int rc = on_data_done(b);
	b->phase = P_HEADER;
	b->got = 0;
	b->need = FRAME_HEADER;
	return rc;
}

/* The payload is in: the tag next, or the frame is whole. */
static int after_payload(Bulk *b)
{
	if (!b->keyed)
		return frame_whole(b);
	b->phase = P_TAG;
	b->got = 0;
	b->need = FRAME_TAG;
	return 0;
}

/* Read what the socket has; 0 on EAGAIN (or, while held, after a whole frame), -1 when the
 * connection must end. */
static int receive(Bulk *b)
{
	for (;;) {
		ssize_t n;
		if (b->phase == P_PAYLOAD) {
			int left = b->iov_n - b->iov_at;
			n = readv(b->fd, b->iov + b->iov_at, left < IOV_MAX ? left : IOV_MAX);
		} else {
			uint8_t *to = b->phase == P_TAG ? b->rx + FRAME_HEADER + (size_t)b->h.count * FRAME_DESC : b->rx;
			n = recv(b->fd, to + b->got, b->need - b->got, MSG_DONTWAIT);
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return 0;
		if (n < 0 && errno == EFAULT && b->phase == P_PAYLOAD) {
			struct breq *r = b->cur;
			unfreeze(b);
			b->cur = NULL;
			finish(b, r, R_GONE, 0);
			return lose(b, "guest memory gone under a frame");
		}
		if (n <= 0)
			return lose(b, n == 0 ? "server closed the connection" : strerror(errno));
		b->last_rx_ns = bulk_now_ns();
		int rc = 0;
		if (b->phase == P_PAYLOAD) {
			size_t left = (size_t)n;
			while (left && b->iov_at < b->iov_n) {
				struct iovec *v = &b->iov[b->iov_at];
				size_t k = left < v->iov_len ? left : v->iov_len;
				v->iov_base = (char *)v->iov_base + k;
				v->iov_len -= k;
				left -= k;
				if (!v->iov_len)
					b->iov_at++;
			}
			if (b->iov_at < b->iov_n)
				continue;
			rc = after_payload(b);
		} else {
			b->got += (size_t)n;
		}
		/* Whatever is whole now (a frame without payload is whole with its header). */
		while (rc == 0 && b->phase != P_PAYLOAD && b->got >= b->need) {
			switch (b->phase) {
			case P_HEADER:
				rc = on_header(b);
				break;
			case P_TABLE:
				rc = on_table(b);
				if (rc == 0 && !b->iov_n)
					rc = after_payload(b); /* no RAW block: nothing to read into pages */
				break;
			case P_TAG:
				rc = frame_whole(b);
				break;
			default: /* P_BODY */
				rc = on_body_done(b);
				b->phase = P_HEADER;
				b->got = 0;
				b->need = FRAME_HEADER;
				break;
			}
		}
		if (rc < 0)
			return -1;
		/* While demand faults wait, take in one frame per slice and step aside. */
		if (b->phase == P_HEADER && b->got == 0 && held(b))
			return 0;
	}
}

/* ---- the thread's loop ------------------------------------------------------------------------ */

#define HOLD_SLICE_NS 5000000ull /* while held: one frame per this many ns */

static int wait_ms(uint64_t ns)
{
	uint64_t ms = (ns + 999999) / 1000000;
	return ms > 1000 ? 1000 : (int)ms;
}

/* One connection's life, without the GIL: 0 when stop() ended it, -1 when it was lost (why in b->lost). */
static int serve(Bulk *b)
{
	uint64_t ka = (uint64_t)(b->keepalive * 1e9), io = (uint64_t)(b->io_timeout * 1e9);

	b->last_rx_ns = b->last_ping_ns = bulk_now_ns();
	for (;;) {
		uint64_t one, now;
		if (__atomic_load_n(&b->stop, __ATOMIC_ACQUIRE))
			return 0;
		if (queue_reads(b) < 0)
			return lose(b, "out of memory");
		if (b->tx_len && send_some(b) < 0)
			return lose(b, strerror(errno));
		now = bulk_now_ns();
		if (now - b->last_rx_ns > io) {
			snprintf(b->lost, sizeof(b->lost), "nothing received for %.1fs", (double)(now - b->last_rx_ns) / 1e9);
			return -1;
		}
		if (now - b->last_ping_ns >= ka) {
			b->last_ping_ns = now;
			if (put_frame(b, F_PING, ++b->ping_id, 0, 0) < 0)
				return lose(b, "out of memory");
			continue;
		}
		uint64_t next = ka - (now - b->last_ping_ns);
		int resting = held(b) && b->phase == P_HEADER && b->got == 0 &&
			      now - b->last_frame_ns < HOLD_SLICE_NS;
		if (resting && HOLD_SLICE_NS - (now - b->last_frame_ns) < next)
			next = HOLD_SLICE_NS - (now - b->last_frame_ns);
		struct pollfd p[2] = { { b->fd, (short)((resting ? 0 : POLLIN) | (b->tx_len ? POLLOUT : 0)), 0 },
				       { b->wake_fd, POLLIN, 0 } };
		if (poll(p, 2, wait_ms(next)) < 0 && errno != EINTR)
			return lose(b, strerror(errno));
		if (p[1].revents & POLLIN)
			(void)!read(b->wake_fd, &one, sizeof(one));
		if ((p[0].revents & (POLLIN | POLLERR | POLLHUP)) && !resting && receive(b) < 0)
			return -1;
	}
}

/* ---- Python interface ------------------------------------------------------------------------ */

static void release_req(struct breq *r)
{
	if (r->dest_buf.obj)
		PyBuffer_Release(&r->dest_buf);
	if (r->claims_buf.obj)
		PyBuffer_Release(&r->claims_buf);
	memset(r, 0, sizeof(*r));
}

static int Bulk_init(Bulk *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { NULL };

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "", kwlist))
		return -1;
	if (self->done) {
		PyErr_SetString(PyExc_RuntimeError, "a Bulk is set up once");
		return -1;
	}
	if (guard_install() < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	self->fd = self->wake_fd = self->done_fd = -1;
	pthread_mutex_init(&self->lock, NULL);
	self->done = PyMem_Calloc(MAX_DONE, sizeof(struct record));
	self->scratch = PyMem_Malloc((size_t)MAX_FRAME_BLOCKS << FRAME_BLOCK_SHIFT);
	if (!self->done || !self->scratch) {
		PyErr_NoMemory();
		return -1;
	}
	self->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	self->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (self->wake_fd < 0 || self->done_fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	return 0;
}

static void Bulk_dealloc(Bulk *self)
{
	if (self->done) {
		for (int i = 0; i < MAX_REQS; i++)
			release_req(&self->reqs[i]);
		pthread_mutex_destroy(&self->lock);
	}
	if (self->fd >= 0)
		close(self->fd);
	if (self->wake_fd >= 0)
		close(self->wake_fd);
	if (self->done_fd >= 0)
		close(self->done_fd);
	PyMem_Free(self->done);
	PyMem_Free(self->scratch);
	free(self->tx);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int ready(Bulk *self)
{
	if (!self->done) {
		PyErr_SetString(PyExc_RuntimeError, "Bulk not initialised");
		return -1;
	}
	return 0;
}

/* attach(fd, tx_key, rx_key, tx_seq, rx_seq, max_blocks, max_inflight, keepalive, io_timeout):
 * the next connection (the link owns fd from now on); requests not over are sent again on it. */
static PyObject *Bulk_attach(Bulk *self, PyObject *args)
{
	int fd;
	PyObject *txo, *rxo;
	unsigned long long tx_seq, rx_seq;
	unsigned int mb, mi;
	double ka, io;

	if (ready(self) < 0 || !PyArg_ParseTuple(args, "iOOKKIIdd", &fd, &txo, &rxo, &tx_seq, &rx_seq, &mb, &mi, &ka, &io))
		return NULL;
	if (self->running) {
		PyErr_SetString(PyExc_RuntimeError, "the link is running");
		return NULL;
	}
	if (!mb || !mi || ka <= 0 || io <= ka) {
		PyErr_SetString(PyExc_ValueError, "limits or timeouts out of range");
		return NULL;
	}
	self->keyed = txo != Py_None;
	if (self->keyed) {
		Py_buffer t, r;
		if (PyObject_GetBuffer(txo, &t, PyBUF_SIMPLE) < 0)
			return NULL;
		if (PyObject_GetBuffer(rxo, &r, PyBUF_SIMPLE) < 0) {
			PyBuffer_Release(&t);
			return NULL;
		}
		int ok = t.len == WIRE_KEY_SIZE && r.len == WIRE_KEY_SIZE;
		if (ok) {
			memcpy(self->tx_key, t.buf, WIRE_KEY_SIZE);
			memcpy(self->rx_key, r.buf, WIRE_KEY_SIZE);
		}
		PyBuffer_Release(&t);
		PyBuffer_Release(&r);
		if (!ok) {
			PyErr_SetString(PyExc_ValueError, "keys have 32 bytes");
			return NULL;
		}
	}
	if (self->fd >= 0)
		close(self->fd);
	self->fd = fd;
	self->tx_seq = tx_seq;
	self->rx_seq = rx_seq;
	self->max_blocks = mb < MAX_FRAME_BLOCKS ? mb : MAX_FRAME_BLOCKS;
	self->max_inflight = mi;
	self->keepalive = ka;
	self->io_timeout = io;
	self->phase = P_HEADER;
	self->got = 0;
	self->need = FRAME_HEADER;
	self->cur = NULL;
	self->tx_len = 0;
	self->stop = 0;
	pthread_mutex_lock(&self->lock);
	for (int i = 0; i < MAX_REQS; i++)
		self->reqs[i].sent = 0;
	pthread_mutex_unlock(&self->lock);
	Py_RETURN_NONE;
}

/* run() -> None (stop() ended it) or the reason the connection was lost. Blocks, without the
 * GIL: call it from a thread of its own. */
static PyObject *Bulk_run(Bulk *self, PyObject *Py_UNUSED(ignored))
{
	int rc;

	if (ready(self) < 0)
		return NULL;
	pthread_mutex_lock(&self->lock);
	if (self->running || self->fd < 0) {
		pthread_mutex_unlock(&self->lock);
		PyErr_SetString(PyExc_RuntimeError, "not attached, or already running");
		return NULL;
	}
	self->running = 1;
	pthread_mutex_unlock(&self->lock);
	self->lost[0] = '\0';
	Py_BEGIN_ALLOW_THREADS
	rc = serve(self);
	if (self->cur) { /* a frame cut short: its pages were not written whole */
		unfreeze(self);
		self->cur = NULL;
	}
	pthread_mutex_lock(&self->lock);
	for (int i = 0; i < MAX_REQS; i++)
		self->reqs[i].sent = 0;
	self->running = 0;
	pthread_mutex_unlock(&self->lock);
	Py_END_ALLOW_THREADS
	close(self->fd);
	self->fd = -1;
	if (rc == 0)
		Py_RETURN_NONE;
	return PyUnicode_FromString(self->lost);
}

static void wake(Bulk *self)
{
	uint64_t one = 1;
	(void)!write(self->wake_fd, &one, sizeof(one));
}

/* submit(id, offset, count, dest, claims): receive count blocks of the image at offset into dest
 * (guest memory), arbitrated by claims (a byte per block, see the file's comment). */
static PyObject *Bulk_submit(Bulk *self, PyObject *args)
{
	unsigned int id, count;
	unsigned long long offset;
	PyObject *dest, *claims;
	struct breq *r = NULL;

	if (ready(self) < 0 || !PyArg_ParseTuple(args, "IKIOO", &id, &offset, &count, &dest, &claims))
		return NULL;
	if (!id || !count || count > 0xFFFF || offset & (FRAME_BLOCK - 1)) {
		PyErr_SetString(PyExc_ValueError, "id >= 1, count 1..65535, offset block aligned");
		return NULL;
	}
	pthread_mutex_lock(&self->lock);
	for (int i = 0; i < MAX_REQS; i++) {
		if (self->reqs[i].state != Q_FREE && self->reqs[i].id == id) {
			r = NULL;
			break;
		}
		if (!r && self->reqs[i].state == Q_FREE)
			r = &self->reqs[i];
	}
	if (r)
		r->state = Q_OVER; /* reserved while its buffers are taken */
	pthread_mutex_unlock(&self->lock);
	if (!r)
		return PyErr_Format(PyExc_ValueError, "request %u is pending, or %d are", id, MAX_REQS);
	if (PyObject_GetBuffer(dest, &r->dest_buf, PyBUF_WRITABLE) < 0)
		goto fail;
	if (PyObject_GetBuffer(claims, &r->claims_buf, PyBUF_WRITABLE) < 0)
		goto fail;
	if (r->dest_buf.len != (Py_ssize_t)count << FRAME_BLOCK_SHIFT || r->claims_buf.len < (Py_ssize_t)count) {
		PyErr_SetString(PyExc_ValueError, "dest must hold count blocks, claims count bytes");
		goto fail;
	}
	r->id = id;
	r->offset = offset;
	r->count = count;
	r->pos = 0;
	r->sent = 0;
	r->dest = r->dest_buf.buf;
	r->claims = r->claims_buf.buf;
	pthread_mutex_lock(&self->lock);
	r->state = Q_ACTIVE;
	pthread_mutex_unlock(&self->lock);
	wake(self);
	Py_RETURN_NONE;
fail:
	pthread_mutex_lock(&self->lock);
	release_req(r);
	pthread_mutex_unlock(&self->lock);
	return NULL;
}

/* drain() -> [(kind, id, first, n, code)]: what happened since the last call; a request whose
 * record ends it (kind >= DONE) is forgotten and its buffers let go of. */
static PyObject *Bulk_drain(Bulk *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t cnt;
	PyObject *out;

	if (ready(self) < 0)
		return NULL;
	(void)!read(self->done_fd, &cnt, sizeof(cnt));
	pthread_mutex_lock(&self->lock);
	out = PyList_New((Py_ssize_t)self->ndone);
	for (size_t i = 0; out && i < self->ndone; i++) {
		struct record *d = &self->done[i];
		PyObject *t = Py_BuildValue("(IIIII)", d->kind, d->id, d->first, d->n, d->code);
		if (!t) {
			Py_CLEAR(out);
			break;
		}
		PyList_SET_ITEM(out, (Py_ssize_t)i, t);
		if (d->kind >= R_DONE)
			for (int k = 0; k < MAX_REQS; k++)
				if (self->reqs[k].state == Q_OVER && self->reqs[k].id == d->id && self->reqs[k].dest)
					release_req(&self->reqs[k]);
	}
	if (out)
		self->ndone = 0;
	pthread_mutex_unlock(&self->lock);
	return out;
}

/* unavailable(): past the deadline (no connection: the thread is not running), every request
 * ends with UNAVAILABLE. */
static PyObject *Bulk_unavailable(Bulk *self, PyObject *Py_UNUSED(ignored))
{
	if (ready(self) < 0)
		return NULL;
	pthread_mutex_lock(&self->lock);
	if (self->running) {
		pthread_mutex_unlock(&self->lock);
		Py_RETURN_FALSE;
	}
	pthread_mutex_unlock(&self->lock);
	for (int i = 0; i < MAX_REQS; i++)
		if (self->reqs[i].state == Q_ACTIVE)
			finish(self, &self->reqs[i], R_UNAVAILABLE, 0);
	Py_RETURN_TRUE;
}

/* close(): let go of every request's buffers and the socket (the thread must have returned). */
static PyObject *Bulk_close(Bulk *self, PyObject *Py_UNUSED(ignored))
{
	if (ready(self) < 0)
		return NULL;
	pthread_mutex_lock(&self->lock);
	if (self->running) {
		pthread_mutex_unlock(&self->lock);
		PyErr_SetString(PyExc_RuntimeError, "the link is running: stop() it and wait for run() first");
		return NULL;
	}
	for (int i = 0; i < MAX_REQS; i++)
		release_req(&self->reqs[i]);
	self->ndone = 0;
	pthread_mutex_unlock(&self->lock);
	if (self->fd >= 0)
		close(self->fd);
	self->fd = -1;
	Py_RETURN_NONE;
}

static PyObject *Bulk_stop(Bulk *self, PyObject *Py_UNUSED(ignored))
{
	if (ready(self) < 0)
		return NULL;
	__atomic_store_n(&self->stop, 1, __ATOMIC_RELEASE);
	wake(self);
	Py_RETURN_NONE;
}

static PyObject *Bulk_hold(Bulk *self, PyObject *arg)
{
	int on = PyObject_IsTrue(arg);
	if (on < 0 || ready(self) < 0)
		return NULL;
	__atomic_store_n(&self->held, on, __ATOMIC_RELAXED);
	wake(self);
	Py_RETURN_NONE;
}

static PyObject *Bulk_get_stats(Bulk *self, void *Py_UNUSED(closure))
{
	return Py_BuildValue("{sKsKsKsK}", "frames", self->frames, "blocks", self->blocks, "bad_frames",
			     self->bad_frames, "tampered", self->tampered);
}

static PyObject *Bulk_get_done_fd(Bulk *self, void *Py_UNUSED(closure))
{
	return PyLong_FromLong(self->done_fd);
}

static PyObject *Bulk_get_pending(Bulk *self, void *Py_UNUSED(closure))
{
	long n = 0;
	pthread_mutex_lock(&self->lock);
	for (int i = 0; i < MAX_REQS; i++)
		n += self->reqs[i].state == Q_ACTIVE;
	pthread_mutex_unlock(&self->lock);
	return PyLong_FromLong(n);
}

static PyMethodDef Bulk_methods[] = {
	{ "attach", (PyCFunction)Bulk_attach, METH_VARARGS,
	  "attach(fd, tx_key, rx_key, tx_seq, rx_seq, max_blocks, max_inflight, keepalive, io_timeout)" },
	{ "run", (PyCFunction)Bulk_run, METH_NOARGS, "run() -> None or why the connection was lost (blocks)" },
	{ "submit", (PyCFunction)Bulk_submit, METH_VARARGS, "submit(id, offset, count, dest, claims)" },
	{ "drain", (PyCFunction)Bulk_drain, METH_NOARGS, "drain() -> [(kind, id, first, n, code)]" },
	{ "unavailable", (PyCFunction)Bulk_unavailable, METH_NOARGS, "unavailable() -> whether requests were ended" },
	{ "stop", (PyCFunction)Bulk_stop, METH_NOARGS, "stop(): make run() return None" },
	{ "close", (PyCFunction)Bulk_close, METH_NOARGS, "close(): release every request's buffers and the socket" },
	{ "hold", (PyCFunction)Bulk_hold, METH_O, "hold(on): one frame per 5 ms while demand faults wait" },
	{ NULL, NULL, 0, NULL },
};

static PyObject *Bulk_get_running(Bulk *self, void *Py_UNUSED(closure))
{
	int running;
	pthread_mutex_lock(&self->lock);
	running = self->running;
	pthread_mutex_unlock(&self->lock);
	return PyBool_FromLong(running);
}

static PyGetSetDef Bulk_getset[] = {
	{ "running", (getter)Bulk_get_running, NULL, "whether run() is running (its thread uses guest memory)", NULL },
	{ "stats", (getter)Bulk_get_stats, NULL, "counters", NULL },
	{ "done_fd", (getter)Bulk_get_done_fd, NULL, "an eventfd, readable when drain() has records", NULL },
	{ "pending", (getter)Bulk_get_pending, NULL, "requests not over", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject BulkType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.peer._native.Bulk",
	.tp_basicsize = sizeof(Bulk),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The destination's bulk connection, after the handshake (see _bulk.c).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Bulk_init,
	.tp_dealloc = (destructor)Bulk_dealloc,
	.tp_methods = Bulk_methods,
	.tp_getset = Bulk_getset,
};

static PyMethodDef bulk_functions[] = {
	{ "claim_take", claim_take, METH_VARARGS, "claim_take(claims, index) -> whether the caller has the page" },
	{ NULL, NULL, 0, NULL },
};

int native_add_bulk(PyObject *module)
{
	if (PyType_Ready(&BulkType) < 0)
		return -1;
	Py_INCREF(&BulkType);
	if (PyModule_AddObject(module, "Bulk", (PyObject *)&BulkType) < 0) {
		Py_DECREF(&BulkType);
		return -1;
	}
	if (PyModule_AddFunctions(module, bulk_functions) < 0)
		return -1;
	return PyModule_AddIntConstant(module, "BULK_FRAME_OK", R_FRAME_OK) < 0 ||
			       PyModule_AddIntConstant(module, "BULK_FRAME_BAD", R_FRAME_BAD) < 0 ||
			       PyModule_AddIntConstant(module, "BULK_DONE", R_DONE) < 0 ||
			       PyModule_AddIntConstant(module, "BULK_GONE", R_GONE) < 0 ||
			       PyModule_AddIntConstant(module, "BULK_ERROR", R_ERROR) < 0 ||
			       PyModule_AddIntConstant(module, "BULK_UNAVAILABLE", R_UNAVAILABLE) < 0
		       ? -1
		       : 0;
}
