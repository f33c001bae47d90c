/*
 * uffdd.peer._wire: the peer protocol's crc32c and frame tags (uffdd/csrc/wire.h) from Python.
 *
 * The same code the C fast paths use, so Python can test it against the reference packages
 * (crc32c, cryptography) and use it where it is faster. Calls on 64 KiB or more release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>

#include "wire.h"

#define BLOCK 4096
#define RELEASE_GIL_AT (64 * 1024)
/* aead_tag/aead_verify take this many AAD pieces without allocating. */
#define STACK_PARTS 8

static int get_buffer(PyObject *obj, Py_buffer *view, const char *fn, const char *what)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) == 0)
		return 0;
	if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
		PyErr_Clear();
		PyErr_Format(PyExc_TypeError, "%s: %s must be a contiguous bytes-like object, not %.100s", fn,
			     what, Py_TYPE(obj)->tp_name);
	}
	return -1;
}

/* A buffer of exactly n bytes (key, nonce, tag). */
static int get_sized(PyObject *obj, Py_buffer *view, Py_ssize_t n, const char *fn, const char *what)
{
	if (get_buffer(obj, view, fn, what) < 0)
		return -1;
	if (view->len != n) {
		PyErr_Format(PyExc_ValueError, "%s: %s must be %zd bytes, got %zd", fn, what, n, view->len);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

/* crc32c(data, /, value=0) -> int */
static PyObject *py_crc32c(PyObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
	Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
	PyObject *value_obj = NULL;
	unsigned long long value = 0;
	Py_buffer data;
	uint32_t crc;

	(void)self;
	if (nargs < 1 || nargs + nkw > 2) {
		PyErr_SetString(PyExc_TypeError, "crc32c(data, /, value=0) takes data and an optional value");
		return NULL;
	}
	if (nargs == 2)
		value_obj = args[1];
	if (nkw) {
		PyObject *name = PyTuple_GET_ITEM(kwnames, 0);

		if (!PyUnicode_Check(name) || PyUnicode_CompareWithASCIIString(name, "value") != 0)
			return PyErr_Format(PyExc_TypeError, "crc32c: unexpected keyword argument %R", name);
		value_obj = args[nargs];
	}
	if (value_obj) {
		if (!PyLong_Check(value_obj))
			return PyErr_Format(PyExc_TypeError, "crc32c: value must be an int, not %.100s",
					    Py_TYPE(value_obj)->tp_name);
		value = PyLong_AsUnsignedLongLong(value_obj);
		if (PyErr_Occurred()) /* negative or too large */
			PyErr_Clear();
		if (value > UINT32_MAX)
			return PyErr_Format(PyExc_ValueError, "crc32c: value must be a crc32c (0 <= value < 2**32), got %R",
					    value_obj);
	}
	if (get_buffer(args[0], &data, "crc32c", "data") < 0)
		return NULL;
	if (data.len >= RELEASE_GIL_AT) {
		Py_BEGIN_ALLOW_THREADS
		crc = wire_crc32c((uint32_t)value, data.buf, (size_t)data.len);
		Py_END_ALLOW_THREADS
	} else {
		crc = wire_crc32c((uint32_t)value, data.buf, (size_t)data.len);
	}
	PyBuffer_Release(&data);
	return PyLong_FromUnsignedLong(crc);
}

/* The data of whole 4096-byte blocks, or an error that says why not. */
static int get_blocks(PyObject *obj, Py_buffer *view, const char *fn)
{
	if (get_buffer(obj, view, fn, "data") < 0)
		return -1;
	if (view->len % BLOCK) {
		PyErr_Format(PyExc_ValueError, "%s: data length %zd is not a multiple of %d", fn, view->len, BLOCK);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

static void crc_blocks(const uint8_t *p, size_t nblocks, uint8_t *out)
{
	for (size_t i = 0; i < nblocks; i++)
		wire_store_le32(out + 4 * i, wire_crc32c(0, p + i * BLOCK, BLOCK));
}

/* crc32c_blocks(data, /) -> bytes: le32 crc32c of each 4096-byte block. */
static PyObject *py_crc32c_blocks(PyObject *self, PyObject *arg)
{
	Py_buffer data;
	PyObject *out;
	size_t n;

	(void)self;
	if (get_blocks(arg, &data, "crc32c_blocks") < 0)
		return NULL;
	n = (size_t)data.len / BLOCK;
	out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(4 * n));
	if (out) {
		uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);

		if (data.len >= RELEASE_GIL_AT) {
			Py_BEGIN_ALLOW_THREADS
			crc_blocks(data.buf, n, dst);
			Py_END_ALLOW_THREADS
		} else {
			crc_blocks(data.buf, n, dst);
		}
	}
	PyBuffer_Release(&data);
	return out;
}

static Py_ssize_t first_bad_block(const uint8_t *p, size_t nblocks, const uint8_t *expected)
{
	for (size_t i = 0; i < nblocks; i++)
		if (wire_crc32c(0, p + i * BLOCK, BLOCK) != wire_load_le32(expected + 4 * i))
			return (Py_ssize_t)i;
	return -1;
}

/* check_blocks(data, expected, /) -> int: the first block whose crc32c is not expected's, or -1. */
static PyObject *py_check_blocks(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer data, expected;
	Py_ssize_t bad;
	size_t n;

	(void)self;
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "check_blocks(data, expected, /) takes 2 arguments");
		return NULL;
	}
	if (get_blocks(args[0], &data, "check_blocks") < 0)
		return NULL;
	n = (size_t)data.len / BLOCK;
	if (get_sized(args[1], &expected, (Py_ssize_t)(4 * n), "check_blocks", "expected (a le32 crc32c per block)")) {
		PyBuffer_Release(&data);
		return NULL;
	}
	if (data.len >= RELEASE_GIL_AT) {
		Py_BEGIN_ALLOW_THREADS
		bad = first_bad_block(data.buf, n, expected.buf);
		Py_END_ALLOW_THREADS
	} else {
		bad = first_bad_block(data.buf, n, expected.buf);
	}
	PyBuffer_Release(&data);
	PyBuffer_Release(&expected);
	return PyLong_FromSsize_t(bad);
}

