/*
 * A small program over uffdd/csrc/wire.h for tests/test_wire.py, built as a C fast path would
 * build it (with or without -DWIRE_PORTABLE).
 *
 *   wire_check KEY_HEX NONCE_HEX [CUT...] < data
 *
 * prints the crc32c of the data, its AEAD tag with the data as the AAD cut into pieces at the
 * given offsets, and whether wire_aead_verify() takes that tag and refuses it with a bit flipped.
 */
#include <stdio.h>
#include <stdlib.h>

#include "wire.h"

#define MAX_DATA (1 << 20)
#define MAX_CUTS 64

static int parse_hex(const char *s, uint8_t *out, size_t n)
{
	if (strlen(s) != 2 * n)
		return -1;
	for (size_t i = 0; i < n; i++)
		if (sscanf(s + 2 * i, "%2hhx", &out[i]) != 1)
			return -1;
	return 0;
}

int main(int argc, char **argv)
{
	static uint8_t data[MAX_DATA];
	struct iovec iov[MAX_CUTS + 1];
	uint8_t key[WIRE_KEY_SIZE], nonce[WIRE_NONCE_SIZE], tag[WIRE_TAG_SIZE];
	size_t len, start = 0;
	int n = 0, good, bad;

	if (argc < 3 || argc - 3 > MAX_CUTS || parse_hex(argv[1], key, sizeof(key)) ||
	    parse_hex(argv[2], nonce, sizeof(nonce))) {
		fprintf(stderr, "usage: wire_check KEY_HEX NONCE_HEX [CUT...] < data\n");
		return 2;
	}
	len = fread(data, 1, sizeof(data), stdin);
	for (int i = 3; i <= argc; i++) {
		size_t end = i < argc ? strtoul(argv[i], NULL, 10) : len;

		if (end < start || end > len) {
			fprintf(stderr, "cut %zu is out of order or past the data\n", end);
			return 2;
		}
		iov[n].iov_base = data + start;
		iov[n].iov_len = end - start;
		n++;
		start = end;
	}
	wire_aead_tag(key, nonce, iov, n, tag);
	good = wire_aead_verify(key, nonce, iov, n, tag);
	tag[len % WIRE_TAG_SIZE] ^= 0x80;
	bad = wire_aead_verify(key, nonce, iov, n, tag);
	tag[len % WIRE_TAG_SIZE] ^= 0x80;
	printf("crc32c %08x\ntag ", wire_crc32c(0, data, len));
	for (int i = 0; i < WIRE_TAG_SIZE; i++)
		printf("%02x", tag[i]);
	printf("\nverify %d %d\n", good, bad);
	return 0;
}
