"""Turn the params an optimizer is handed into fragments.

Plain tensors (single process, DDP) become one fragment covering the whole tensor, with no
process group: the optimizers then communicate nothing. DTensors (FSDP2 / HSDP) are handled by
``dist_cautious.shard.dtensor``. DeepSpeed ZeRO installs its own fragment source.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, Protocol

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from dist_cautious.shard.fragment import Fragment, state_dtype


class FragmentSource(Protocol):
    """Yields the fragments of the params of one param group that have a gradient."""

    def __call__(self, params: Iterable[Tensor], state: dict[Tensor, dict[str, Any]]) -> Iterator[Fragment]: ...


def _flat_contiguous(tensor: Tensor) -> Tensor:
    return tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)


def whole_tensor_fragment(param: Tensor, state: dict[str, Any], name: str = "<param>") -> Fragment:
    """The whole of a plain tensor as one fragment. A non-contiguous param (channels_last)
    is stepped on a contiguous copy that ``writeback`` copies back."""
    flat = _flat_contiguous(param.data)
    writeback: Callable[[], None] | None = None
    if not param.is_contiguous():  # a contiguous param's flat form is a view of it (no data_ptr: fake tensors have none)
        writeback = lambda: param.data.copy_(flat.view(param.shape))  # noqa: E731
    return Fragment(
        param=flat,
        grad=_flat_contiguous(param.grad),
        state=state,
        global_shape=param.shape,
        start=0,
        end=param.numel(),
        group=None,
        new_elementwise_state=lambda: torch.zeros(param.shape, dtype=state_dtype(param.dtype), device=param.device),
        local_view=lambda t: t.view(-1),
        name=name,
        writeback=writeback,
    )


def default_fragments(params: Iterable[Tensor], state: dict[Tensor, dict[str, Any]]) -> Iterator[Fragment]:
    """Fragments of plain tensors and DTensors, skipping params without a gradient."""
    for _, fragment in param_fragments(params, state):
        yield fragment


def param_fragments(params: Iterable[Tensor], state: dict[Tensor, dict[str, Any]]) -> Iterator[tuple[Tensor, Fragment]]:
    """``default_fragments`` with the param each fragment came from (the step plan rebinds
    grads through it)."""
    from dist_cautious.shard import dtensor  # DTensor support is optional at import time

    for index, param in enumerate(params):
        if param.grad is None:
            continue
        name = getattr(param, "_dist_cautious_name", f"params[{index}] of shape {tuple(param.shape)}")
        refuse_fsdp1(param, name)
        if dtensor.is_dtensor(param):
            yield param, dtensor.dtensor_fragment(param, state[param], name)
        else:
            yield param, whole_tensor_fragment(param, state[param], name)


def refuse_fsdp1(param: Tensor, name: str) -> None:
    """FSDP1 (``FullyShardedDataParallel``) hands the optimizer a ``FlatParameter`` (many
    tensors, sharded flat) or, with ``use_orig_params=True``, views of this rank's slice of one:
    plain tensors that are not whole params. Stepping them as whole tensors would compute every
    mask mean, RMS and CAME factor per shard. FSDP1 marks both (``_is_flat_param``, and
    ``_fsdp_flattened`` on each param it flattened), so they are refused, naming the param."""
    if getattr(param, "_is_flat_param", False) or getattr(param, "_fsdp_flattened", False):
        raise ValueError(
            f"dist_cautious: {name} belongs to an FSDP1 (FullyShardedDataParallel) flat parameter; its shards are not whole "
            "tensors and whole-tensor statistics of them would be wrong. Use FSDP2 (torch.distributed.fsdp.fully_shard)"
        )


def local_storage(tensor: Tensor) -> Any:
    """Where the local data behind ``tensor`` (a DTensor's local shard) lives: the step plan
    rebuilds when it moves (``param.data = ...``, ``model.to(...)``). The data address; for a
    fake tensor (FakeTensorMode: no data, and reading its address is deprecated) the identity of
    its storage and its offset."""
    local = getattr(tensor, "_local_tensor", tensor)
    if isinstance(local, FakeTensor):
        return (local.untyped_storage()._cdata, local.storage_offset())
    return local.data_ptr()
