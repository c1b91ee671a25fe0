"""Checks shared by the kernels' fake implementations (``cpu_library``, ``cuda_library``).

A fake implementation runs instead of a kernel under ``FakeTensorMode``; it raises where the
kernel would, with the kernel family and op in the message, so a traced step fails as the real
one would rather than tracing a call the kernels refuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn


def fail(family: str, name: str, message: str) -> NoReturn:
    """Raise as the ``family`` ("CPU", "CUDA") kernels' binding does for op ``name``."""
    raise RuntimeError(f"dist_cautious {family} kernels ({name}): {message}")


def same_length(family: str, name: str, **lists: Sequence[Any]) -> int:
    """The common length of ``lists`` (0 for none); raises if any two differ."""
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) > 1:
        fail(family, name, f"lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)
