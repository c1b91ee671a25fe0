"""The bytes a rank really holds, by category, read off the live tensors (each storage once).

``held_bytes`` covers a plain, DDP or FSDP2 model and its optimizer: the storages behind the
local params and grads (FSDP2: the padded shard storage, not the logical shard size) and every
tensor of the optimizer state, nested dicts included.

``deepspeed_held_bytes`` covers a DeepSpeed engine, whose training state lives mostly outside
the module: ZeRO-3's param partitions (``ds_tensor``) beside the params it keeps whole, the flat
fp32 master partitions, the basic optimizer's state (its per-tensor dicts included), and every
tensor DeepSpeed's ZeRO / bf16 wrapper keeps in its attributes: gradient partitions and staging
buffers (attributes named ``*grad*``) count as grads, the rest as ``buffers``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

CATEGORIES = ("params", "grads", "master", "optimizer_state", "buffers")


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class StorageCounter:
    """Sums storage bytes, counting each storage once however many tensors view it."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()

    def tensor(self, tensor: Any) -> int:
        if not isinstance(tensor, Tensor):
            return 0
        storage = _local(tensor).untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in self._seen:
            return 0
        self._seen.add(key)
        return storage.nbytes()

    def nested(self, value: Any, depth: int = 8) -> int:
        """Bytes of every tensor inside ``value`` (dicts, lists, tuples; at most ``depth`` deep)."""
        if isinstance(value, Tensor):
            return self.tensor(value)
        if depth == 0:
            return 0
        if isinstance(value, dict):
            return sum(self.nested(item, depth - 1) for item in value.values())
        if isinstance(value, (list, tuple)):
            return sum(self.nested(item, depth - 1) for item in value)
        return 0


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the storages behind params, grads and optimizer state on this rank."""
    count = StorageCounter()
    params = list(model.parameters())
    sizes = {
        "params": sum(count.tensor(p) for p in params),
        "grads": sum(count.tensor(p.grad) for p in params),
        "optimizer_state": sum(count.nested(state) for state in optimizer.state.values()),
    }
    sizes["total"] = sum(sizes.values())
    return sizes


def deepspeed_master_partitions(engine: Any) -> list[Tensor]:
    """DeepSpeed's flat fp32 master partitions (ZeRO-1/2 ``single_partition_of_fp32_groups``,
    ZeRO-3 ``fp32_partitioned_groups_flat``, the bf16 wrapper's ``fp32_groups_flat_partition``)."""
    wrapper = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        flats = getattr(wrapper, name, None)
        if flats:
            return list(flats)
    return []


def _module_params(engine: Any) -> Iterable[Tensor]:
    for param in engine.module.parameters():
        yield param
        if hasattr(param, "ds_tensor"):  # ZeRO-3: this rank's partition of the param
            yield param.ds_tensor


def deepspeed_held_bytes(engine: Any) -> dict[str, int]:
    """Bytes a DeepSpeed rank holds, by category (see the module docstring). Call it after the
    backward pass and before ``engine.step()`` to see the gradient partitions too: ZeRO frees
    them at the end of the step."""
    count = StorageCounter()
    params = list(engine.module.parameters())
    sizes = dict.fromkeys(CATEGORIES, 0)
    sizes["params"] = sum(count.tensor(t) for t in _module_params(engine))
    sizes["grads"] = sum(count.tensor(p.grad) for p in params)
    sizes["master"] = sum(count.tensor(t) for t in deepspeed_master_partitions(engine))
    sizes["optimizer_state"] = sum(count.nested(state) for state in engine.basic_optimizer.state.values())
    wrapper = engine.optimizer
    if wrapper is not engine.basic_optimizer:
        for name, value in vars(wrapper).items():
            if name in ("optimizer", "state", "param_groups"):
                continue
            sizes["grads" if "grad" in name else "buffers"] += count.nested(value, depth=3)
    sizes["total"] = sum(sizes[k] for k in CATEGORIES)
    return sizes
