/*
 * guest: a stand-in VMM for fault-throughput benchmarks.
 *
 * It creates shared guest memory (a memfd), a userfaultfd covering it, hands both to a
 * page-fault handler over a Unix socket exactly as Firecracker does (one sendmsg, JSON body,
 * SCM_RIGHTS [uffd, memfd]), waits for the handler's ready line, then lets N threads first-touch
 * every page in a shuffled order. Each first touch is a userfault the handler must resolve.
 * Afterwards every page is compared with the snapshot file the handler serves from.
 *
 * Build:  gcc -O2 -Wall -Wextra -pthread -o build/guest guest.c   (or: make)
 * Usage:  guest --socket PATH --snapshot FILE --size BYTES --threads N
 *               [--page-size 4096|2097152] [--seed S] [--bare] [--idle]
 *   --bare  hand over a userfaultfd without UFFDIO_API/REGISTER; the handler must do both.
 *   --idle  touch nothing: wait for the handler's {"event":"complete"} line (every page installed
 *           in the background), then check every page. elapsed_s is then ready -> complete.
 *
 * Output: one JSON line on stdout
 *   {"pages":P,"threads":N,"elapsed_s":T,"faults_per_s":F,"p50_us":..,"p99_us":..,"max_us":..,
 *    "wrong_pages":W,"first_touch_ns":A,"last_touch_ns":B}
 *   (A and B are CLOCK_MONOTONIC, the same clock in every process: concurrent guests' touching
 *   phases can be lined up.)
 * Exit status: 0 if every page matches the snapshot, 1 if some do not, 2 on any other failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26) /* log2(2 MiB) << MFD_HUGE_SHIFT, from linux/memfd.h */
#endif

#define HUGE_2M ((size_t)2 << 20)

