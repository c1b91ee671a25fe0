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


def factor_update_sizes(
    family: str, row_state: Any, col_state: Any, row_sums: Any, col_sums: Any, row_counts: Any, col_counts: Any,
    run_rows_per_matrix: Sequence[int], run_rows: Sequence[int], row_factor: Any, col_factor: Any, means: Any,
) -> None:  # fmt: skip
    """``came_factor_update``'s size checks: rows and columns as long as their state, runs of
    whole matrices covering the rows, one mean per matrix."""
    name = "came_factor_update"
    same_length(family, name, run_rows_per_matrix=run_rows_per_matrix, run_rows=run_rows)
    for key, tensor, like in (
        ("row sums", row_sums, row_state), ("row counts", row_counts, row_state), ("row factor", row_factor, row_state),
        ("column sums", col_sums, col_state), ("column counts", col_counts, col_state), ("column factor", col_factor, col_state),
    ):  # fmt: skip
        if tensor.numel() != like.numel():
            fail(family, name, f"{key} has {tensor.numel()} elements, expected {like.numel()}")
    if any(rows <= 0 or count % rows for rows, count in zip(run_rows_per_matrix, run_rows)) or sum(run_rows) != row_state.numel():
        fail(family, name, f"runs {list(zip(run_rows_per_matrix, run_rows))} are not whole matrices covering {row_state.numel()} rows")
    matrices = sum(count // rows for rows, count in zip(run_rows_per_matrix, run_rows))
    if means.numel() != matrices:
        fail(family, name, f"{means.numel()} means for {matrices} matrices")
