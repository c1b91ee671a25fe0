"""Where a flat element range of a factored tensor falls in its rows and columns.

CAME factors a tensor of shape ``(*batch, R, C)`` over its last two dims: one second-moment
value per row (``B * R`` in all, ``B = prod(batch)``) and one per column (``B * C``). A shard may
hold any flat range ``[start, end)`` of the tensor, cut mid-row (DeepSpeed ZeRO-1/2) or on row
boundaries (FSDP2). ``FactoredLayout`` splits such a range into at most one leading partial row,
a run of whole rows, and at most one trailing partial row, so that partial row/column sums and
the broadcast of row x column factors stay views and small reductions: no per-element index
tensors, no gather of the full tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class PartialRow:
    """Columns ``[col_start, col_end)`` of global row ``row``; ``offset`` is the local start."""

    row: int
    col_start: int
    col_end: int
    offset: int


@dataclass(frozen=True)
class FactoredLayout:
    """The flat range ``[start, end)`` of a tensor of ``shape`` (``len(shape) >= 2``)."""

    shape: tuple[int, ...]
    start: int
    end: int
    partial_rows: tuple[PartialRow, ...] = field(init=False)
    full_rows: tuple[int, int, int] = field(init=False)  # (first row, row count, local offset)

    def __post_init__(self) -> None:
        if len(self.shape) < 2:
            raise ValueError(f"a factored layout needs ndim >= 2, got shape {self.shape}")
        numel = math.prod(self.shape)
        if not 0 <= self.start <= self.end <= numel:
            raise ValueError(f"range [{self.start}, {self.end}) outside a tensor of {numel} elements")
        cols = self.shape[-1]
        partial: list[PartialRow] = []
        lo, hi = self.start, self.end
        if lo < hi and lo % cols != 0:
            row = lo // cols
            stop = min(hi, (row + 1) * cols)
            partial.append(PartialRow(row, lo % cols, stop - row * cols, 0))
            lo = stop
        first_full, n_full, full_offset = lo // cols, 0, lo - self.start
        if lo < hi:
            n_full = (hi - lo) // cols
            lo += n_full * cols
        if lo < hi:
            row = lo // cols
            partial.append(PartialRow(row, 0, hi - row * cols, lo - self.start))
        object.__setattr__(self, "partial_rows", tuple(partial))
        object.__setattr__(self, "full_rows", (first_full, n_full, full_offset))

    @property
    def rows(self) -> int:
        """Rows per matrix (``R``)."""
        return self.shape[-2]

    @property
    def cols(self) -> int:
        """Columns per matrix (``C``)."""
        return self.shape[-1]

    @property
    def num_row_factors(self) -> int:
        """Length of the row state: ``B * R``."""
        return math.prod(self.shape[:-1])

    @property
    def num_col_factors(self) -> int:
        """Length of the column state: ``B * C``."""
        return math.prod(self.shape[:-2]) * self.cols

    def _full_block(self, flat: Tensor) -> tuple[int, Tensor, Tensor]:
        first, count, offset = self.full_rows
        block = flat[offset : offset + count * self.cols].view(count, self.cols)
        batch_of_row = torch.arange(first, first + count, device=flat.device) // self.rows
        return first, block, batch_of_row

    def add_row_col_sums(self, flat: Tensor, row_sums: Tensor, col_sums: Tensor) -> None:
        """Add this range's partial sums of ``flat`` into the FULL-size ``row_sums`` (``B*R``)
        and ``col_sums`` (``B*C``); other ranks add theirs, a sum all-reduce completes them."""
        cols_by_batch = col_sums.view(-1, self.cols)
        first, block, batch_of_row = self._full_block(flat)
        if block.shape[0]:
            row_sums[first : first + block.shape[0]] += block.sum(dim=1)
            cols_by_batch.index_add_(0, batch_of_row, block)
        for part in self.partial_rows:
            piece = flat[part.offset : part.offset + part.col_end - part.col_start]
            row_sums[part.row] += piece.sum()
            cols_by_batch[part.row // self.rows, part.col_start : part.col_end] += piece

    def outer(self, row_vec: Tensor, col_vec: Tensor) -> Tensor:
        """The local flat tensor ``row_vec[row(i)] * col_vec[col(i)]`` for each element ``i``."""
        out = torch.empty(self.end - self.start, dtype=row_vec.dtype, device=row_vec.device)
        cols_by_batch = col_vec.view(-1, self.cols)
        first, block, batch_of_row = self._full_block(out)
        if block.shape[0]:
            torch.mul(row_vec[first : first + block.shape[0], None], cols_by_batch[batch_of_row], out=block)
        for part in self.partial_rows:
            piece = out[part.offset : part.offset + part.col_end - part.col_start]
            torch.mul(row_vec[part.row], cols_by_batch[part.row // self.rows, part.col_start : part.col_end], out=piece)
        return out
