"""DeepSpeed's universal checkpoint (``ds_to_universal``) for all three optimizers.

DeepSpeed's converter reads, per flat partition, exactly ``exp_avg``, ``exp_avg_sq`` and
``step`` of the base optimizer's state, cuts them into per-param files by the partition
mapping, and copies every other top-level entry of rank 0's ZeRO optimizer ``state_dict`` into
``zero/optimizer_state.pt``. Loading (``"checkpoint": {"load_universal": true}``) reads those
per-param files back into each rank's new partition. That carries CautiousAdamW's state. It
does not carry CautiousLion (no ``exp_avg_sq``: the converter stops with a ``KeyError``) nor
CAME (its factored rows / columns, and its 1-D second moments, are per tensor, not per
partition element).

So, on engines running our optimizers, the ZeRO wrapper's ``state_dict`` (what
``save_checkpoint`` writes on every rank) is extended:

- each partition's saved state gets an ``exp_avg_sq`` where the optimizer has none: zeros as a
  one-element tensor expanded to the partition's length (``torch.save`` stores one element,
  the converter can cut it like any other partition);
- ``PER_TENSOR_KEY`` holds the full per-tensor state of every param, by param name: ``step``,
  for CAME its four factors (factored params) or its ``exp_avg_sq`` (1-D / 0-D params), for
  CautiousAdamW with ``amsgrad`` its ``max_exp_avg_sq`` (per element, so as large as the param).
  It is small (O(rows + cols) per matrix) and gathered across ranks when
  ``engine.save_checkpoint`` starts, which every rank calls; ``state_dict`` itself never
  communicates (DeepSpeed calls it on rank 0 alone in some set-ups). The converter copies the
  entry into ``zero/optimizer_state.pt`` untouched.

After DeepSpeed's universal load, ``restore_per_tensor_state`` sets each param's per-tensor
state from that entry at the new world size, and drops the partition-shaped ``exp_avg_sq``
DeepSpeed loaded for optimizers that keep none (it would be dead memory the size of
``exp_avg``). After a regular ``load_checkpoint`` the same placeholder is dropped.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

#: the entry of the ZeRO optimizer state_dict carrying per-tensor state through the converter
PER_TENSOR_KEY = "dist_cautious_per_tensor_state"
#: what the converter requires of every partition's state
CONVERTER_KEYS = ("exp_avg", "exp_avg_sq")


def _base_state(state_dict: dict[str, Any]) -> dict[Any, dict[str, Any]]:
    """The base optimizer's ``state`` inside a ZeRO wrapper's state_dict: under
    ``base_optimizer_state`` (ZeRO-1/2, the bf16 wrapper) or ``optimizer_state_dict`` (ZeRO-3)."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT

    for key in (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT):
        if isinstance(state_dict.get(key), dict) and "state" in state_dict[key]:
            return state_dict[key]["state"]
    raise ValueError(f"dist_cautious: unknown DeepSpeed optimizer state_dict layout (keys {sorted(state_dict)})")


def per_tensor_keys(optimizer: Any, shape: torch.Size) -> list[str]:
    """The state keys of one param that the converter does not carry: everything but the
    partition-shaped ``exp_avg`` / ``exp_avg_sq`` (CAME's factors or 1-D second moments,
    CautiousAdamW's ``max_exp_avg_sq`` with ``amsgrad``, which ZeRO keeps per tensor, and
    ``step``)."""
    from dist_cautious.integrations.deepspeed import FACTOR_KEYS
    from dist_cautious.optim import CAME, CautiousAdamW

    if isinstance(optimizer, CAME):
        return [*FACTOR_KEYS, "step"] if len(shape) >= 2 else ["exp_avg_sq", "step"]
    if isinstance(optimizer, CautiousAdamW) and any(group.get("amsgrad") for group in optimizer.param_groups):
        return ["max_exp_avg_sq", "step"]
    return ["step"]


