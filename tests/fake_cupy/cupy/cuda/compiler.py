"""Fake ``cupy.cuda.compiler``: the error raised when a kernel does not compile (here with g++)."""
from __future__ import annotations


class CompileException(Exception):
    """A kernel source that g++ rejected; the message holds the compiler log and the source."""
