"""The C part of the build; everything else is in pyproject.toml.

All extensions are optional: without a C compiler the build goes on, and `uffdd check` says
what the daemon does instead.

- uffdd/core/_fastpath.c: the fault loop's common case in C (without it: the same path in Python).
- uffdd/kernel/_memguard.c: copies into guest memory that survive the memory file shrinking
  (without it: the same copies through a pipe, twice the work).
- uffdd/peer/_wire.c: the peer protocol's crc32c and frame tags (uffdd/csrc/wire.h, which the C
  fast paths share) from Python (without it: the crc32c and cryptography packages).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(ext_modules=[
    Extension("uffdd.core._fastpath", sources=["uffdd/core/_fastpath.c"], optional=True, extra_compile_args=FLAGS),
    Extension("uffdd.kernel._memguard", sources=["uffdd/kernel/_memguard.c"], optional=True,
              extra_compile_args=FLAGS, include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/guard.h"]),
    Extension("uffdd.peer._wire", sources=["uffdd/peer/_wire.c"], optional=True, extra_compile_args=FLAGS,
              include_dirs=["uffdd/csrc"], depends=["uffdd/csrc/wire.h"]),
])