/* The AAD pieces of an aead call as iovecs (views[] holds what to release). */
struct aad {
	Py_buffer stack_views[STACK_PARTS];
	struct iovec stack_iov[STACK_PARTS];
	Py_buffer *views;
	struct iovec *iov;
	int count;
	size_t total;
};

static void aad_release(struct aad *a)
{
	for (int i = 0; i < a->count; i++)
		PyBuffer_Release(&a->views[i]);
	if (a->views != a->stack_views) {
		PyMem_Free(a->views);
		PyMem_Free(a->iov);
	}
	a->count = 0;
}

static int aad_get(struct aad *a, PyObject *const *parts, Py_ssize_t n, const char *fn)
{
	a->views = a->stack_views;
	a->iov = a->stack_iov;
	a->count = 0;
	a->total = 0;
	if (n > INT_MAX) {
		PyErr_Format(PyExc_ValueError, "%s: too many AAD parts (%zd)", fn, n);
		return -1;
	}
	if (n > STACK_PARTS) {
		a->views = PyMem_New(Py_buffer, (size_t)n);
		a->iov = PyMem_New(struct iovec, (size_t)n);
		if (!a->views || !a->iov) {
			PyMem_Free(a->views);
			PyMem_Free(a->iov);
			a->views = a->stack_views;
			PyErr_NoMemory();
			return -1;
		}
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		if (get_buffer(parts[i], &a->views[i], fn, "each AAD part") < 0) {
			aad_release(a);
			return -1;
		}
		a->count++;
		a->iov[i].iov_base = a->views[i].buf;
		a->iov[i].iov_len = (size_t)a->views[i].len;
		a->total += (size_t)a->views[i].len;
	}
	return 0;
}

