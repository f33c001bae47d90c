/*
 * handler: the reference page-fault handler the Python daemon is benchmarked against.
 *
 * Single-threaded and deliberately plain: it does what the daemon does for one session and
 * nothing more. It accepts one VMM connection, takes the Firecracker-style handshake (JSON body
 * with one region, SCM_RIGHTS [uffd, memfd]), maps the memfd a second time, and resolves every
 * fault by pread()ing the page from the snapshot into that second mapping and issuing
 * UFFDIO_CONTINUE. EOF on the connection ends the session.
 *
 * With --fault-around BYTES it does what uffdd's fault-around does: a fault on a page not yet
 * filled fills the pages around it that are not filled either, within the aligned block of
 * BYTES, with one pread() and one UFFDIO_CONTINUE; a fault on a page already filled (a stale
 * message: the thread was woken by the CONTINUE that mapped it) is answered with CONTINUE,
 * which says EEXIST, and UFFDIO_WAKE, as uffdd answers it.
 *
 * Build:  gcc -O2 -Wall -Wextra -o build/handler handler.c   (or: make)
 * Usage:  handler --socket PATH --snapshot FILE [--fault-around BYTES]
 *
 * Output: {"faults":F} on stdout when the VMM disconnects; exit status 0.
 * Any failure is reported on stderr (and, during the handshake, as a one-line JSON error to
 * the VMM) with exit status 2.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_BODY 65536
#define MSGS_PER_READ 64
/* Kernel-internal feature bit, visible in fdinfo once UFFDIO_API has been done. */
#define UFFD_FEATURE_INITIALIZED 0x80000000ull

static int conn = -1;

static void die(const char *what)
{
	fprintf(stderr, "handler: %s: %s\n", what, strerror(errno));
	exit(2);
}

/* A handshake problem is the VMM's to know about too: answer with a one-line JSON error. */
static void refuse(const char *msg)
{
	char line[256];
	int n = snprintf(line, sizeof(line), "{\"error\":\"%s\"}\n", msg);

	fprintf(stderr, "handler: %s\n", msg);
	if (conn >= 0 && n > 0)
		(void)!write(conn, line, (size_t)n);
	exit(2);
}

struct region {
	uint64_t base, size, offset, page_size;
};

/* True once buf holds one complete top-level JSON value (object or list). */
static int json_complete(const char *buf, size_t len)
{
	int depth = 0, in_str = 0, esc = 0, started = 0;

	for (size_t i = 0; i < len; i++) {
		char c = buf[i];

		if (in_str) {
			if (esc)
				esc = 0;
			else if (c == '\\')
				esc = 1;
			else if (c == '"')
				in_str = 0;
			continue;
		}
		if (c == '"') {
			in_str = 1;
		} else if (c == '{' || c == '[') {
			depth++;
			started = 1;
		} else if (c == '}' || c == ']') {
			if (--depth == 0 && started)
				return 1;
		}
	}
	return 0;
}

/* Find "key": <unsigned integer> in the body. Keys are matched with their quotes, so "size"
 * does not match inside "page_size". Returns 0 if absent or not a number. */
static int json_uint(const char *body, const char *key, uint64_t *out)
{
	char pat[64];
	const char *p;
	char *end;

	snprintf(pat, sizeof(pat), "\"%s\"", key);
	p = strstr(body, pat);
	if (!p)
		return 0;
	p += strlen(pat);
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	if (*p++ != ':')
		return 0;
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	if (*p < '0' || *p > '9')
		return 0;
	errno = 0;
	*out = strtoull(p, &end, 10);
	return errno == 0 && end != p;
}

static void parse_region(const char *body, struct region *r)
{
	const char *first = strstr(body, "\"base_host_virt_addr\"");

	if (!first)
		refuse("no region in the handshake");
	if (strstr(first + 1, "\"base_host_virt_addr\""))
		refuse("this handler serves exactly one region");
	if (!json_uint(body, "base_host_virt_addr", &r->base) ||
	    !json_uint(body, "size", &r->size) || !json_uint(body, "offset", &r->offset))
		refuse("region needs integer base_host_virt_addr, size and offset");
	/* Firecracker's deprecated page_size_kib also carries bytes. */
	if (!json_uint(body, "page_size", &r->page_size) &&
	    !json_uint(body, "page_size_kib", &r->page_size))
		refuse("region needs an integer page_size");
	if (r->page_size != 4096 && r->page_size != (2u << 20))
		refuse("page_size must be 4096 or 2097152");
	if (r->size == 0 || r->base % r->page_size || r->size % r->page_size ||
	    r->offset % r->page_size)
		refuse("region base, size and offset must be page aligned");
}

