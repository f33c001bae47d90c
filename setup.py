"""The C part of the build; everything else is in pyproject.toml.

uffdd/core/_fastpath.c is the fault loop's common case in C. It is optional: without a C
compiler the build goes on and the daemon serves the same faults in Python (`uffdd check`
says which it has).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "uffdd.core._fastpath",
    sources=["uffdd/core/_fastpath.c"],
    optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
