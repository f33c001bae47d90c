/*
 * Responder (part of uffdd.peer._native): the source's end of a connection, after the handshake.
 *
 * Python accepts the connection and runs the handshake; then serve() runs the connection on a
 * thread of its own, without the GIL, until it ends. A demand fault on the destination is one
 * READ on the urgent connection, answered without the interpreter: preadv2 (RWF_NOWAIT) of the
 * blocks (from the disk, on this thread, if they are not in the page cache), a crc32c per
 * block, zero blocks sent as a flag, one tagged DATA frame written with one writev. On a bulk
 * connection READs go out in frames of CHUNK_BLOCKS, small READs first, and for a moment after
 * any urgent READ in this process at most one frame per URGENT_QUIET_NS. PINGs get PONGs. The
 * checks, codes and limits are the Python server's; what ends the connection (a malformed frame,
 * the client's ERROR, the socket) is returned to Python, which tells the client and closes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "frame.h"
#include "wire.h"

#define MAX_EXTENTS 1024
#define TX_HIGH (4u << 20) /* stop reading requests while this much waits to be written */

int native_add_responder(PyObject *module);

struct extent {
	uint64_t start, end;
};

/* A READ in flight: from when it is parsed until its answer is wholly written to the socket. */
enum { R_WAITING = 1, R_QUEUED };
struct inflight {
	uint32_t id, count;
	uint64_t offset;
	uint64_t tx_end; /* R_QUEUED: its answer is written once tx_sent reaches this */
	uint8_t state;
};

typedef struct {
	PyObject_HEAD
	int fd, image_fd, keyed, rwf;
	uint8_t tx_key[WIRE_KEY_SIZE], rx_key[WIRE_KEY_SIZE];
	uint64_t tx_seq, rx_seq, image_size;
	uint32_t max_blocks, max_inflight;
	struct inflight *inflight; /* max_inflight entries, in arrival order; the first ninflight used */
	uint32_t ninflight;
	uint64_t tx_queued, tx_sent; /* bytes ever queued in tx, and ever written from it */
	struct extent *extents;
	int nextents;
	uint8_t *rx;
	size_t rx_cap, rx_start, rx_end;
	uint8_t *tx;
	size_t tx_cap, tx_len;
	uint8_t *block_buf; /* max_blocks * 4096: one READ's bytes */
	uint8_t *table;     /* max_blocks descriptors */
	uint64_t last_rx_ns;
	unsigned long long reads, read_errors, blocks_raw, blocks_zero, payload_bytes;
	char lost[200];
	int lost_code;
	/* Bulk mode: run by serve() on a thread of its own, without the GIL. */
	int bulk, wake_fd, stop;
	uint32_t peer_code;
	char peer_error[FRAME_MAX_ERROR + 1]; /* an ERROR from the client, kept for Python */
	int peer_error_len;
	uint64_t last_chunk_ns;
} Responder;

#define CHUNK_BLOCKS 64 /* a bulk READ goes out as frames of at most this many blocks */
#define TX_HIGH_BULK (1u << 20) /* bulk: queue no more than this, so small READs overtake large ones */
#define URGENT_QUIET_NS 2000000ull /* after an urgent READ, bulk gets one chunk per this many ns */

/* When an urgent READ last came in, on any connection of this process. */
static uint64_t urgent_last_ns;

static const uint8_t zero_block[FRAME_BLOCK];

static uint64_t resp_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The connection must end: why, and the protocol's error code to tell the client (0: none). */
static int resp_lose(Responder *s, int code, const char *why)
{
	snprintf(s->lost, sizeof(s->lost), "%s", why);
	s->lost_code = code;
	return -1;
}

static int resp_room(Responder *s, size_t n)
{
	if (s->tx_len + n <= s->tx_cap)
		return 0;
	size_t cap = s->tx_cap ? s->tx_cap * 2 : 1 << 16;
	while (cap < s->tx_len + n)
		cap *= 2;
	uint8_t *p = realloc(s->tx, cap);
	if (!p)
		return -1;
	s->tx = p;
	s->tx_cap = cap;
	return 0;
}

