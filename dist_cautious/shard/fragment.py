"""The one idea of the package: every backend hands the optimizer pieces of original tensors.

A single process owns whole tensors; FSDP2 owns rows of them (``Shard(0)`` DTensors);
DeepSpeed ZeRO owns arbitrary flat ranges. All are a ``Fragment``: which tensor, its global
shape, the flat range ``[start, end)`` held here, flat local views of param / grad / state, and
the process group of the ranks that hold the other pieces. The optimizers are written once
against fragments and never ask which backend they run under.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_cautious.kernels.layout import FactoredLayout

ElementwiseStateFactory = Callable[[], Tensor]


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of optimizer state and math for params of ``param_dtype``, as torch.optim
    keeps it: float64 for float64 params; fp32 for fp32, bf16 and fp16 params (low-precision
    params get fp32 state, the mixed-precision practice the kernels implement)."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


@dataclass
class Fragment:
    """One process's piece ``[start, end)`` of one original tensor of ``global_shape``.

    ``param`` and ``grad`` are flat 1-D views of the local elements (any float dtype; the
    optimizer computes in ``state_dtype(param.dtype)`` and writes back). ``state`` is the optimizer state of the whole
    tensor on this rank: per-element entries hold only the local range, factored entries (CAME
    rows/columns) are full-size and identical on every rank of ``group``. ``group`` is ``None``
    when the whole tensor is local (single process, DDP): then nothing is ever communicated.
    """

    param: Tensor
    grad: Tensor
    state: dict[str, Any]
    global_shape: torch.Size
    start: int
    end: int
    group: Optional[dist.ProcessGroup]
    new_elementwise_state: ElementwiseStateFactory
    local_view: Callable[[Tensor], Tensor]
    name: str = "<param>"
    writeback: Optional[Callable[[], None]] = None
    #: set by the optimizers' step plan: this fragment's slot in the plan's packed step counts,
    #: and the kernel namespace the plan checked its tensors for (``None``: check per call)
    step_slot: Optional[int] = None
    ops: Any = None
    #: kept on the first fragment of a batch by the optimizers (``base.batch_sizes``,
    #: ``base.reduce_per_tensor``): per-batch tensors made once for a plan's batches
    batch_sizes: Any = None
    reduction_positions: Any = None
    _views: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    @cached_property
    def numel(self) -> int:
        """Elements of the whole original tensor, wherever they live."""
        return math.prod(self.global_shape)

    @property
    def local_numel(self) -> int:
        return self.end - self.start

    @property
    def factored(self) -> bool:
        """CAME factors tensors with two or more dims over their last two."""
        return len(self.global_shape) >= 2

    def layout(self) -> FactoredLayout:
        return FactoredLayout(tuple(self.global_shape), self.start, self.end)

    def commit(self) -> None:
        """Copy the stepped local values back where the adapter had to work on a copy."""
        if self.writeback is not None:
            self.writeback()

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of this fragment's state and math (``state_dtype``)."""
        return state_dtype(self.param.dtype)

    def state_holder(self, key: str) -> dict[str, Any]:
        """The dict that holds per-element state ``key`` (for this fragment: its ``state``)."""
        return self.state

    def elementwise_state(self, key: str) -> Tensor:
        """Flat view (``state_dtype``) of the local range of per-element state ``key``, created as zeros."""
        full = self.state.get(key)
        if full is None:
            full = self.state[key] = self.new_elementwise_state()
        cached = self._views.get(key)
        if cached is not None and cached[0] is full:
            return cached[1]  # a fragment the step plan keeps: the view of last step
        view = self.local_view(full)
        self._views[key] = (full, view)
        return view

    def factor_state(self, key: str, shape: tuple[int, ...]) -> Tensor:
        """Flat view of full-size replicated state (CAME row / column factors of ``shape``,
        ``state_dtype``), created as zeros on the fragment's device; identical on every rank of
        ``group``."""
        if key not in self.state:
            self.state[key] = torch.zeros(shape, dtype=self.state_dtype, device=self.param.device)
        return self.state[key].view(-1)
