/*
 * peer_floor: the C floor that uffdd's post-copy over TCP is measured against.
 *
 * Three modes, each the least work its job allows:
 *
 *   serve   --image FILE [--port N]
 *           A page server: per connection (one process each), read requests of 12 bytes
 *           (u64 offset, u32 length, little endian) and answer each with exactly those bytes of
 *           the image, by sendfile(2). Prints the port it listens on.
 *   handle  --socket PATH --server HOST:PORT [--install CHUNK] [--inflight N]
 *           A page-fault handler for one VMM (the handshake of docs/handshake.md, one region):
 *           reads up to 64 fault messages, sends one request per page not yet asked for (one
 *           write for the batch), receives each answer with recv() straight into the second
 *           mapping of the guest memory, and maps it with UFFDIO_CONTINUE. With --install it
 *           first fetches the whole region in CHUNK-byte requests, N in flight, maps each, and
 *           tells the VMM {"event":"complete"}.
 *   stream  --server HOST:PORT --size BYTES
 *           A raw TCP stream of the image's first BYTES into a fresh memfd mapping (one request);
 *           prints {"mb_s": ...}.
 *
 * Build: make (scripts/bench/Makefile). No checksums, no authentication, no recovery: a floor.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/sendfile.h>
#include <sys/wait.h>
#include <time.h>

#include "vmm.h"

struct req {
	uint64_t offset;
	uint32_t length;
} __attribute__((packed));

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void read_exactly(int fd, void *buf, size_t len)
{
	size_t got = 0;
	while (got < len) {
		ssize_t n = recv(fd, (char *)buf + got, len - got, MSG_WAITALL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("recv");
		if (n == 0) {
			fprintf(stderr, "%s: the page server closed the connection\n", prog);
			exit(2);
		}
		got += (size_t)n;
	}
}

static void write_all(int fd, const void *buf, size_t len)
{
	size_t done = 0;
	while (done < len) {
		ssize_t n = send(fd, (const char *)buf + done, len - done, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("send");
		done += (size_t)n;
	}
}

/* --- serve ------------------------------------------------------------------------------ */

static void serve_connection(int c, int image)
{
	struct req q;
	int one = 1;

	setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	for (;;) {
		ssize_t n = recv(c, &q, sizeof(q), MSG_WAITALL);
		if (n <= 0)
			break;
		if (n != sizeof(q))
			break;
		off_t off = (off_t)q.offset;
		size_t left = q.length;
		while (left) {
			ssize_t s = sendfile(c, image, &off, left);
			if (s < 0 && errno == EINTR)
				continue;
			if (s <= 0)
				_exit(s < 0 ? 2 : 0);
			left -= (size_t)s;
		}
	}
	_exit(0);
}

static __attribute__((noreturn)) void cmd_serve(const char *image_path, int port)
{
	int image = open(image_path, O_RDONLY | O_CLOEXEC), one = 1;
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(sa);
	int ls;

	if (image < 0)
		die(image_path);
	signal(SIGCHLD, SIG_IGN); /* children are reaped by the kernel */
	ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0)
		die("socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 64) < 0)
		die("bind");
	getsockname(ls, (struct sockaddr *)&sa, &len);
	printf("%d\n", ntohs(sa.sin_port));
	fflush(stdout);
	for (;;) {
		int c = accept4(ls, NULL, NULL, 0);
		if (c < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		if (fork() == 0) {
			close(ls);
			serve_connection(c, image);
		}
		close(c);
	}
}

/* --- handle ------------------------------------------------------------------------------ */

static int connect_server(const char *hostport)
{
	char host[256];
	const char *colon = strrchr(hostport, ':');
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM }, *res;
	int fd, one = 1;

	if (!colon || (size_t)(colon - hostport) >= sizeof(host)) {
		fprintf(stderr, "%s: --server wants HOST:PORT\n", prog);
		exit(2);
	}
	memcpy(host, hostport, (size_t)(colon - hostport));
	host[colon - hostport] = '\0';
	if (getaddrinfo(host, colon + 1, &hints, &res) != 0) {
		fprintf(stderr, "%s: cannot resolve %s\n", prog, hostport);
		exit(2);
	}
	fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) < 0)
		die("connect to the page server");
	freeaddrinfo(res);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

/* Fetch the whole region, chunk by chunk, `inflight` requests ahead, mapping each as it lands. */
static void install_all(const struct vmm *v, int srv, uint64_t chunk, unsigned inflight, uint8_t *filled)
{
	const struct region *r = &v->r;
	uint64_t sent = 0, got = 0, ps = r->page_size;

	while (got < r->size) {
		while (sent < r->size && sent - got < chunk * inflight) {
			uint64_t n = r->size - sent < chunk ? r->size - sent : chunk;
			struct req q = { r->offset + sent, (uint32_t)n };
			write_all(srv, &q, sizeof(q));
			sent += n;
		}
		uint64_t n = r->size - got < chunk ? r->size - got : chunk;
		read_exactly(srv, v->shadow + r->offset + got, n);
		map_page(v->uffd, r->base + got, n);
		memset(filled + got / ps, 1, n / ps);
		got += n;
	}
}

