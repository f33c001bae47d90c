/*
 * link_api.h: how a C owner (the fault path, uffdd/core/_fastpath.c) uses a peer link
 * (uffdd/peer/_native.c) without going through Python. The link publishes this table in a
 * capsule (its `api` attribute); the owner takes it once.
 *
 * An owner request asks for `count` 4 KiB blocks at `offset` of the image, to be written at
 * `dest` (guest memory: written with a SIGBUS-guarded copy, and only once every block's crc32c
 * and, on an authenticated link, the frame's tag have been checked). When it is over, the link
 * calls the owner's sink from inside Link.receive(): status 0, the bytes are at dest; status
 * LINK_GONE, dest could not be written (the memory file shrank); a positive status, the server's
 * error code (the request is over, nothing was written); LINK_CHECKSUM, the blocks kept failing
 * their crc32c; LINK_UNAVAILABLE, the peer has been unreachable past its deadline (submit then
 * refuses new requests until the next connection). A request survives a broken connection: it
 * is sent again on the next one.
 */
#ifndef UFFDD_CSRC_LINK_API_H
#define UFFDD_CSRC_LINK_API_H

#include <stdint.h>

#define LINK_API_CAPSULE "uffdd.peer._native.link_api"
#define LINK_API_VERSION 1

enum { LINK_OK = 0, LINK_GONE = -1, LINK_CHECKSUM = -2, LINK_UNAVAILABLE = -3 };

typedef void (*link_sink_fn)(void *owner, uint64_t cookie, int status);

struct link_api {
	int version;
	/* Register the owner (one per link) and its sink; owner NULL drops every owner request
	 * (nothing is written to their destinations afterwards). */
	void (*set_owner)(void *link, void *owner, link_sink_fn sink);
	/* Queue a request; 0, or -1 when the link cannot take more (the owner falls back). */
	int (*submit)(void *link, uint64_t offset, uint32_t count, char *dest, uint64_t cookie);
	/* Write what is queued; 0, or -1 when the link is down (requests wait for the next one). */
	int (*flush)(void *link);
};

#endif