static void die(const char *what)
{
	fprintf(stderr, "guest: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void fail(const char *msg)
{
	fprintf(stderr, "guest: %s\n", msg);
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* splitmix64: tiny, seedable, good enough for a reproducible shuffle. */
static uint64_t rng_next(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

struct worker {
	pthread_t tid;
	pthread_barrier_t *start;
	volatile char *mem;
	size_t page_size;
	const uint32_t *pages; /* the whole shuffled permutation */
	size_t first, stride, count; /* this thread's interleaved share of it */
	uint64_t *lat_ns;            /* count entries */
	uint64_t t_start, t_end;
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	/* Release all threads together so the wall time measures concurrent faulting. */
	pthread_barrier_wait(w->start);
	w->t_start = now_ns();
	for (size_t k = 0; k < w->count; k++) {
		size_t page = w->pages[w->first + k * w->stride];
		volatile uint64_t *p = (volatile uint64_t *)(w->mem + page * w->page_size);
		uint64_t t0 = now_ns();

		(void)*p; /* the first touch: blocks until the handler resolves the fault */
		w->lat_ns[k] = now_ns() - t0;
	}
	w->t_end = now_ns();
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, in microseconds. */
static double percentile_us(const uint64_t *sorted, size_t n, double pct)
{
	size_t rank = (size_t)((pct / 100.0) * (double)n + 0.999999);

	if (rank < 1)
		rank = 1;
	if (rank > n)
		rank = n;
	return (double)sorted[rank - 1] / 1000.0;
}

static int connect_retry(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };

	if (strlen(path) >= sizeof(sa.sun_path))
		fail("socket path too long");
	strcpy(sa.sun_path, path);
	/* The handler may still be starting up when a benchmark script launches us: wait ~5 s. */
	for (int attempt = 0;; attempt++) {
		int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
			return fd;
		if ((errno != ENOENT && errno != ECONNREFUSED) || attempt >= 500)
			die("connect");
		close(fd);
		usleep(10000);
	}
}

static void send_handshake(int sock, const char *body, int uffd, int memfd)
{
	int fds[2] = { uffd, memfd };
	union {
		char buf[CMSG_SPACE(sizeof(fds))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = (void *)body, .iov_len = strlen(body) };
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = ctl.buf,
		.msg_controllen = sizeof(ctl.buf),
	};
	struct cmsghdr *cm;
	ssize_t n;

	memset(ctl.buf, 0, sizeof(ctl.buf));
	cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(cm), fds, sizeof(fds));

	n = sendmsg(sock, &msg, MSG_NOSIGNAL);
	if (n < 0)
		die("sendmsg");
	if ((size_t)n != iov.iov_len)
		fail("sendmsg: short write of the handshake");
}

/* Read the handler's first line; refuse to run the workload unless it reports ready. */
static void wait_ready(int sock)
{
	char line[4096];
	size_t len = 0;

	for (;;) {
		ssize_t n;

		if (len == sizeof(line) - 1)
			fail("handler's first line is too long");
		n = read(sock, line + len, sizeof(line) - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("read from handler");
		if (n == 0)
			fail("handler closed the connection before it was ready");
		len += (size_t)n;
		line[len] = '\0';
		if (strchr(line, '\n'))
			break;
	}
	*strchr(line, '\n') = '\0';
	if (strstr(line, "\"error\"")) {
		fprintf(stderr, "guest: handler refused the handshake: %s\n", line);
		exit(2);
	}
	if (!strstr(line, "\"ready\""))
		fprintf(stderr, "guest: unexpected first line from handler (continuing): %s\n", line);
}

/* --idle: read the handler's lines until the one that says every page is in place. */
static void wait_complete(int sock)
{
	char line[4096];
	size_t len = 0;

	for (;;) {
		ssize_t n = read(sock, line + len, sizeof(line) - 1 - len);
		char *nl;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail("handler hung up before the guest was complete");
		len += (size_t)n;
		line[len] = '\0';
		while ((nl = strchr(line, '\n'))) {
			*nl = '\0';
			if (strstr(line, "\"complete\""))
				return;
			len -= (size_t)(nl + 1 - line);
			memmove(line, nl + 1, len + 1);
		}
		if (len == sizeof(line) - 1)
			len = 0;
	}
}

struct watchdog {
	pthread_t tid;
	int sock, stop_rd;
};

/* Our own copy of the uffd keeps the faulting threads parked forever if the handler dies, so
 * a hang-up during the workload must end the run instead of hanging the benchmark. */
static void *watchdog_main(void *arg)
{
	struct watchdog *wd = arg;
	struct pollfd pfd[2] = {
		{ .fd = wd->sock, .events = POLLIN | POLLRDHUP },
		{ .fd = wd->stop_rd, .events = POLLIN },
	};

	for (;;) {
		char buf[256];
		ssize_t n;

		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (pfd[1].revents)
			return NULL;
		if (!pfd[0].revents)
			continue;
		n = read(wd->sock, buf, sizeof(buf));
		if (n > 0 || (n < 0 && (errno == EINTR || errno == EAGAIN)))
			continue; /* nothing more is expected from the handler; ignore it */
		fprintf(stderr, "guest: handler hung up during the workload; faults cannot be served\n");
		_exit(2);
	}
}

static void usage(void)
{
	fprintf(stderr,
		"usage: guest --socket PATH --snapshot FILE --size BYTES --threads N\n"
		"             [--page-size 4096|2097152] [--seed S] [--bare] [--idle]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "snapshot", required_argument, NULL, 'f' },
		{ "size", required_argument, NULL, 'z' },
		{ "threads", required_argument, NULL, 't' },
		{ "page-size", required_argument, NULL, 'p' },
		{ "seed", required_argument, NULL, 'r' },
		{ "bare", no_argument, NULL, 'b' },
		{ "idle", no_argument, NULL, 'i' },
		{ NULL, 0, NULL, 0 },
	};
	const char *sock_path = NULL, *snap_path = NULL;
	size_t size = 0, page_size = 4096, nthreads = 0;
	uint64_t seed = 1;
	int bare = 0, idle = 0, opt;

	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 's': sock_path = optarg; break;
		case 'f': snap_path = optarg; break;
		case 'z': size = strtoull(optarg, NULL, 0); break;
		case 't': nthreads = strtoull(optarg, NULL, 0); break;
		case 'p': page_size = strtoull(optarg, NULL, 0); break;
		case 'r': seed = strtoull(optarg, NULL, 0); break;
		case 'b': bare = 1; break;
		case 'i': idle = 1; break;
		default: usage();
		}
	}
	if (!sock_path || !snap_path || size == 0 || nthreads == 0 || optind != argc)
		usage();
	if (page_size != 4096 && page_size != HUGE_2M)
		fail("--page-size must be 4096 or 2097152");
	if (page_size == 4096 && (size_t)sysconf(_SC_PAGESIZE) != 4096)
		fail("this machine's base page size is not 4096");
	if (size % page_size)
		fail("--size must be a multiple of --page-size");
	size_t npages = size / page_size;
	if (npages > UINT32_MAX)
		fail("--size is too large");
	if (nthreads > npages)
		nthreads = npages;

	int snap = open(snap_path, O_RDONLY | O_CLOEXEC);
	if (snap < 0)
		die(snap_path);

	/* Guest memory: shared so that the handler's second mapping fills the same page cache. */
	unsigned int mfd_flags = MFD_CLOEXEC;
	if (page_size == HUGE_2M)
		mfd_flags |= MFD_HUGETLB | MFD_HUGE_2MB;
	int memfd = memfd_create("guest", mfd_flags);
	if (memfd < 0)
		die("memfd_create");
	if (ftruncate(memfd, (off_t)size) < 0)
		die("ftruncate");
	char *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory (for 2 MiB pages: are huge pages reserved in "
		    "/proc/sys/vm/nr_hugepages?)");

	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");
	if (!bare) {
		/* Pre-register as Firecracker does. MISSING too: never-written pages are not minor. */
		struct uffdio_api api = {
			.api = UFFD_API,
			.features = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_MINOR_HUGETLBFS,
		};
		if (ioctl(uffd, UFFDIO_API, &api) < 0)
			die("UFFDIO_API");
		struct uffdio_register reg = {
			.range = { .start = (uintptr_t)mem, .len = size },
			.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR,
		};
		if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
			die("UFFDIO_REGISTER");
	}

	char body[512];
	snprintf(body, sizeof(body),
		 "{\"vm_id\":\"bench\",\"regions\":[{\"base_host_virt_addr\":%" PRIuPTR
		 ",\"size\":%zu,\"offset\":0,\"page_size\":%zu}]}",
		 (uintptr_t)mem, size, page_size);
	int sock = connect_retry(sock_path);
	send_handshake(sock, body, uffd, memfd);
	wait_ready(sock);

	/* Deterministic Fisher-Yates shuffle of all page numbers. */
	uint32_t *pages = malloc(npages * sizeof(*pages));
	if (!pages)
		fail("out of memory");
	for (size_t i = 0; i < npages; i++)
		pages[i] = (uint32_t)i;
	uint64_t rng = seed;
	for (size_t i = npages - 1; i > 0; i--) {
		size_t j = (size_t)(rng_next(&rng) % (i + 1));
		uint32_t tmp = pages[i];
		pages[i] = pages[j];
		pages[j] = tmp;
	}

	struct worker *workers = calloc(nthreads, sizeof(*workers));
	uint64_t *lat = calloc(npages, sizeof(*lat));
	uint64_t t_first = UINT64_MAX, t_last = 0;
	if (!workers || !lat)
		fail("out of memory");
	if (idle) {
		t_first = now_ns();
		wait_complete(sock);
		t_last = now_ns();
	} else {
		pthread_barrier_t start;
		struct watchdog wd = { .sock = sock };
		int stop[2];
		if (pipe2(stop, O_CLOEXEC) < 0)
			die("pipe");
		wd.stop_rd = stop[0];
		errno = pthread_create(&wd.tid, NULL, watchdog_main, &wd);
		if (errno)
			die("pthread_create");

		pthread_barrier_init(&start, NULL, (unsigned int)nthreads);
		/* Thread t takes permutation entries t, t+N, t+2N...; latencies go to a private slice. */
		size_t lat_off = 0;
		for (size_t t = 0; t < nthreads; t++) {
			struct worker *w = &workers[t];

			w->start = &start;
			w->mem = mem;
			w->page_size = page_size;
			w->pages = pages;
			w->first = t;
			w->stride = nthreads;
			w->count = (npages - t + nthreads - 1) / nthreads;
			w->lat_ns = lat + lat_off;
			lat_off += w->count;
			errno = pthread_create(&w->tid, NULL, worker_main, w);
			if (errno)
				die("pthread_create");
		}
		for (size_t t = 0; t < nthreads; t++) {
			pthread_join(workers[t].tid, NULL);
			if (workers[t].t_start < t_first)
				t_first = workers[t].t_start;
			if (workers[t].t_end > t_last)
				t_last = workers[t].t_end;
		}
		pthread_barrier_destroy(&start);
		if (write(stop[1], "", 1) != 1)
			die("write");
		pthread_join(wd.tid, NULL);
		close(stop[0]);
		close(stop[1]);
	}
	double elapsed = (double)(t_last - t_first) / 1e9;

	/* Every page is mapped by now, so this reads guest memory without faulting. */
	char *expect = malloc(page_size);
	size_t wrong = 0;
	if (!expect)
		fail("out of memory");
	for (size_t i = 0; i < npages; i++) {
		off_t off = (off_t)(i * page_size);
		size_t got = 0;

		while (got < page_size) {
			ssize_t n = pread(snap, expect + got, page_size - got, off + (off_t)got);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				die("pread snapshot");
			if (n == 0)
				break;
			got += (size_t)n;
		}
		/* Past the end of the snapshot a handler leaves the fresh page's zeros. */
		memset(expect + got, 0, page_size - got);
		if (memcmp(expect, mem + i * page_size, page_size) != 0)
			wrong++;
	}

	qsort(lat, npages, sizeof(*lat), cmp_u64);
	printf("{\"pages\":%zu,\"threads\":%zu,\"elapsed_s\":%.6f,\"faults_per_s\":%.1f,"
	       "\"p50_us\":%.2f,\"p99_us\":%.2f,\"max_us\":%.2f,\"wrong_pages\":%zu,"
	       "\"first_touch_ns\":%" PRIu64 ",\"last_touch_ns\":%" PRIu64 "}\n",
	       npages, idle ? 0 : nthreads, elapsed, elapsed > 0 ? (double)npages / elapsed : 0.0,
	       percentile_us(lat, npages, 50), percentile_us(lat, npages, 99), (double)lat[npages - 1] / 1000.0,
	       wrong, t_first, t_last);
	fflush(stdout);

	/* Closing the connection is the end-of-session signal for the handler. */
	close(sock);
	munmap(mem, size);
	close(uffd);
	close(memfd);
	close(snap);
	free(expect);
	free(lat);
	free(workers);
	free(pages);
	return wrong == 0 ? 0 : 1;
}