/* Write what is queued: 1 all written, 0 some left, -1 error. */
static int resp_flush(Responder *s)
{
	size_t done = 0;
	while (done < s->tx_len) {
		ssize_t n = send(s->fd, s->tx + done, s->tx_len - done, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		if (n < 0)
			return -1;
		done += (size_t)n;
	}
	memmove(s->tx, s->tx + done, s->tx_len - done);
	s->tx_len -= done;
	s->tx_sent += done;
	return s->tx_len == 0;
}

/* Send header + pieces (+ tag): written at once when the socket takes it, else queued. */
static int resp_send(Responder *s, struct frame_header *h, struct iovec *iov, int n)
{
	uint8_t hdr[FRAME_HEADER], tag[FRAME_TAG];
	struct iovec all[8];
	size_t total = 0;
	int k = 0;

	if (n > 6)
		return -1;
	for (int i = 0; i < n; i++)
		total += iov[i].iov_len;
	h->flags = s->keyed ? FRAME_FLAG_TAGGED : 0;
	h->length = (uint32_t)(total + (s->keyed ? FRAME_TAG : 0));
	frame_put_header(hdr, h);
	all[k++] = (struct iovec){ hdr, FRAME_HEADER };
	for (int i = 0; i < n; i++)
		if (iov[i].iov_len)
			all[k++] = iov[i];
	if (s->keyed) {
		uint8_t nonce[12];
		frame_nonce(s->tx_seq++, nonce);
		wire_aead_tag(s->tx_key, nonce, all, k, tag);
		all[k++] = (struct iovec){ tag, FRAME_TAG };
	}
	size_t want = FRAME_HEADER + h->length, sent = 0;
	if (s->tx_len == 0) {
		ssize_t w;
		do
			w = writev(s->fd, all, k);
		while (w < 0 && errno == EINTR);
		if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return resp_lose(s, 0, strerror(errno));
		sent = w > 0 ? (size_t)w : 0;
	}
	if (sent == want)
		return 0;
	if (resp_room(s, want - sent) < 0)
		return -1;
	for (int i = 0; i < k; i++) { /* queue what writev did not take */
		size_t len = all[i].iov_len;
		if (sent >= len) {
			sent -= len;
			continue;
		}
		memcpy(s->tx + s->tx_len, (uint8_t *)all[i].iov_base + sent, len - sent);
		s->tx_len += len - sent;
		s->tx_queued += len - sent;
		sent = 0;
	}
	return 0;
}

static int resp_error(Responder *s, uint32_t id, uint32_t code, const char *msg)
{
	struct frame_header h = { F_ERROR, 0, 0, id, 0, 0, code };
	struct iovec iov = { (void *)msg, strlen(msg) };
	return resp_send(s, &h, &iov, 1);
}

/* One DATA frame for the n blocks at data (read at offset) answering request id. */
static int resp_data(Responder *s, uint32_t id, uint64_t offset, const uint8_t *data, uint32_t n)
{
	struct iovec iov[6];
	int k = 0;
	uint32_t run = 0, runs = 0;

	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *b = data + ((size_t)i << FRAME_BLOCK_SHIFT);
		uint32_t crc = wire_crc32c(0, b, FRAME_BLOCK);
		uint8_t *d = s->table + i * FRAME_DESC;
		int zero = crc == 0x98F94189u && memcmp(b, zero_block, FRAME_BLOCK) == 0;
		wire_store_le32(d, crc);
		d[4] = zero ? 0 : (uint8_t)(FRAME_BLOCK & 0xFF);
		d[5] = zero ? 0 : (uint8_t)(FRAME_BLOCK >> 8);
		d[6] = zero ? ENC_ZERO : ENC_RAW;
		d[7] = 0;
		if (zero)
			s->blocks_zero++;
		else
			s->blocks_raw++;
	}
	iov[k++] = (struct iovec){ s->table, (size_t)n * FRAME_DESC };
	/* Raw runs as pieces: at most 5 fit beside the table; more runs go as one copy. */
	for (uint32_t i = 0; i < n; i++)
		runs += s->table[i * FRAME_DESC + 6] == ENC_RAW && (i == 0 || s->table[(i - 1) * FRAME_DESC + 6] != ENC_RAW);
	if (runs <= 5) {
		for (uint32_t i = 0; i <= n; i++) {
			int raw = i < n && s->table[i * FRAME_DESC + 6] == ENC_RAW;
			if (raw) {
				run++;
				continue;
			}
			if (run) {
				const uint8_t *start = data + ((size_t)(i - run) << FRAME_BLOCK_SHIFT);
				iov[k++] = (struct iovec){ (void *)start, (size_t)run << FRAME_BLOCK_SHIFT };
				s->payload_bytes += (size_t)run << FRAME_BLOCK_SHIFT;
				run = 0;
			}
		}
	} else { /* compact the raw blocks in place (the buffer is ours) */
		size_t w = 0;
		for (uint32_t i = 0; i < n; i++) {
			if (s->table[i * FRAME_DESC + 6] != ENC_RAW)
				continue;
			if (w != (size_t)i << FRAME_BLOCK_SHIFT)
				memmove((uint8_t *)data + w, data + ((size_t)i << FRAME_BLOCK_SHIFT), FRAME_BLOCK);
			w += FRAME_BLOCK;
		}
		iov[k++] = (struct iovec){ (void *)data, w };
		s->payload_bytes += w;
	}
	struct frame_header h = { F_DATA, 0, (uint16_t)n, id, offset, 0, 0 };
	return resp_send(s, &h, iov, k);
}

