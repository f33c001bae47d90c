/*
 * claims.h: a claim byte per page, shared by a thread that writes background pages straight into
 * guest memory (the peer's bulk link, _bulk.c; the local copier, _copier.c) and the event loop,
 * whose demand faults may take a page over. Either side changes a byte only with an atomic
 * compare-and-swap, so a page is written by exactly one of them.
 *
 *   FREE (0)   nobody has started on it;
 *   TAKEN (1)  a demand fault fetches it itself (or the guest discarded it): the thread skips it;
 *   FROZEN (2) the thread is writing it, or has written it: a fault waits for its install.
 */
#ifndef UFFDD_CLAIMS_H
#define UFFDD_CLAIMS_H

#include <stdint.h>

enum { CLAIM_FREE = 0, CLAIM_TAKEN = 1, CLAIM_FROZEN = 2 };

/* The thread: freeze a free page; 1 if it is now ours to write. */
static inline int claims_freeze(uint8_t *c)
{
	uint8_t expect = CLAIM_FREE;
	return __atomic_compare_exchange_n(c, &expect, CLAIM_FROZEN, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The thread: a page it froze goes back to free (its bytes did not all arrive). */
static inline void claims_unfreeze(uint8_t *c)
{
	uint8_t expect = CLAIM_FROZEN;
	__atomic_compare_exchange_n(c, &expect, CLAIM_FREE, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* The event loop: take a page for a demand fault; 1 if it is (now or already) taken, 0 if the
 * thread froze it first. */
static inline int claims_take(uint8_t *c)
{
	uint8_t expect = CLAIM_FREE;
	return __atomic_compare_exchange_n(c, &expect, CLAIM_TAKEN, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) ||
	       expect == CLAIM_TAKEN;
}

#ifdef Py_PYTHON_H
/* claim_take(claims, index) -> True when the page at index is (now) the caller's, False when the
 * thread froze it first (its bytes are being written: wait for them). For a module's methods. */
static PyObject *claim_take(PyObject *Py_UNUSED(module), PyObject *args)
{
	Py_buffer buf;
	Py_ssize_t index;
	int taken;

	if (!PyArg_ParseTuple(args, "w*n", &buf, &index))
		return NULL;
	if (index < 0 || index >= buf.len) {
		PyBuffer_Release(&buf);
		PyErr_SetString(PyExc_IndexError, "claim index out of range");
		return NULL;
	}
	taken = claims_take((uint8_t *)buf.buf + index);
	PyBuffer_Release(&buf);
	return PyBool_FromLong(taken);
}
#endif

#endif
