"""The C part of the build; everything else is in pyproject.toml.

All extensions are optional: without a C compiler the build goes on, and `uffdd check` says
what the daemon does instead.

- uffdd/core/_fastpath.c: the fault loop's common case in C (without it: the same path in Python).
- uffdd/core/_copier.c: background copies from a file source into shared memory without the GIL
  (without it: a Python thread copies).
- uffdd/kernel/_memguard.c: copies into guest memory that survive the memory file shrinking
  (without it: the same copies through a pipe, twice the work).
- uffdd/peer/_wire.c: the peer protocol's crc32c and frame tags (uffdd/csrc/wire.h, which the C
  fast paths share) from Python (without it: the crc32c and cryptography packages).
- uffdd/peer/_native.c, _responder.c: the urgent peer link's two ends in C, the client's fed straight
  from the C fault path (without them: the link in Python, over asyncio streams).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(ext_modules=[
    Extension("uffdd.core._fastpath", sources=["uffdd/core/_fastpath.c"], optional=True, extra_compile_args=FLAGS,
              include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/link_api.h"]),
    Extension("uffdd.core._copier", sources=["uffdd/core/_copier.c"], optional=True, extra_compile_args=FLAGS,
              include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/claims.h"]),
    Extension("uffdd.kernel._memguard", sources=["uffdd/kernel/_memguard.c"], optional=True,
              extra_compile_args=FLAGS, include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/guard.h"]),
    Extension("uffdd.peer._wire", sources=["uffdd/peer/_wire.c"], optional=True, extra_compile_args=FLAGS,
              include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/wire.h"]),
    Extension("uffdd.peer._native",
              sources=["uffdd/peer/_native.c", "uffdd/peer/_responder.c", "uffdd/peer/_bulk.c"],
              optional=True, extra_compile_args=FLAGS, include_dirs=["uffdd/csrc"],
              depends=["uffdd/csrc/wire.h", "uffdd/csrc/frame.h", "uffdd/csrc/link_api.h", "uffdd/csrc/guard.h",
                       "uffdd/csrc/claims.h"]),
])