static int resp_contains(Responder *s, uint64_t off, uint64_t len)
{
	for (int i = 0; i < s->nextents; i++)
		if (s->extents[i].start <= off && off + len <= s->extents[i].end)
			return 1;
	return 0;
}

static struct inflight *find_inflight(Responder *s, uint32_t id)
{
	for (uint32_t i = 0; i < s->ninflight; i++)
		if (s->inflight[i].id == id)
			return &s->inflight[i];
	return NULL;
}

static void drop_inflight(Responder *s, struct inflight *e)
{
	uint32_t i = (uint32_t)(e - s->inflight);
	memmove(e, e + 1, (s->ninflight - i - 1) * sizeof(*e));
	s->ninflight--;
}

/* Bulk mode (a thread of its own, no GIL): the next chunk of READ e, read with a plain blocking
 * preadv; the READ stays waiting until its last chunk is queued. A range the image no longer
 * holds (a live guest's memory file shrank) is answered with IO_ERROR. */
static int answer_chunk(Responder *s, struct inflight *e)
{
	uint32_t n = e->count < CHUNK_BLOCKS ? e->count : CHUNK_BLOCKS;
	size_t len = (size_t)n << FRAME_BLOCK_SHIFT, done = 0;
	uint32_t id = e->id;
	int rc;

	while (done < len) {
		ssize_t got = pread(s->image_fd, s->block_buf + done, len - done, (off_t)(e->offset + done));
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			break;
		done += (size_t)got;
	}
	if (done < len) {
		char why[160];
		snprintf(why, sizeof(why), "image ends or failed at %#llx, inside the requested range",
			 (unsigned long long)(e->offset + done));
		s->read_errors++;
		rc = resp_error(s, id, E_IO_ERROR, why);
		e->count = n; /* over with this frame */
	} else {
		rc = resp_data(s, id, e->offset, s->block_buf, n);
	}
	e = find_inflight(s, id);
	if (!e)
		return rc;
	if (e->count > n) {
		e->offset += len;
		e->count -= n;
		return rc;
	}
	e->state = R_QUEUED;
	e->tx_end = s->tx_queued;
	return rc;
}

/* Answer READ e (its range was checked when it came), in one frame: from the page cache, or,
 * when it is not there, from the disk (this connection's thread waits, no other). */
static int answer(Responder *s, struct inflight *e)
{
	uint64_t len = (uint64_t)e->count << FRAME_BLOCK_SHIFT;
	char why[160];

	if (!resp_contains(s, e->offset, len)) {
		snprintf(why, sizeof(why), "%#llx+%#llx is not in a region of this image", (unsigned long long)e->offset,
			 (unsigned long long)len);
		s->read_errors++;
		e->state = R_QUEUED;
	} else if (s->bulk) {
		return answer_chunk(s, e);
	} else {
		struct iovec iov = { s->block_buf, len };
		ssize_t got = preadv2(s->image_fd, &iov, 1, (off_t)e->offset, s->rwf);
		if (got < 0 && errno == EOPNOTSUPP && s->rwf) {
			s->rwf = 0; /* shmem and tmpfs never wait for a disk */
			got = -1;
		}
		size_t done = got > 0 ? (size_t)got : 0;
		while (done < len) { /* not all in the page cache: wait for the disk (this thread only) */
			ssize_t more = pread(s->image_fd, s->block_buf + done, len - done, (off_t)(e->offset + done));
			if (more < 0 && errno == EINTR)
				continue;
			if (more <= 0)
				break;
			done += (size_t)more;
		}
		if (done < len) {
			snprintf(why, sizeof(why), "image ends or failed at %#llx, inside the requested range",
				 (unsigned long long)(e->offset + done));
			s->read_errors++;
			uint32_t id = e->id;
			int rc = resp_error(s, id, E_IO_ERROR, why);
			if ((e = find_inflight(s, id))) {
				e->state = R_QUEUED;
				e->tx_end = s->tx_queued;
			}
			return rc;
		}
		why[0] = '\0';
	}
	uint32_t id = e->id;
	int rc = why[0] ? resp_error(s, id, E_OUT_OF_RANGE, why) : resp_data(s, id, e->offset, s->block_buf, e->count);
	e = find_inflight(s, id);
	if (e) {
		e->state = R_QUEUED;
		e->tx_end = s->tx_queued;
	}
	return rc;
}

