/*
 * guard.h: copies into guest memory that survive the memory file shrinking under them.
 *
 * A VMM may ftruncate() its own memory file at any time; touching a mapping of it beyond the new
 * end raises SIGBUS. guarded_copy() runs a memcpy/memset with a SIGBUS handler that jumps back
 * out of *this copy loop only* (never out of foreign code) and reports the failure, so the caller
 * can end that one session. A SIGBUS that does not come from a guarded copy on the same thread,
 * into the range being written, goes to whatever handler was there before (faulthandler, or the
 * default action: die). Each extension that includes this header installs its own handler once;
 * they chain.
 */
#ifndef UFFDD_GUARD_H
#define UFFDD_GUARD_H

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>

static struct sigaction guard_previous;
static int guard_installed;
static __thread sigjmp_buf *guard_jump;
static __thread volatile uintptr_t guard_lo, guard_hi;

static void guard_on_sigbus(int sig, siginfo_t *info, void *ctx)
{
	uintptr_t addr = (uintptr_t)info->si_addr;

	if (guard_jump && addr >= guard_lo && addr < guard_hi)
		siglongjmp(*guard_jump, 1);
	if (guard_previous.sa_flags & SA_SIGINFO) {
		guard_previous.sa_sigaction(sig, info, ctx);
		return;
	}
	if (guard_previous.sa_handler == SIG_IGN)
		return;
	if (guard_previous.sa_handler != SIG_DFL) {
		guard_previous.sa_handler(sig);
		return;
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

/* Install the handler (once per extension); 0, or -1 with errno set. */
static int guard_install(void)
{
	struct sigaction sa;

	if (guard_installed)
		return 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = guard_on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, &guard_previous) != 0)
		return -1;
	guard_installed = 1;
	return 0;
}

/* Run fn(arg), which reads or writes guest memory in [lo, hi) only there; 0, or -1 if that memory
 * faulted (fn was cut short: whatever it computed is void). */
__attribute__((unused)) static int guarded_call(void (*fn)(void *), void *arg, const void *lo, size_t n)
{
	sigjmp_buf jb;
	volatile int failed = 0;

	if (sigsetjmp(jb, 0) == 0) {
		guard_lo = (uintptr_t)lo;
		guard_hi = (uintptr_t)lo + n;
		guard_jump = &jb;
		fn(arg);
	} else {
		sigset_t set;
		failed = 1;
		/* The handler's mask (SIGBUS blocked) is still in force after the jump: lift it. */
		sigemptyset(&set);
		sigaddset(&set, SIGBUS);
		pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	}
	guard_jump = NULL;
	guard_lo = guard_hi = 0;
	return failed ? -1 : 0;
}

struct guard_copy_args {
	void *dst;
	const void *src;
	size_t n;
};

__attribute__((unused)) static void guard_do_copy(void *arg)
{
	struct guard_copy_args *a = arg;

	if (a->src)
		memcpy(a->dst, a->src, a->n);
	else
		memset(a->dst, 0, a->n);
}

/* memcpy (src != NULL) or zero (src == NULL) n bytes into dst; 0, or -1 if dst faulted. The
 * handler must have been installed (guard_install). */
__attribute__((unused)) static int guarded_copy(void *dst, const void *src, size_t n)
{
	struct guard_copy_args a = { dst, src, n };

	return guarded_call(guard_do_copy, &a, dst, n);
}

#endif