/* Read the handshake: the body may arrive in several reads; the fds come with the first. */
static void recv_handshake(char *body, struct region *r, int *uffd, int *memfd)
{
	size_t len = 0;

	*uffd = *memfd = -1;
	while (!json_complete(body, len)) {
		union {
			char buf[CMSG_SPACE(4 * sizeof(int))];
			struct cmsghdr align;
		} ctl;
		struct iovec iov = { .iov_base = body + len, .iov_len = MAX_BODY - 1 - len };
		struct msghdr msg = {
			.msg_iov = &iov,
			.msg_iovlen = 1,
			.msg_control = ctl.buf,
			.msg_controllen = sizeof(ctl.buf),
		};
		ssize_t n;

		if (iov.iov_len == 0)
			refuse("handshake body too large");
		n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("recvmsg");
		if (n == 0) {
			fprintf(stderr, "handler: VMM closed the connection during the handshake\n");
			exit(2);
		}
		if (msg.msg_flags & MSG_CTRUNC)
			refuse("too many file descriptors in the handshake");
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
			if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
				continue;
			size_t nfds = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			int fds[4];

			memcpy(fds, CMSG_DATA(cm), nfds * sizeof(int));
			if (nfds != 2 || *uffd >= 0)
				refuse("expected exactly two fds: [uffd, memfd]");
			*uffd = fds[0];
			*memfd = fds[1];
		}
		len += (size_t)n;
		body[len] = '\0';
	}
	if (*uffd < 0)
		refuse("expected exactly two fds: [uffd, memfd]");
	parse_region(body, r);
}

/* Has someone already done UFFDIO_API on this fd? A second UFFDIO_API would fail with EINVAL,
 * so ask the kernel: the features field of fdinfo's "API:" line carries the initialized bit. */
static int uffd_initialized(int uffd)
{
	char path[64], line[256];
	unsigned long long api, features, ioctls;
	int found = 0, init = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", uffd);
	f = fopen(path, "re");
	if (!f)
		die(path);
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "API: %llx:%llx:%llx", &api, &features, &ioctls) == 3) {
			found = 1;
			init = (features & UFFD_FEATURE_INITIALIZED) != 0;
		}
	}
	fclose(f);
	if (!found)
		refuse("fd passed as uffd is not a userfaultfd");
	return init;
}

static void uffd_setup(int uffd, const struct region *r)
{
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MINOR_HUGETLBFS,
	};
	/* MISSING as well as MINOR: a page never written is not in the page cache, so it raises a
	 * MISSING fault, and without that mode the guest would silently read zeros. */
	struct uffdio_register reg = {
		.range = { .start = r->base, .len = r->size },
		.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
	};

	if (ioctl(uffd, UFFDIO_API, &api) < 0)
		die("UFFDIO_API");
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
		die("UFFDIO_REGISTER");
	if (!(reg.ioctls & (1ull << _UFFDIO_CONTINUE)))
		refuse("UFFDIO_CONTINUE is not available for this region");
}

/* pread a whole page. Past the end of the snapshot the page reads as zeros, but it must still
 * be written: UFFDIO_CONTINUE only maps pages that are already in the page cache. */
static void fill_page(int snap, char *dst, uint64_t len, uint64_t off)
{
	uint64_t got = 0;

	while (got < len) {
		ssize_t n = pread(snap, dst + got, len - got, (off_t)(off + got));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("pread snapshot");
		if (n == 0)
			break;
		got += (uint64_t)n;
	}
	if (got < len)
		memset(dst + got, 0, len - got);
}

/* Map the filled page into the guest. Returns 0 when the guest or its mapping is gone. */
static int map_page(int uffd, uint64_t addr, uint64_t len)
{
	for (;;) {
		struct uffdio_continue cont = { .range = { .start = addr, .len = len } };

		if (ioctl(uffd, UFFDIO_CONTINUE, &cont) == 0)
			return 1;
		switch (errno) {
		case EEXIST: {
			/* Someone mapped it first; the faulting thread still needs waking. */
			struct uffdio_range wake = { .start = addr, .len = len };

			if (ioctl(uffd, UFFDIO_WAKE, &wake) < 0)
				die("UFFDIO_WAKE");
			return 1;
		}
		case EAGAIN: /* mapping changing under us; try again */
		case EINTR:
			continue;
		case ESRCH:
		case ENOENT:
			return 0;
		default:
			die("UFFDIO_CONTINUE");
		}
	}
}

static void usage(void)
{
	fprintf(stderr, "usage: handler --socket PATH --snapshot FILE [--fault-around BYTES]\n");
	exit(2);
}