/* Bulk mode: ns to wait before the next chunk (an urgent READ came in lately), else 0. At most one
 * chunk per URGENT_QUIET_NS goes out while urgent READs keep coming. */
static uint64_t quiet_left(Responder *s)
{
	uint64_t now = resp_now_ns(), last = __atomic_load_n(&urgent_last_ns, __ATOMIC_RELAXED);
	if (now - last >= URGENT_QUIET_NS || now - s->last_chunk_ns >= URGENT_QUIET_NS)
		return 0;
	return URGENT_QUIET_NS - (now - s->last_chunk_ns);
}

/* Forget the READs whose answers are wholly written. */
static void drop_written(Responder *s)
{
	for (uint32_t i = 0; i < s->ninflight;) {
		struct inflight *e = &s->inflight[i];
		if (e->state == R_QUEUED && e->tx_end <= s->tx_sent)
			drop_inflight(s, e);
		else
			i++;
	}
}

/* Bulk mode: chunks while the socket keeps up and no urgent READ asks for quiet; small READs
 * first, then one chunk of the oldest large one, then small ones again (they overtake it). */
static int progress_bulk(Responder *s)
{
	drop_written(s);
	while (s->tx_len < TX_HIGH_BULK && !quiet_left(s)) {
		struct inflight *pick = NULL;
		for (uint32_t i = 0; i < s->ninflight; i++) {
			struct inflight *e = &s->inflight[i];
			if (e->state != R_WAITING)
				continue;
			if (e->count <= CHUNK_BLOCKS) {
				pick = e;
				break;
			}
			if (!pick)
				pick = e;
		}
		if (!pick)
			return 0;
		s->last_chunk_ns = resp_now_ns();
		if (answer(s, pick) < 0)
			return -1;
		drop_written(s);
	}
	return 0;
}

/* Forget what is wholly written; answer waiting READs while the socket keeps up. */
static int progress(Responder *s)
{
	if (s->bulk)
		return progress_bulk(s);
	for (uint32_t i = 0; i < s->ninflight;) {
		struct inflight *e = &s->inflight[i];
		if (e->state == R_QUEUED && e->tx_end <= s->tx_sent) {
			drop_inflight(s, e);
			continue;
		}
		if (e->state == R_WAITING && s->tx_len < TX_HIGH) {
			if (answer(s, e) < 0)
				return -1;
			continue; /* look at it again: it may be written already */
		}
		i++;
	}
	return 0;
}

static int on_read(Responder *s, const struct frame_header *h)
{
	uint64_t len = (uint64_t)h->count << FRAME_BLOCK_SHIFT;
	char why[160];

	drop_written(s); /* an id may be reused, and the limit counts, once its answer is written */
	if (find_inflight(s, h->id)) {
		snprintf(why, sizeof(why), "request id %u is already in flight", h->id);
		return resp_lose(s, E_BAD_ID, why);
	}
	if (s->ninflight >= s->max_inflight) {
		snprintf(why, sizeof(why), "more than %u requests in flight", s->max_inflight);
		return resp_lose(s, E_TOO_MANY_REQUESTS, why);
	}
	if (h->offset > s->image_size || len > s->image_size - h->offset) {
		snprintf(why, sizeof(why), "READ %#llx+%#llx is outside the image (%#llx bytes)",
			 (unsigned long long)h->offset, (unsigned long long)len, (unsigned long long)s->image_size);
		return resp_lose(s, E_OUT_OF_RANGE, why);
	}
	s->reads++;
	if (!s->bulk)
		__atomic_store_n(&urgent_last_ns, resp_now_ns(), __ATOMIC_RELAXED);
	s->inflight[s->ninflight++] = (struct inflight){ h->id, h->count, h->offset, 0, R_WAITING };
	return 0; /* serve() answers once every READ that came in with it has been seen */
}

