/*
 * uffdd.kernel._memguard: copies into guest memory that survive the memory file shrinking.
 *
 * A VMM may ftruncate() its own memory file at any time. Touching the daemon's second mapping
 * beyond the new end then raises SIGBUS, which would kill the daemon and every other guest it
 * serves. The daemon therefore never touches guest memory in user mode without a guard: these
 * copies run with a SIGBUS handler that jumps back out of *this file's own copy loop* (never out
 * of foreign code) and report the failure, and the caller ends that one session.
 *
 * The handler is installed once; a SIGBUS that does not come from a guarded copy on the same
 * thread is passed on to whatever handler was there before (faulthandler, or the default: die).
 * Large copies release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static struct sigaction previous;
static int installed;
static __thread sigjmp_buf *guard;
static __thread volatile uintptr_t guard_lo, guard_hi;

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
	uintptr_t addr = (uintptr_t)info->si_addr;

	if (guard && addr >= guard_lo && addr < guard_hi)
		siglongjmp(*guard, 1);
	/* Not ours: behave as if we were not here. */
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, info, ctx);
		return;
	}
	if (previous.sa_handler == SIG_IGN)
		return;
	if (previous.sa_handler != SIG_DFL) {
		previous.sa_handler(sig);
		return;
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

static int install(void)
{
	struct sigaction sa;

	if (installed)
		return 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, &previous) != 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	installed = 1;
	return 0;
}

/* memcpy (src != NULL) or memset to zero (src == NULL) into dst; 0, or -1 if dst faulted. */
static int guarded(char *dst, const char *src, size_t n)
{
	sigjmp_buf jb;
	volatile int failed = 0;

	if (sigsetjmp(jb, 0) == 0) {
		guard_lo = (uintptr_t)dst;
		guard_hi = (uintptr_t)dst + n;
		guard = &jb;
		if (src)
			memcpy(dst, src, n);
		else
			memset(dst, 0, n);
	} else {
		sigset_t set;
		failed = 1;
		/* The handler's mask (SIGBUS blocked) is still in force after the jump: lift it. */
		sigemptyset(&set);
		sigaddset(&set, SIGBUS);
		pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	}
	guard = NULL;
	guard_lo = guard_hi = 0;
	return failed ? -1 : 0;
}

static PyObject *raise_gone(void)
{
	errno = EFAULT;
	return PyErr_SetFromErrnoWithFilename(PyExc_OSError, "guest memory (the memory file shrank)");
}

/* copy(dest, src): copy src into dest (same length); OSError(EFAULT) if dest is not there. */
static PyObject *memguard_copy(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
	Py_buffer dst, src;
	int rc;

	if (nargs != 2) {
		PyErr_SetString(PyExc_TypeError, "copy(dest, src) takes 2 arguments");
		return NULL;
	}
	if (install() < 0)
		return NULL;
	if (PyObject_GetBuffer(args[0], &dst, PyBUF_WRITABLE) < 0)
		return NULL;
	if (PyObject_GetBuffer(args[1], &src, PyBUF_SIMPLE) < 0) {
		PyBuffer_Release(&dst);
		return NULL;
	}
	if (dst.len != src.len) {
		PyBuffer_Release(&dst);
		PyBuffer_Release(&src);
		return PyErr_Format(PyExc_ValueError, "copy: %zd bytes into %zd", src.len, dst.len);
	}
	if (dst.len >= 65536) {
		Py_BEGIN_ALLOW_THREADS
		rc = guarded(dst.buf, src.buf, (size_t)dst.len);
		Py_END_ALLOW_THREADS
	} else {
		rc = guarded(dst.buf, src.buf, (size_t)dst.len);
	}
	PyBuffer_Release(&dst);
	PyBuffer_Release(&src);
	if (rc < 0)
		return raise_gone();
	Py_RETURN_NONE;
}

/* zero(dest): fill dest with zeros; OSError(EFAULT) if it is not there. */
static PyObject *memguard_zero(PyObject *self, PyObject *arg)
{
	Py_buffer dst;
	int rc;

	if (install() < 0)
		return NULL;
	if (PyObject_GetBuffer(arg, &dst, PyBUF_WRITABLE) < 0)
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = guarded(dst.buf, NULL, (size_t)dst.len);
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&dst);
	if (rc < 0)
		return raise_gone();
	Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
	{ "copy", (PyCFunction)(void (*)(void))memguard_copy, METH_FASTCALL,
	  "copy(dest, src): copy into guest memory; OSError(EFAULT) if it is gone" },
	{ "zero", (PyCFunction)memguard_zero, METH_O, "zero(dest): zero guest memory; OSError(EFAULT) if it is gone" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_memguard", "Copies into guest memory that survive a shrinking memory file.", -1,
	methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__memguard(void)
{
	return PyModule_Create(&module);
}
