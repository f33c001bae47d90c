"""The C part of the build; everything else is in pyproject.toml.

uffdd/kernel/_fastpath.c is the single-page fault path in C. It is optional: without a C
compiler the build goes on and the daemon serves the same faults in Python (`uffdd check`
says which it has).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "uffdd.kernel._fastpath",
    sources=["uffdd/kernel/_fastpath.c"],
    optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