static const char *type_name(uint8_t t)
{
	switch (t) {
	case F_HELLO: return "HELLO";
	case F_CHALLENGE: return "CHALLENGE";
	case F_AUTH: return "AUTH";
	case F_WELCOME: return "WELCOME";
	case F_READ: return "READ";
	case F_DATA: return "DATA";
	case F_PING: return "PING";
	case F_PONG: return "PONG";
	case F_ERROR: return "ERROR";
	default: return NULL;
	}
}

/* The checks uffdd/peer/protocol/frames.py:check_header makes on a frame a server receives,
 * with the same codes, then the handshake state's (HELLO and AUTH are over by now). */
static int check_header(Responder *s, const struct frame_header *h)
{
	const char *name = type_name(h->type);
	uint32_t length = h->length;
	char why[160];

#define LOSE(code, ...) (snprintf(why, sizeof(why), __VA_ARGS__), resp_lose(s, code, why))
	if (!name)
		return LOSE(E_UNKNOWN_TYPE, "frame type %#04x is not defined", h->type);
	if (h->type != F_HELLO && h->type != F_AUTH && h->type != F_READ && h->type != F_PING && h->type != F_ERROR)
		return LOSE(E_BAD_STATE, "%s frames are not expected in this direction", name);
	if (h->flags & ~FRAME_FLAG_TAGGED)
		return LOSE(E_BAD_FRAME, "%s flags %#x: only TAGGED (0x1) is defined", name, h->flags);
	if (h->flags & FRAME_FLAG_TAGGED) {
		if (length < FRAME_TAG)
			return LOSE(E_BAD_LENGTH, "tagged %s of %u bytes has no room for its tag", name, length);
		length -= FRAME_TAG;
	}
	uint32_t max = h->type == F_ERROR ? FRAME_MAX_ERROR
		       : h->type == F_HELLO ? FRAME_MAX_HELLO
		       : h->type == F_AUTH  ? FRAME_MAX_AUTH
					    : 0;
	if (length > max)
		return LOSE(E_BAD_LENGTH, "%s length %u exceeds the limit of %u bytes", name, length, max);
	if (h->type == F_READ) {
		if (!h->count || h->count > s->max_blocks)
			return LOSE(E_OUT_OF_RANGE, "READ count %u outside 1..%u", h->count, s->max_blocks);
		if (h->offset & (FRAME_BLOCK - 1))
			return LOSE(E_OUT_OF_RANGE, "READ offset %#llx is not block aligned", (unsigned long long)h->offset);
	} else if (h->count || h->offset) {
		return LOSE(E_BAD_FRAME, "%s must have count and offset 0", name);
	}
	if (h->type == F_READ && !h->id)
		return LOSE(E_BAD_ID, "READ with request id 0");
	if ((h->type == F_HELLO || h->type == F_AUTH) && h->id)
		return LOSE(E_BAD_FRAME, "%s must have id 0", name);
	if (h->aux && h->type != F_ERROR)
		return LOSE(E_BAD_FRAME, "%s aux field must be 0", name);
	return 0; /* tags are checked once the frame is whole */
#undef LOSE
}

static int resp_parse(Responder *s)
{
	while (s->rx_end - s->rx_start >= FRAME_HEADER) {
		uint8_t *f = s->rx + s->rx_start;
		struct frame_header h;
		uint32_t plen;
		int tagged;

		frame_get_header(f, &h);
		if (check_header(s, &h) < 0)
			return -1;
		if (s->rx_end - s->rx_start < (size_t)FRAME_HEADER + h.length) {
			size_t need = (size_t)FRAME_HEADER + h.length;
			if (need > s->rx_cap) { /* an ERROR near its limit may not fit yet */
				uint8_t *p = realloc(s->rx, need);
				if (!p)
					return resp_lose(s, 0, "out of memory");
				s->rx = p;
				s->rx_cap = need;
			}
			return 0;
		}
		tagged = h.flags & FRAME_FLAG_TAGGED;
		plen = h.length - (tagged ? FRAME_TAG : 0);
		if (s->keyed && !tagged) {
			snprintf(s->lost, sizeof(s->lost), "untagged %s on an authenticated connection", type_name(h.type));
			s->lost_code = E_TAMPERED;
			return -1;
		}
		if (!s->keyed && tagged)
			return resp_lose(s, E_BAD_FRAME, "tagged frame before the connection was authenticated");
		if (tagged) {
			uint8_t nonce[12];
			struct iovec iov = { f, FRAME_HEADER + plen };
			frame_nonce(s->rx_seq++, nonce);
			if (wire_aead_verify(s->rx_key, nonce, &iov, 1, f + FRAME_HEADER + plen) != 0) {
				snprintf(s->lost, sizeof(s->lost), "%s frame failed its tag", type_name(h.type));
				s->lost_code = E_TAMPERED;
				return -1;
			}
		}
		s->rx_start += FRAME_HEADER + h.length;
		int rc;
		if (h.type == F_READ) {
			rc = on_read(s, &h);
		} else if (h.type == F_PING) {
			struct frame_header pong = { F_PONG, 0, 0, h.id, 0, 0, 0 };
			rc = resp_send(s, &pong, NULL, 0);
		} else if (h.type == F_ERROR) { /* no GIL here: kept for Python */
			s->peer_code = h.aux;
			s->peer_error_len = (int)plen;
			memcpy(s->peer_error, f + FRAME_HEADER, plen);
			rc = resp_lose(s, 0, "the client reported an error");
		} else {
			rc = resp_lose(s, E_BAD_STATE, h.type == F_HELLO ? "HELLO sent twice" : "AUTH before HELLO, or twice");
		}
		if (rc < 0)
			return -1;
	}
	return 0;
}