/* Serve one fault with fault-around (see the header comment). Returns 0 when the guest is gone. */
static int serve_block(int snap, int uffd, char *shadow, const struct region *r, uint8_t *filled,
		       uint64_t block, uint64_t addr)
{
	uint64_t ps = r->page_size, npages = r->size / ps, idx = (addr - r->base) / ps;
	uint64_t lo = idx, hi = idx + 1, b0 = idx - idx % block, b1 = b0 + block < npages ? b0 + block : npages;

	if (filled[idx])
		return map_page(uffd, addr, ps);
	while (lo > b0 && !filled[lo - 1])
		lo--;
	while (hi < b1 && !filled[hi])
		hi++;
	fill_page(snap, shadow + r->offset + lo * ps, (hi - lo) * ps, r->offset + lo * ps);
	memset(filled + lo, 1, hi - lo);
	return map_page(uffd, r->base + lo * ps, (hi - lo) * ps);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "snapshot", required_argument, NULL, 'f' },
		{ "fault-around", required_argument, NULL, 'a' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sock_path = NULL, *snap_path = NULL;
	uint64_t fault_around = 0;
	int opt;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 's': sock_path = optarg; break;
		case 'f': snap_path = optarg; break;
		case 'a': fault_around = strtoull(optarg, NULL, 0); break;
		default: usage();
		}
	}
	if (!sock_path || !snap_path || optind != argc)
		usage();

	int snap = open(snap_path, O_RDONLY | O_CLOEXEC);
	if (snap < 0)
		die(snap_path);

	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	if (strlen(sock_path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "handler: socket path too long\n");
		return 2;
	}
	strcpy(sa.sun_path, sock_path);
	int lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lsock < 0)
		die("socket");
	unlink(sock_path); /* a stale socket from an earlier run */
	if (bind(lsock, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die("bind");
	if (listen(lsock, 1) < 0)
		die("listen");
	do
		conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
	while (conn < 0 && errno == EINTR);
	if (conn < 0)
		die("accept");
	close(lsock);
	unlink(sock_path);

	static char body[MAX_BODY];
	struct region r;
	int uffd, memfd;
	recv_handshake(body, &r, &uffd, &memfd);

	if (!uffd_initialized(uffd))
		uffd_setup(uffd, &r);

	/* The second mapping: not registered with any uffd, so writing through it never faults
	 * to us; it just puts the page in the memfd's page cache for UFFDIO_CONTINUE to map. */
	struct stat st;
	if (fstat(memfd, &st) < 0)
		die("fstat memfd");
	if (r.offset + r.size > (uint64_t)st.st_size)
		refuse("region lies beyond the end of the memfd");
	char *shadow = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (shadow == MAP_FAILED)
		die("mmap memfd");
	uint64_t block = fault_around / r.page_size;
	uint8_t *filled = block > 1 ? calloc(r.size / r.page_size, 1) : NULL;
	if (block > 1 && !filled)
		die("calloc");

	static const char ready[] = "{\"status\":\"ready\"}\n";
	if (write(conn, ready, sizeof(ready) - 1) != (ssize_t)(sizeof(ready) - 1))
		die("write ready");

	uint64_t faults = 0;
	struct pollfd pfd[2] = {
		{ .fd = uffd, .events = POLLIN },
		{ .fd = conn, .events = POLLIN | POLLRDHUP },
	};
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		/* Serve faults before looking at the connection, so none is dropped at shutdown. */
		if (pfd[0].revents & POLLIN) {
			struct uffd_msg msgs[MSGS_PER_READ];
			ssize_t n = read(uffd, msgs, sizeof(msgs));

			if (n < 0 && errno != EAGAIN && errno != EINTR)
				die("read uffd");
			for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
				if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
					continue; /* no events were requested; nothing else to handle */
				uint64_t addr = msgs[i].arg.pagefault.address & ~(r.page_size - 1);

				if (addr < r.base || addr >= r.base + r.size) {
					fprintf(stderr, "handler: fault outside the region: 0x%" PRIx64 "\n",
						addr);
					continue;
				}
				uint64_t off = r.offset + (addr - r.base);

				faults++;
				if (filled) {
					if (!serve_block(snap, uffd, shadow, &r, filled, block, addr))
						goto done;
					continue;
				}
				fill_page(snap, shadow + off, r.page_size, off);
				if (!map_page(uffd, addr, r.page_size))
					goto done; /* the guest is gone */
			}
		} else if (pfd[0].revents & (POLLERR | POLLHUP)) {
			fprintf(stderr, "handler: userfaultfd reported an error\n");
			return 2;
		}
		if (pfd[1].revents & (POLLIN | POLLRDHUP | POLLHUP | POLLERR)) {
			char buf[256];
			ssize_t n = read(conn, buf, sizeof(buf));

			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break; /* EOF: the VMM is gone, the session ends */
		}
	}
done:
	printf("{\"faults\":%" PRIu64 "}\n", faults);
	fflush(stdout);
	free(filled);
	munmap(shadow, (size_t)st.st_size);
	close(conn);
	close(uffd);
	close(memfd);
	close(snap);
	return 0;
}