/* aead_tag(key, nonce, /, *parts) -> bytes: the 16-byte tag over the concatenated parts. */
static PyObject *py_aead_tag(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer key, nonce;
	struct aad aad;
	uint8_t tag[WIRE_TAG_SIZE];

	(void)self;
	if (nargs < 2) {
		PyErr_SetString(PyExc_TypeError, "aead_tag(key, nonce, /, *parts) needs a key and a nonce");
		return NULL;
	}
	if (get_sized(args[0], &key, WIRE_KEY_SIZE, "aead_tag", "key") < 0)
		return NULL;
	if (get_sized(args[1], &nonce, WIRE_NONCE_SIZE, "aead_tag", "nonce") < 0) {
		PyBuffer_Release(&key);
		return NULL;
	}
	if (aad_get(&aad, args + 2, nargs - 2, "aead_tag") < 0) {
		PyBuffer_Release(&key);
		PyBuffer_Release(&nonce);
		return NULL;
	}
	if (aad.total >= RELEASE_GIL_AT) {
		Py_BEGIN_ALLOW_THREADS
		wire_aead_tag(key.buf, nonce.buf, aad.iov, aad.count, tag);
		Py_END_ALLOW_THREADS
	} else {
		wire_aead_tag(key.buf, nonce.buf, aad.iov, aad.count, tag);
	}
	aad_release(&aad);
	PyBuffer_Release(&key);
	PyBuffer_Release(&nonce);
	return PyBytes_FromStringAndSize((const char *)tag, WIRE_TAG_SIZE);
}

/* aead_verify(key, nonce, tag, /, *parts) -> bool, comparing in constant time. */
static PyObject *py_aead_verify(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer key, nonce, tag;
	struct aad aad;
	int rc;

	(void)self;
	if (nargs < 3) {
		PyErr_SetString(PyExc_TypeError, "aead_verify(key, nonce, tag, /, *parts) needs a key, a nonce and a tag");
		return NULL;
	}
	if (get_sized(args[0], &key, WIRE_KEY_SIZE, "aead_verify", "key") < 0)
		return NULL;
	if (get_sized(args[1], &nonce, WIRE_NONCE_SIZE, "aead_verify", "nonce") < 0)
		goto no_nonce;
	if (get_sized(args[2], &tag, WIRE_TAG_SIZE, "aead_verify", "tag") < 0)
		goto no_tag;
	if (aad_get(&aad, args + 3, nargs - 3, "aead_verify") < 0)
		goto no_aad;
	if (aad.total >= RELEASE_GIL_AT) {
		Py_BEGIN_ALLOW_THREADS
		rc = wire_aead_verify(key.buf, nonce.buf, aad.iov, aad.count, tag.buf);
		Py_END_ALLOW_THREADS
	} else {
		rc = wire_aead_verify(key.buf, nonce.buf, aad.iov, aad.count, tag.buf);
	}
	aad_release(&aad);
	PyBuffer_Release(&tag);
	PyBuffer_Release(&nonce);
	PyBuffer_Release(&key);
	return PyBool_FromLong(rc == 0);
no_aad:
	PyBuffer_Release(&tag);
no_tag:
	PyBuffer_Release(&nonce);
no_nonce:
	PyBuffer_Release(&key);
	return NULL;
}

/* chacha20_block(key, counter, nonce, /) -> bytes: one 64-byte ChaCha20 block (RFC 8439 2.3). */
static PyObject *py_chacha20_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer key, nonce;
	unsigned long counter;
	uint8_t out[64];

	(void)self;
	if (nargs != 3) {
		PyErr_SetString(PyExc_TypeError, "chacha20_block(key, counter, nonce, /) takes 3 arguments");
		return NULL;
	}
	counter = PyLong_AsUnsignedLong(args[1]);
	if (PyErr_Occurred() || counter > UINT32_MAX) {
		PyErr_Clear();
		return PyErr_Format(PyExc_ValueError, "chacha20_block: counter must be an int in [0, 2**32), got %R",
				    args[1]);
	}
	if (get_sized(args[0], &key, WIRE_KEY_SIZE, "chacha20_block", "key") < 0)
		return NULL;
	if (get_sized(args[2], &nonce, WIRE_NONCE_SIZE, "chacha20_block", "nonce") < 0) {
		PyBuffer_Release(&key);
		return NULL;
	}
	wire_chacha20_block(key.buf, (uint32_t)counter, nonce.buf, out);
	PyBuffer_Release(&key);
	PyBuffer_Release(&nonce);
	return PyBytes_FromStringAndSize((const char *)out, sizeof(out));
}