/* ---- Python interface --------------------------------------------------------------------- */

static int Responder_init(Responder *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = { "fd", "image_fd", "image_size", "extents", "tx_key", "rx_key", "tx_seq", "rx_seq",
				  "max_blocks", "max_inflight", "bulk", NULL };
	PyObject *extents, *txo, *rxo, *seq = NULL;
	unsigned long long size, tx_seq, rx_seq;
	unsigned int mb, mi;
	int fd, ifd, bulk = 0;

	self->wake_fd = -1;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKOOOKKII|p", kwlist, &fd, &ifd, &size, &extents, &txo, &rxo,
					 &tx_seq, &rx_seq, &mb, &mi, &bulk))
		return -1;
	if (self->rx) {
		PyErr_SetString(PyExc_RuntimeError, "a Responder is set up once");
		return -1;
	}
	if (!mb || mb > 0xFFFF || !mi || mi > 65536) {
		PyErr_SetString(PyExc_ValueError, "max_blocks 1..65535, max_inflight 1..65536");
		return -1;
	}
	seq = PySequence_Fast(extents, "extents must be a sequence of (start, end)");
	if (!seq)
		return -1;
	Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
	if (n > MAX_EXTENTS) {
		Py_DECREF(seq);
		PyErr_SetString(PyExc_ValueError, "too many extents");
		return -1;
	}
	self->extents = calloc(n ? (size_t)n : 1, sizeof(struct extent));
	for (Py_ssize_t i = 0; self->extents && i < n; i++) {
		unsigned long long a, b;
		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK", &a, &b)) {
			Py_DECREF(seq);
			return -1;
		}
		self->extents[i] = (struct extent){ a, b };
	}
	Py_DECREF(seq);
	self->nextents = (int)n;
	self->keyed = txo != Py_None;
	if (self->keyed) {
		Py_buffer t, r;
		if (PyObject_GetBuffer(txo, &t, PyBUF_SIMPLE) < 0)
			return -1;
		if (PyObject_GetBuffer(rxo, &r, PyBUF_SIMPLE) < 0) {
			PyBuffer_Release(&t);
			return -1;
		}
		int okk = t.len == WIRE_KEY_SIZE && r.len == WIRE_KEY_SIZE;
		if (okk) {
			memcpy(self->tx_key, t.buf, WIRE_KEY_SIZE);
			memcpy(self->rx_key, r.buf, WIRE_KEY_SIZE);
		}
		PyBuffer_Release(&t);
		PyBuffer_Release(&r);
		if (!okk) {
			PyErr_SetString(PyExc_ValueError, "keys have 32 bytes");
			return -1;
		}
	}
	self->max_blocks = mb;
	self->max_inflight = mi;
	self->inflight = calloc(mi, sizeof(struct inflight));
	self->rx_cap = 1 << 16;
	self->rx = malloc(self->rx_cap);
	self->block_buf = malloc((size_t)mb << FRAME_BLOCK_SHIFT);
	self->table = malloc((size_t)mb * FRAME_DESC);
	if (!self->extents || !self->rx || !self->block_buf || !self->table || !self->inflight) {
		PyErr_NoMemory();
		return -1;
	}
	self->fd = fd;
	self->image_fd = ifd;
	self->image_size = size;
	self->tx_seq = tx_seq;
	self->rx_seq = rx_seq;
	self->rwf = RWF_NOWAIT;
	self->last_rx_ns = resp_now_ns();
	self->bulk = bulk;
	if ((self->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	return 0;
}

static void Responder_close_fds(Responder *self)
{
	if (self->fd >= 0)
		close(self->fd);
	if (self->image_fd >= 0)
		close(self->image_fd);
	self->fd = self->image_fd = -1;
	if (self->wake_fd >= 0)
		close(self->wake_fd);
	self->wake_fd = -1;
}

static void Responder_dealloc(Responder *self)
{
	if (self->rx)
		Responder_close_fds(self);
	free(self->extents);
	free(self->inflight);
	free(self->rx);
	free(self->tx);
	free(self->block_buf);
	free(self->table);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Without the GIL: take in READs and answer them (bulk: a chunk at a time) until the connection
 * ends (-1, why in lost/lost_code, or an ERROR from the client in peer_error) or stop() (0). */
static int serve_loop(Responder *s)
{
	size_t high = s->bulk ? TX_HIGH_BULK : TX_HIGH;

	for (;;) {
		uint64_t one, quiet = 0;
		if (__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE))
			return 0;
		if (s->tx_len && resp_flush(s) < 0)
			return resp_lose(s, 0, strerror(errno));
		if (progress(s) < 0)
			return -1;
		for (uint32_t i = 0; s->bulk && i < s->ninflight && !quiet; i++)
			if (s->inflight[i].state == R_WAITING && s->tx_len < high)
				quiet = quiet_left(s);
		struct pollfd p[2] = { { s->fd, (short)((s->tx_len < high ? POLLIN : 0) | (s->tx_len ? POLLOUT : 0)), 0 },
				       { s->wake_fd, POLLIN, 0 } };
		int timeout = quiet ? (int)((quiet + 999999) / 1000000) : 1000;
		if (poll(p, 2, timeout) < 0 && errno != EINTR)
			return resp_lose(s, 0, strerror(errno));
		if (p[1].revents & POLLIN)
			(void)!read(s->wake_fd, &one, sizeof(one));
		if (!(p[0].revents & (POLLIN | POLLERR | POLLHUP)))
			continue;
		if (s->rx_start == s->rx_end)
			s->rx_start = s->rx_end = 0;
		if (s->rx_end == s->rx_cap) {
			memmove(s->rx, s->rx + s->rx_start, s->rx_end - s->rx_start);
			s->rx_end -= s->rx_start;
			s->rx_start = 0;
		}
		ssize_t n = recv(s->fd, s->rx + s->rx_end, s->rx_cap - s->rx_end, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
			continue;
		if (n <= 0)
			return resp_lose(s, 0, n == 0 ? "client closed the connection" : strerror(errno));
		s->rx_end += (size_t)n;
		s->last_rx_ns = resp_now_ns();
		if (resp_parse(s) < 0)
			return -1;
	}
}

/* serve() -> None (stop() ended it), ("lost", reason, code) or ("error", code, message): the
 * connection's whole life, on the calling thread, without the GIL. */
static PyObject *Responder_serve(Responder *self, PyObject *Py_UNUSED(ignored))
{
	int rc;

	if (self->fd < 0) {
		PyErr_SetString(PyExc_RuntimeError, "serve() needs a connection");
		return NULL;
	}
	self->lost[0] = '\0';
	self->lost_code = 0;
	self->peer_error_len = -1;
	Py_BEGIN_ALLOW_THREADS
	rc = serve_loop(self);
	Py_END_ALLOW_THREADS
	if (rc == 0)
		Py_RETURN_NONE;
	if (self->peer_error_len >= 0)
		return Py_BuildValue("(sIy#)", "error", self->peer_code, self->peer_error, (Py_ssize_t)self->peer_error_len);
	return Py_BuildValue("(ssi)", "lost", self->lost, self->lost_code);
}

static PyObject *Responder_stop(Responder *self, PyObject *Py_UNUSED(ignored))
{
	uint64_t one = 1;
	__atomic_store_n(&self->stop, 1, __ATOMIC_RELEASE);
	if (self->wake_fd >= 0)
		(void)!write(self->wake_fd, &one, sizeof(one));
	Py_RETURN_NONE;
}

/* send_error(0, code, message): the connection-level ERROR Python sends before it closes (once
 * serve() has returned). */
static PyObject *Responder_send_error(Responder *self, PyObject *args)
{
	unsigned int id, code;
	const char *msg;

	if (!PyArg_ParseTuple(args, "IIs", &id, &code, &msg))
		return NULL;
	if (id) {
		PyErr_SetString(PyExc_ValueError, "the responder answers its READs itself: only id 0 (the connection)");
		return NULL;
	}
	if (self->fd < 0 || resp_error(self, 0, code, msg) < 0)
		return PyErr_Format(PyExc_OSError, "connection lost: %s", self->lost);
	Py_RETURN_NONE;
}

static PyObject *Responder_flush(Responder *self, PyObject *Py_UNUSED(ignored))
{
	int rc = self->fd >= 0 ? resp_flush(self) : -1;
	if (rc < 0)
		return PyErr_SetFromErrno(PyExc_OSError);
	drop_written(self);
	return PyBool_FromLong(rc);
}

static PyObject *Responder_close(Responder *self, PyObject *Py_UNUSED(ignored))
{
	Responder_close_fds(self);
	Py_RETURN_NONE;
}

static PyObject *Responder_get_stats(Responder *self, void *Py_UNUSED(closure))
{
	return Py_BuildValue("{sKsKsKsKsK}", "reads", self->reads, "read_errors", self->read_errors, "blocks_raw",
			     self->blocks_raw, "blocks_zero", self->blocks_zero, "payload_bytes", self->payload_bytes);
}

static PyObject *Responder_get_fd(Responder *self, void *Py_UNUSED(closure))
{
	return PyLong_FromLong(self->fd);
}

static PyObject *Responder_get_last_rx(Responder *self, void *Py_UNUSED(closure))
{
	return PyLong_FromUnsignedLongLong(self->last_rx_ns);
}

static PyObject *Responder_get_tx_pending(Responder *self, void *Py_UNUSED(closure))
{
	return PyLong_FromSize_t(self->tx_len);
}

static PyMethodDef Responder_methods[] = {
	{ "serve", (PyCFunction)Responder_serve, METH_NOARGS, "serve() -> None or why it ended (bulk mode; blocks)" },
	{ "stop", (PyCFunction)Responder_stop, METH_NOARGS, "stop(): make serve() return None" },
	{ "send_error", (PyCFunction)Responder_send_error, METH_VARARGS, "send_error(id, code, message)" },
	{ "flush", (PyCFunction)Responder_flush, METH_NOARGS, "flush() -> whether everything was written" },
	{ "close", (PyCFunction)Responder_close, METH_NOARGS, "close the socket and the image's fd" },
	{ NULL, NULL, 0, NULL },
};

static PyGetSetDef Responder_getset[] = {
	{ "stats", (getter)Responder_get_stats, NULL, "counters", NULL },
	{ "fd", (getter)Responder_get_fd, NULL, "the socket, -1 once closed", NULL },
	{ "last_rx_ns", (getter)Responder_get_last_rx, NULL, "CLOCK_MONOTONIC ns of the last bytes received", NULL },
	{ "tx_pending", (getter)Responder_get_tx_pending, NULL, "bytes queued but not yet written", NULL },
	{ NULL, NULL, NULL, NULL, NULL },
};

static PyTypeObject ResponderType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "uffdd.peer._native.Responder",
	.tp_basicsize = sizeof(Responder),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The source's urgent connection, after the handshake (see _responder.c).",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Responder_init,
	.tp_dealloc = (destructor)Responder_dealloc,
	.tp_methods = Responder_methods,
	.tp_getset = Responder_getset,
};

static PyObject *urgent_mark(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
	__atomic_store_n(&urgent_last_ns, resp_now_ns(), __ATOMIC_RELAXED);
	Py_RETURN_NONE;
}

static PyObject *urgent_last(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
	return PyLong_FromUnsignedLongLong(__atomic_load_n(&urgent_last_ns, __ATOMIC_RELAXED));
}

static PyMethodDef responder_functions[] = {
	{ "urgent_mark", urgent_mark, METH_NOARGS, "urgent_mark(): an urgent READ came in (bulk steps aside)" },
	{ "urgent_last_ns", urgent_last, METH_NOARGS, "urgent_last_ns() -> CLOCK_MONOTONIC ns of the latest, or 0" },
	{ NULL, NULL, 0, NULL },
};

int native_add_responder(PyObject *module)
{
	if (PyModule_AddFunctions(module, responder_functions) < 0)
		return -1;
	if (PyType_Ready(&ResponderType) < 0)
		return -1;
	Py_INCREF(&ResponderType);
	if (PyModule_AddObject(module, "Responder", (PyObject *)&ResponderType) < 0) {
		Py_DECREF(&ResponderType);
		return -1;
	}
	return 0;
}
