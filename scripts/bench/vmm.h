/*
 * vmm.h: the VMM side of a page-fault handler, shared by the C reference programs here.
 *
 * Accepts one VMM on a Unix socket, takes its handshake exactly as uffdd documents it
 * (docs/handshake.md: a JSON body with one region, SCM_RIGHTS [uffd, memfd]), sets up the
 * userfaultfd if the VMM left it bare, and maps the memfd a second time. Deliberately plain:
 * each program includes it once.
 */
#ifndef UFFDD_BENCH_VMM_H
#define UFFDD_BENCH_VMM_H

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
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

/* The program's name in error messages. */
static const char *prog = "handler";

#define MAX_BODY 65536
#define MSGS_PER_READ 64
/* Kernel-internal feature bit, visible in fdinfo once UFFDIO_API has been done. */
#define UFFD_FEATURE_INITIALIZED 0x80000000ull

static int conn = -1;

static void die(const char *what)
{
	fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
	exit(2);
}

/* A handshake problem is the VMM's to know about too: answer with a one-line JSON error. */
static void refuse(const char *msg)
{
	char line[256];
	int n = snprintf(line, sizeof(line), "{\"error\":\"%s\"}\n", msg);

	fprintf(stderr, "%s: %s\n", prog, msg);
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
			fprintf(stderr, "%s: VMM closed the connection during the handshake\n", prog);
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

/* One VMM, handed over: its connection, userfaultfd, memory file, region and our second mapping. */
struct vmm {
	int uffd, memfd;
	struct region r;
	char *shadow;
	size_t shadow_size;
};

/* Listen on sock_path, accept one VMM, take its handshake and map its memory. The socket file is
 * removed once the VMM is connected. Does not write the "ready" line. */
static struct vmm accept_vmm(const char *sock_path)
{
	static char body[MAX_BODY];
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct vmm v;
	struct stat st;
	int lsock;

	if (strlen(sock_path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "%s: socket path too long\n", prog);
		exit(2);
	}
	strcpy(sa.sun_path, sock_path);
	lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
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

	recv_handshake(body, &v.r, &v.uffd, &v.memfd);
	if (!uffd_initialized(v.uffd))
		uffd_setup(v.uffd, &v.r);
	/* The second mapping: not registered with any uffd, so writing through it never faults
	 * to us; it just puts the page in the memfd's page cache for UFFDIO_CONTINUE to map. */
	if (fstat(v.memfd, &st) < 0)
		die("fstat memfd");
	if (v.r.offset + v.r.size > (uint64_t)st.st_size)
		refuse("region lies beyond the end of the memfd");
	v.shadow_size = (size_t)st.st_size;
	v.shadow = mmap(NULL, v.shadow_size, PROT_READ | PROT_WRITE, MAP_SHARED, v.memfd, 0);
	if (v.shadow == MAP_FAILED)
		die("mmap memfd");
	return v;
}

/* Write one line to the VMM ("ready", "complete"). */
static void tell_vmm(const char *line)
{
	size_t n = strlen(line);
	if (write(conn, line, n) != (ssize_t)n)
		die("write to the VMM");
}

#endif
