"""FSDP2 / HSDP: DTensor params sharded on dim 0 as fragments.

``fully_shard`` gives each rank rows ``[r0, r1)`` of every param as a ``Shard(0)`` DTensor
(uneven, possibly empty); HSDP adds a replicate mesh dim, ``(Replicate(), Shard(0))``, whose
ranks hold identical copies and already-averaged gradients. Partial sums are therefore reduced
over the mesh dim that shards, never over the one that replicates. Any other placement (a
``Shard(1)`` from tensor parallelism, ``Partial``) is refused by name: a per-shard approximation
would be silently different math.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dist_cautious.shard.fragment import Fragment, state_dtype


def is_dtensor(tensor: Tensor) -> bool:
    return isinstance(tensor, DTensor)


def _shard_mesh_dim(param: DTensor, name: str) -> int | None:
    """The one mesh dim that shards ``param`` on tensor dim 0, or ``None`` if replicated."""
    shard_dims = []
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
            continue
        raise ValueError(
            f"dist_cautious: param {name!r} has placements {tuple(param.placements)}; only "
            "Replicate() and Shard(0) (FSDP2 / HSDP) are supported, other placements would need "
            "a different reduction and are refused rather than approximated per shard"
        )
    if len(shard_dims) > 1:
        raise ValueError(
            f"dist_cautious: param {name!r} is sharded on dim 0 over several mesh dims "
            f"{shard_dims}; use one sharding mesh dim (HSDP: (Replicate(), Shard(0)))"
        )
    return shard_dims[0] if shard_dims else None


def local_grad(param: DTensor, name: str) -> Tensor:
    """The flat local shard of ``param.grad``, which must have the param's placements."""
    grad = param.grad
    if not isinstance(grad, DTensor) or tuple(grad.placements) != tuple(param.placements):
        raise ValueError(
            f"dist_cautious: gradient of {name!r} must be a DTensor with the param's placements "
            f"{tuple(param.placements)}, got {type(grad).__name__}"
            + (f" {tuple(grad.placements)}" if isinstance(grad, DTensor) else "")
        )
    return grad.to_local().reshape(-1)


def dtensor_fragment(param: DTensor, state: dict[str, Any], name: str) -> Fragment:
    """The local rows of a ``Shard(0)`` DTensor as a fragment reduced over its shard group."""
    mesh_dim = _shard_mesh_dim(param, name)
    local_grad_view = local_grad(param, name)
    local_param = param.to_local()
    if not local_param.is_contiguous():
        raise ValueError(f"dist_cautious: local shard of {name!r} is not contiguous")
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row_numel = math.prod(param.shape[1:]) if param.dim() > 0 else 1
    start = offset[0] * row_numel if param.dim() > 0 else 0
    group = None if mesh_dim is None else param.device_mesh.get_group(mesh_dim)
    return Fragment(
        param=local_param.view(-1),
        grad=local_grad_view,
        state=state,
        global_shape=param.shape,
        start=start,
        end=start + local_param.numel(),
        group=group,
        new_elementwise_state=lambda: torch.zeros_like(param, dtype=state_dtype(param.dtype)),
        local_view=lambda t: t.to_local().view(-1),
        name=name,
    )
