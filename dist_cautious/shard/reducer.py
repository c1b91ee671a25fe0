"""Batched reductions: one all-reduce per process group per optimizer phase.

Partial sums that need the whole tensor (cautious mask counts, CAME row/column sums, sums of
squares for the RMS clip) are registered here as small fp32 tensors. ``all_reduce`` packs all
tensors bound for the same process group into ONE flat buffer, reduces it with one
``torch.distributed.all_reduce`` (sum), and copies the results back in place. Every rank of a
group registers the same tensors in the same order with the same lengths (they derive from
global shapes only), which is what makes the packed buffers line up.
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
        self._pending: dict[dist.ProcessGroup, list[Tensor]] = {}

    def add(self, group: Optional[dist.ProcessGroup], partial: Tensor) -> Tensor:
        """Register ``partial`` (reduced in place over ``group``) and return it."""
        if needs_communication(group):
            self._pending.setdefault(group, []).append(partial)
        return partial

    def all_reduce(self) -> None:
        """One sum all-reduce per group; gloo rejects empty buffers, so those are skipped
        (all ranks skip together: lengths depend on global shapes only)."""
        for group, partials in self._pending.items():
            flat = torch.cat([t.reshape(-1).float() for t in partials])
            if flat.numel() == 0:
                continue
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            offset = 0
            for t in partials:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self._pending.clear()