def gather_per_tensor_state(engine: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{param name: {key: full value}}`` of the per-tensor state; a collective over every
    rank (each value is reduced over the ranks that hold the param)."""
    from dist_cautious.integrations.deepspeed import _managed_params, _piece_of, get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in _managed_params(engine):
        optimizer, _, piece = _piece_of(param)
        entry = {}
        for key in per_tensor_keys(optimizer, piece.global_shape):
            value = get_full_optimizer_state(param, key)
            if value is not None:
                entry[key] = value.cpu()
        out[name] = entry
    return out


def extend_state_dict(state_dict: dict[str, Any], per_tensor: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, Any]:
    """``state_dict`` (a ZeRO wrapper's) with what the universal converter needs; the live
    optimizer state is not touched (entries are copied, not mutated). ``per_tensor`` is what
    ``gather_per_tensor_state`` returned when the checkpoint save began (``None`` outside one)."""
    base = _base_state(state_dict)
    for index, entry in list(base.items()):
        if "exp_avg" in entry and "exp_avg_sq" not in entry:
            exp_avg = entry["exp_avg"]
            placeholder = torch.zeros(1, dtype=exp_avg.dtype, device=exp_avg.device).expand(exp_avg.numel())
            base[index] = {**entry, "exp_avg_sq": placeholder}
    if per_tensor is not None:
        state_dict[PER_TENSOR_KEY] = per_tensor
    return state_dict


def drop_placeholders(optimizer: Any) -> None:
    """Remove a partition-shaped ``exp_avg_sq`` from partitions whose optimizer keeps none."""
    if "exp_avg_sq" in optimizer.partition_state_keys:
        return
    for state in optimizer.state.values():
        if isinstance(state, dict):
            state.pop("exp_avg_sq", None)


def restore_per_tensor_state(engine: Any, checkpoint_folder: str) -> None:
    """Set every param's per-tensor state from a universal checkpoint's
    ``zero/optimizer_state.pt`` (no communication: every rank reads the full values)."""
    from dist_cautious.integrations.deepspeed import _managed_params, set_full_optimizer_state

    path = os.path.join(checkpoint_folder, "zero", "optimizer_state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False).get(PER_TENSOR_KEY)
    optimizer = engine.basic_optimizer
    managed = dict(_managed_params(engine))
    if saved is None:
        from dist_cautious.optim import CautiousAdamW

        if isinstance(optimizer, CautiousAdamW) and not any(group.get("amsgrad") for group in optimizer.param_groups):
            drop_placeholders(optimizer)
            return  # written without the integration: exp_avg / exp_avg_sq / step are all AdamW has
        raise ValueError(
            f"dist_cautious: {path} has no {PER_TENSOR_KEY!r}: the checkpoint was saved without dist_cautious's DeepSpeed "
            f"integration, so {type(optimizer).__name__}'s per-tensor state (step, CAME's factors, amsgrad's maximum) is not in it"
        )
    missing = sorted(set(managed) - set(saved))
    if missing:
        raise ValueError(f"dist_cautious: the universal checkpoint has no per-tensor state for {missing}")
    for name, param in managed.items():
        for key, value in saved[name].items():
            set_full_optimizer_state(param, key, value)
    drop_placeholders(optimizer)


def enable(engine: Any) -> None:
    """Hook the engine and its ZeRO wrapper: ``save_checkpoint`` first gathers the per-tensor
    state, ``state_dict`` is extended for the converter, ``_load_universal_checkpoint`` is
    followed by the per-tensor restore and ``load_state_dict`` by dropping the placeholder.
    Instance attributes: other engines are untouched."""
    wrapper = engine.optimizer
    if getattr(wrapper, "_dist_cautious_universal", False):
        return
    optimizer = engine.basic_optimizer
    original_save: Callable[..., Any] = engine.save_checkpoint
    original_state_dict: Callable[..., dict[str, Any]] = wrapper.state_dict
    original_load_universal = getattr(wrapper, "_load_universal_checkpoint", None)
    original_load_state_dict = wrapper.load_state_dict
    gathered: list[dict[str, dict[str, torch.Tensor]] | None] = [None]

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        gathered[0] = gather_per_tensor_state(engine)  # a collective: every rank saves
        try:
            return original_save(*args, **kwargs)
        finally:
            gathered[0] = None

    def state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return extend_state_dict(original_state_dict(*args, **kwargs), gathered[0])

    def load_universal(checkpoint_folder: str, load_optimizer_states: bool, load_from_fp32_weights: bool) -> Any:
        out = original_load_universal(checkpoint_folder, load_optimizer_states, load_from_fp32_weights)
        if load_optimizer_states:
            restore_per_tensor_state(engine, checkpoint_folder)
        return out

    def load_state_dict(*args: Any, **kwargs: Any) -> Any:
        out = original_load_state_dict(*args, **kwargs)
        drop_placeholders(optimizer)
        return out

    engine.save_checkpoint = save_checkpoint
    wrapper.state_dict = state_dict
    if original_load_universal is not None:
        wrapper._load_universal_checkpoint = load_universal
    wrapper.load_state_dict = load_state_dict
    wrapper._dist_cautious_universal = True


__all__ = ["PER_TENSOR_KEY", "enable", "extend_state_dict", "gather_per_tensor_state", "restore_per_tensor_state", "drop_placeholders"]