/* poly1305(key, data, /) -> bytes: the one-time authenticator of RFC 8439 2.5. */
static PyObject *py_poly1305(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer key, data;
	struct wire_poly1305 st;
	uint8_t tag[16];

	(void)self;
	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "poly1305(key, data, /) takes 2 arguments");
		return NULL;
	}
	if (get_sized(args[0], &key, 32, "poly1305", "key") < 0)
		return NULL;
	if (get_buffer(args[1], &data, "poly1305", "data") < 0) {
		PyBuffer_Release(&key);
		return NULL;
	}
	wire_poly1305_init(&st, key.buf);
	wire_poly1305_update(&st, data.buf, (size_t)data.len);
	wire_poly1305_final(&st, tag);
	PyBuffer_Release(&key);
	PyBuffer_Release(&data);
	return PyBytes_FromStringAndSize((const char *)tag, sizeof(tag));
}

/* crc32c_portable(data, /) -> int: crc32c through the table path whatever the CPU has. */
static PyObject *py_crc32c_portable(PyObject *self, PyObject *arg)
{
	Py_buffer data;
	uint32_t crc;

	(void)self;
	if (get_buffer(arg, &data, "crc32c_portable", "data") < 0)
		return NULL;
	crc = wire_crc32c_portable(0, data.buf, (size_t)data.len);
	PyBuffer_Release(&data);
	return PyLong_FromUnsignedLong(crc);
}

#define FASTCALL(f) ((PyCFunction)(void (*)(void))(f))

static PyMethodDef methods[] = {
	{"crc32c", FASTCALL(py_crc32c), METH_FASTCALL | METH_KEYWORDS,
	 "crc32c(data, /, value=0) -> int: crc32c of data continuing from value (as crc32c.crc32c)."},
	{"crc32c_blocks", py_crc32c_blocks, METH_O,
	 "crc32c_blocks(data, /) -> bytes: the le32 crc32c of each 4096-byte block of data."},
	{"check_blocks", FASTCALL(py_check_blocks), METH_FASTCALL,
	 "check_blocks(data, expected, /) -> int: the first 4096-byte block whose crc32c differs, or -1."},
	{"aead_tag", FASTCALL(py_aead_tag), METH_FASTCALL,
	 "aead_tag(key, nonce, /, *parts) -> bytes: ChaCha20-Poly1305 tag, empty plaintext, AAD = the parts."},
	{"aead_verify", FASTCALL(py_aead_verify), METH_FASTCALL,
	 "aead_verify(key, nonce, tag, /, *parts) -> bool: whether tag is aead_tag(key, nonce, *parts)."},
	{"chacha20_block", FASTCALL(py_chacha20_block), METH_FASTCALL,
	 "chacha20_block(key, counter, nonce, /) -> bytes: one ChaCha20 key stream block."},
	{"poly1305", FASTCALL(py_poly1305), METH_FASTCALL,
	 "poly1305(key, data, /) -> bytes: the Poly1305 one-time authenticator."},
	{"crc32c_portable", py_crc32c_portable, METH_O,
	 "crc32c_portable(data, /) -> int: crc32c through the table path, whatever the CPU."},
	{NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *m)
{
	const char *impl = "table";

#if WIRE_X86_64
	if (wire_have_clmul)
		impl = "sse4.2+pclmul";
	else if (wire_have_crc_insn)
		impl = "sse4.2";
#endif
	if (PyModule_AddIntConstant(m, "BLOCK_SIZE", BLOCK) < 0)
		return -1;
	return PyModule_AddStringConstant(m, "CRC32C_IMPL", impl);
}

static PyModuleDef_Slot slots[] = {
	{Py_mod_exec, exec_module},
	{0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_wire", "The peer protocol's crc32c and ChaCha20-Poly1305 frame tags in C.", 0,
	methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wire(void)
{
	return PyModuleDef_Init(&module);
}
