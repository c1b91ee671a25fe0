"""Batched reductions: one all-reduce per process group per optimizer phase.

Partial sums that need the whole tensor (cautious mask counts, CAME row/column sums, sums of
squares for the RMS clip) are registered here as fp32 tensors (float64 for float64 params,
reduced apart from the fp32 ones). ``all_reduce`` makes ONE
``torch.distributed.all_reduce`` (sum) per process group: a group with a single registered
contiguous fp32 tensor (CAME's packed partial-sum buffer, whose per-fragment sums are views into
it) is reduced in place; several tensors are packed into one flat buffer and copied back, one
op per registered tensor, never per fragment. Every rank of a group registers the same tensors
in the same order with the same lengths (they derive from global shapes only), which is what
makes the packed buffers line up.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def needs_communication(group: Optional[dist.ProcessGroup]) -> bool:
    """``None`` (or a group of one rank) means the whole tensor is local."""
    return group is not None and dist.get_world_size(group) > 1


class BatchedReducer:
    """Collects partial sums per process group; ``all_reduce`` completes them all at once."""

    def __init__(self) -> None:
        self._pending: dict[dist.ProcessGroup, list[tuple[Tensor, Optional[Tensor]]]] = {}

    def add(self, group: Optional[dist.ProcessGroup], partial: Tensor, index: Optional[Tensor] = None) -> Tensor:
        """Register ``partial`` (reduced in place over ``group``) and return it. With ``index``
        (a 1-D int64 tensor on ``partial``'s device) only the entries ``partial[index]`` along
        dim 0 are reduced: one gather and one scatter instead of one slice per entry."""
        if needs_communication(group):
            self._pending.setdefault(group, []).append((partial, index))
        return partial

    def all_reduce(self) -> None:
        """One sum all-reduce per group; gloo rejects empty buffers, so those are skipped
        (all ranks skip together: lengths depend on global shapes only)."""
        for group, all_partials in self._pending.items():
            for partials in _by_reduction_dtype(all_partials):
                self._reduce(group, partials)
        self._pending.clear()

    @staticmethod
    def _reduce(group: dist.ProcessGroup, partials: list[tuple[Tensor, Optional[Tensor]]]) -> None:
        """One all-reduce of ``partials`` (all of one reduction dtype) over ``group``."""
        if len(partials) == 1:
            only, index = partials[0]
            if index is None and only.dtype in _REDUCTION_DTYPES and only.is_contiguous():
                if only.numel():
                    dist.all_reduce(only, op=dist.ReduceOp.SUM, group=group)
                return
        dtype = _reduction_dtype(partials[0][0])
        pieces = [t.reshape(-1).to(dtype) if index is None else t.index_select(0, index).reshape(-1).to(dtype) for t, index in partials]
        flat = torch.cat(pieces)
        if flat.numel() == 0:
            return
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for (t, index), piece in zip(partials, pieces):
            reduced = flat[offset : offset + piece.numel()]
            if index is None:
                t.copy_(reduced.view_as(t))
            else:
                t.index_copy_(0, index, reduced.view((-1, *t.shape[1:])).to(t.dtype))
            offset += piece.numel()


#: partial sums are reduced in fp32, or in float64 when they are float64 (float64 params' math)
_REDUCTION_DTYPES = (torch.float32, torch.float64)


def _reduction_dtype(tensor: Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _by_reduction_dtype(partials: list[tuple[Tensor, Optional[Tensor]]]) -> list[list[tuple[Tensor, Optional[Tensor]]]]:
    """``partials`` split by reduction dtype, in order of first appearance (the same on every
    rank: dtypes follow the params', which every rank of a group shares)."""
    split: dict[torch.dtype, list[tuple[Tensor, Optional[Tensor]]]] = {}
    for entry in partials:
        split.setdefault(_reduction_dtype(entry[0]), []).append(entry)
    return list(split.values())
