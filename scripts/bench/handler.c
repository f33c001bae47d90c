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
#include <getopt.h>
#include <poll.h>

#include "vmm.h"

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

	struct vmm v = accept_vmm(sock_path);
	struct region r = v.r;
	int uffd = v.uffd, memfd = v.memfd;
	char *shadow = v.shadow;
	uint64_t block = fault_around / r.page_size;
	uint8_t *filled = block > 1 ? calloc(r.size / r.page_size, 1) : NULL;
	if (block > 1 && !filled)
		die("calloc");

	tell_vmm("{\"status\":\"ready\"}\n");

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
	munmap(shadow, v.shadow_size);
	close(conn);
	close(uffd);
	close(memfd);
	close(snap);
	return 0;
}