/* Serve one batch of faults: one request per page not yet asked for, answers in order. */
static int serve_faults(const struct vmm *v, int srv, uint8_t *filled, struct uffd_msg *msgs, size_t n)
{
	const struct region *r = &v->r;
	uint64_t ps = r->page_size, pages[MSGS_PER_READ];
	struct req reqs[MSGS_PER_READ];
	size_t k = 0;

	for (size_t i = 0; i < n; i++) {
		uint64_t addr = msgs[i].arg.pagefault.address & ~(ps - 1), idx;
		if (msgs[i].event != UFFD_EVENT_PAGEFAULT || addr < r->base || addr >= r->base + r->size)
			continue;
		idx = (addr - r->base) / ps;
		if (filled[idx]) {
			if (!map_page(v->uffd, addr, ps)) /* a stale message: EEXIST, wake */
				return 0;
			continue;
		}
		filled[idx] = 1;
		pages[k] = idx;
		reqs[k++] = (struct req){ r->offset + idx * ps, (uint32_t)ps };
	}
	if (!k)
		return 1;
	write_all(srv, reqs, k * sizeof(reqs[0]));
	for (size_t j = 0; j < k; j++) {
		read_exactly(srv, v->shadow + r->offset + pages[j] * ps, ps);
		if (!map_page(v->uffd, r->base + pages[j] * ps, ps))
			return 0;
	}
	return 1;
}

static int cmd_handle(const char *sock_path, const char *server, uint64_t install, unsigned inflight)
{
	struct vmm v = accept_vmm(sock_path);
	int srv = connect_server(server);
	uint8_t *filled = calloc(v.r.size / v.r.page_size, 1);
	struct pollfd pfd[2] = { { .fd = v.uffd, .events = POLLIN }, { .fd = conn, .events = POLLIN | POLLRDHUP } };

	if (!filled)
		die("calloc");
	tell_vmm("{\"status\":\"ready\"}\n");
	if (install) {
		uint64_t t0 = now_ns();
		char line[160];
		install_all(&v, srv, install, inflight, filled);
		snprintf(line, sizeof(line), "{\"event\":\"complete\",\"install_ns\":%" PRIu64 "}\n", now_ns() - t0);
		tell_vmm(line);
	}
	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pfd[0].revents & POLLIN) {
			struct uffd_msg msgs[MSGS_PER_READ];
			ssize_t n = read(v.uffd, msgs, sizeof(msgs));
			if (n < 0 && errno != EAGAIN && errno != EINTR)
				die("read uffd");
			if (n > 0 && !serve_faults(&v, srv, filled, msgs, (size_t)n / sizeof(msgs[0])))
				break;
		}
		if (pfd[1].revents & (POLLIN | POLLRDHUP | POLLHUP | POLLERR)) {
			char buf[256];
			ssize_t n = read(conn, buf, sizeof(buf));
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break;
		}
	}
	return 0;
}

/* --- stream ------------------------------------------------------------------------------ */

static int cmd_stream(const char *server, uint64_t size)
{
	int srv = connect_server(server), memfd = memfd_create("floor-stream", MFD_CLOEXEC);
	struct req q = { 0, (uint32_t)size };
	char *mem;
	uint64_t t0;

	if (size > UINT32_MAX) {
		fprintf(stderr, "%s: --size must be below 4 GiB\n", prog);
		return 2;
	}
	if (memfd < 0 || ftruncate(memfd, (off_t)size) < 0)
		die("memfd");
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	t0 = now_ns();
	write_all(srv, &q, sizeof(q));
	read_exactly(srv, mem, size);
	printf("{\"mb_s\":%.1f}\n", (double)size / ((double)(now_ns() - t0) / 1e9) / 1e6);
	return 0;
}

static void usage(void)
{
	fprintf(stderr, "usage: peer_floor serve --image FILE [--port N]\n"
			"       peer_floor handle --socket PATH --server HOST:PORT [--install CHUNK] [--inflight N]\n"
			"       peer_floor stream --server HOST:PORT --size BYTES\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "image", required_argument, NULL, 'i' },   { "port", required_argument, NULL, 'p' },
		{ "socket", required_argument, NULL, 's' },  { "server", required_argument, NULL, 'S' },
		{ "install", required_argument, NULL, 'I' }, { "inflight", required_argument, NULL, 'n' },
		{ "size", required_argument, NULL, 'z' },    { NULL, 0, NULL, 0 },
	};
	const char *image = NULL, *sock = NULL, *server = NULL;
	uint64_t install = 0, size = 0;
	unsigned inflight = 4;
	int port = 0, opt;

	prog = "peer_floor";
	if (argc < 2)
		usage();
	optind = 2;
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'i': image = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 's': sock = optarg; break;
		case 'S': server = optarg; break;
		case 'I': install = strtoull(optarg, NULL, 0); break;
		case 'n': inflight = (unsigned)atoi(optarg); break;
		case 'z': size = strtoull(optarg, NULL, 0); break;
		default: usage();
		}
	}
	if (!strcmp(argv[1], "serve") && image)
		cmd_serve(image, port);
	if (!strcmp(argv[1], "handle") && sock && server)
		return cmd_handle(sock, server, install, inflight ? inflight : 1);
	if (!strcmp(argv[1], "stream") && server && size)
		return cmd_stream(server, size);
	usage();
	return 2;
}
