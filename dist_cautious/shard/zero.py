"""DeepSpeed ZeRO: fragments of the original tensors inside DeepSpeed's flat fp32 partitions.

DeepSpeed hands its basic optimizer one flat fp32 tensor per param group (ZeRO-1/2, and its
bf16 optimizer wrapper) or per sub-group (ZeRO-3), with ``.grad`` set to the matching flat
gradient. The optimizer state DeepSpeed checkpoints, converts to universal checkpoints and reads
back through ``safe_get_full_optimizer_state`` is keyed by that flat tensor and shaped like it.
So per-element state that EVERY tensor has (the optimizer's ``partition_state_keys``:
``exp_avg``, and AdamW's ``exp_avg_sq``) stays flat, partition-shaped, in ``state[flat]``.
Everything else lives in ``state[flat]["per_tensor"][index]``, ``index`` being the tensor's
position in DeepSpeed's list of params for that flat tensor (the same on every rank): what
belongs to one original tensor (the step count, CAME's replicated row and column factors), and
per-element state that only some tensors have (CAME's ``exp_avg_sq`` of 1-D / 0-D tensors),
sized by the tensor's local piece. A partition-shaped buffer for the latter would give CAME
AdamW's memory: the factored tensors that make up nearly all elements would hold zeros in it.

Where the pieces come from:

- ZeRO-1/2 and the bf16 wrapper: each original ("lp") param's ``_hp_mapping`` gives the range
  in the flat partition (``hp_fragment_address``) and the range in the tensor
  (``lp_fragment_address``); partitions cut tensors anywhere, mid-row included. A param with no
  element on this rank has ``_hp_mapping is None``.
- ZeRO-3: rank ``r`` of the param's partition group holds elements
  ``[r * partition_numel, min((r + 1) * partition_numel, ds_numel))`` of every param; the
  sub-group's flat fp32 tensor holds the params' (padded) partitions back to back, at the
  offsets of ``grad_position``.

Every rank yields a fragment for every tensor of the flat tensor being stepped, in DeepSpeed's
order, an empty one where it holds nothing: the optimizers then register the same reductions in
the same order on every rank of the group (the reducer relies on it).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_cautious.shard.fragment import Fragment

#: key of the per-tensor state dicts inside the state of a flat partition
PER_TENSOR = "per_tensor"


@dataclass(frozen=True)
class Piece:
    """Where one original tensor's local elements sit in a flat fp32 partition.

    ``flat_offset`` is the position in the flat partition, ``start`` the flat index in the
    original tensor, ``numel`` the local element count (0 when this rank holds none).
    """

    index: int
    name: str
    param: Tensor  # the original (lp) param, kept for shape and for full-state access
    global_shape: torch.Size
    flat_offset: int
    start: int
    numel: int
    group: Optional[dist.ProcessGroup]


@dataclass
class PartitionFragment(Fragment):
    """A fragment of a flat partition. Per-element state of ``partition_keys`` lives in the flat
    partition's state (shaped like the partition, as DeepSpeed's checkpoints expect); any other
    per-element key is kept compact in the per-tensor dict, sized by this rank's piece."""

    partition_state: dict[str, Any] = field(default_factory=dict)
    partition: Optional[Tensor] = None
    flat_offset: int = 0
    partition_keys: frozenset[str] = frozenset()

    def state_holder(self, key: str) -> dict[str, Any]:
        return self.partition_state if key in self.partition_keys else self.state

    def elementwise_state(self, key: str) -> Tensor:
        assert self.partition is not None
        holder = self.state_holder(key)
        full = holder.get(key)
        if full is None:
            size = self.partition.numel() if holder is self.partition_state else self.local_numel
            full = holder[key] = torch.zeros(size, dtype=self.state_dtype, device=self.partition.device)
        cached = self._views.get(key)
        if cached is not None and cached[0] is full:
            return cached[1]  # a fragment a step plan keeps (``Partition``): the view of last step
        view = full.view(-1) if holder is self.state else full.view(-1).narrow(0, self.flat_offset, self.local_numel)
        self._views[key] = (full, view)
        return view


def tensor_state(partition_state: dict[str, Any], index: int) -> dict[str, Any]:
    """The per-tensor state dict of tensor ``index``, created on first use. A partition-level
    ``step`` (what a DeepSpeed universal checkpoint restores) seeds a missing per-tensor step."""
    per_tensor = partition_state.setdefault(PER_TENSOR, {})
    if index not in per_tensor:
        per_tensor[index] = {}
        if "step" in partition_state:
            per_tensor[index]["step"] = torch.as_tensor(partition_state["step"], dtype=torch.float32).clone()
    return per_tensor[index]


def _sync_partition_step(partition_state: dict[str, Any], state: dict[str, Any]) -> Callable[[], None]:
    """After a step, mirror the per-tensor step into ``state[flat]["step"]``: every tensor of
    a flat partition steps together under DeepSpeed, and its universal checkpoint reads it."""

    def sync() -> None:
        if "step" in state:
            partition_state["step"] = state["step"].clone()

    return sync


def fragment_of(
    piece: Piece, partition: Tensor, partition_state: dict[str, Any], partition_keys: frozenset[str], sync_step: bool = True
) -> PartitionFragment:
    """The fragment of ``piece`` (possibly empty) in the flat ``partition`` being stepped;
    per-element state of ``partition_keys`` is partition-shaped, other keys per tensor.
    ``sync_step``: the fragment mirrors its step into the partition's state when committed
    (``Partition``, which keeps its fragments, does it once for all of them instead)."""
    state = tensor_state(partition_state, piece.index)
    flat_param = partition.data.view(-1)
    flat_grad = partition.grad.view(-1)
    lo, n = (piece.flat_offset, piece.numel) if piece.numel else (0, 0)
    return PartitionFragment(
        param=flat_param.narrow(0, lo, n),
        grad=flat_grad.narrow(0, lo, n),
        state=state,
        global_shape=piece.global_shape,
        start=piece.start,
        end=piece.start + n,
        group=piece.group,
        new_elementwise_state=_unused_factory,
        local_view=_unused_view,
        name=piece.name,
        writeback=_sync_partition_step(partition_state, state) if sync_step else None,
        partition_state=partition_state,
        partition=partition,
        flat_offset=lo,
        partition_keys=partition_keys,
    )


class Partition:
    """The fragments of one flat partition, made once and kept by a step plan (issue 12): the
    views, names and checks of ``fragment_of`` are not redone every step.

    DeepSpeed hands over a new flat gradient most steps (ZeRO-1/2 without offload flatten it
    anew); ``rebind_grad`` then gives every fragment its view of it with ONE ``split`` of the
    flat gradient at the pieces' boundaries, not one ``narrow`` per tensor. The step of every
    piece is mirrored into the partition's own ``step`` (what DeepSpeed's universal checkpoint
    reads) once per step, by ``sync_step``: every piece of a partition steps together. The
    gradient is let go after each step (``release_grad``): holding it would keep DeepSpeed's
    flat gradient partition alive through the next forward and backward.
    """

    def __init__(self, flat: Tensor, pieces: list[Piece], partition_state: dict[str, Any], partition_keys: frozenset[str]) -> None:
        self.flat = flat
        self.partition_state = partition_state
        self.fragments = [fragment_of(piece, flat, partition_state, partition_keys, sync_step=False) for piece in pieces]
        self.per_tensor = partition_state[PER_TENSOR]
        self.partition_keys = sorted(partition_keys)
        #: the partition-shaped state tensors after the last step: replaced ones mean a rebuild
        self.kept_state: Optional[list[Any]] = None
        self.storage = flat.data_ptr()
        self.grad: Optional[Tensor] = flat.grad
        self.grad_dtype, self.grad_device, self.grad_numel = flat.grad.dtype, flat.grad.device, flat.grad.numel()
        self._split_sizes, self._positions = _split_layout(pieces, flat.numel())

    def rebind_grad(self) -> bool:
        """Point every fragment at the flat's current gradient; ``False`` when it cannot be done
        by views alone (another dtype, device or size, not contiguous): the plan is then
        built again."""
        grad = self.flat.grad
        if grad is self.grad:
            return True
        if grad.dtype != self.grad_dtype or grad.device != self.grad_device or grad.numel() != self.grad_numel or not grad.is_contiguous():
            return False
        views = grad.view(-1).split(self._split_sizes)
        for fragment, position in zip(self.fragments, self._positions):
            fragment.grad = views[position]
        self.grad = grad
        return True

    def release_grad(self) -> None:
        """After a step: let go of the gradient, which DeepSpeed frees (``flat.grad = None``)
        until the next backward; the next step binds the one it is handed then."""
        self.grad = None
        for fragment in self.fragments:
            fragment.grad = None  # type: ignore[assignment]

    def still_valid(self, state: dict[Tensor, dict[str, Any]]) -> bool:
        """The same flat storage and state dicts as when made, and the partition-shaped state
        of the last step still in place (a checkpoint load replaces these)."""
        partition_state = state.get(self.flat)
        if partition_state is not self.partition_state or partition_state.get(PER_TENSOR) is not self.per_tensor:
            return False
        if self.flat.data_ptr() != self.storage or self.flat.grad is None:
            return False
        return self.kept_state is None or all(map(operator.is_, map(partition_state.get, self.partition_keys), self.kept_state))

    def sync_step(self) -> None:
        """After a step: the partition's ``step`` from its pieces' (all equal), and note the
        partition-shaped state tensors in use."""
        stepped = next((fragment.state for fragment in self.fragments if "step" in fragment.state), None)
        if stepped is not None:
            self.partition_state["step"] = stepped["step"].clone()
        self.kept_state = [self.partition_state.get(key) for key in self.partition_keys]


def _split_layout(pieces: list[Piece], total: int) -> tuple[list[int], list[int]]:
    """Sizes that cut a flat tensor of ``total`` elements at every held piece's boundaries
    (gaps between pieces, ZeRO-3's padding, included as their own parts), and the part of each
    piece (an empty piece: an empty part at the front)."""
    held = sorted((p.flat_offset, p.numel, i) for i, p in enumerate(pieces) if p.numel)
    sizes, positions = [0], [0] * len(pieces)
    end = 0
    for offset, numel, index in held:
        if offset > end:
            sizes.append(offset - end)
        positions[index] = len(sizes)
        sizes.append(numel)
        end = offset + numel
    if total > end:
        sizes.append(total - end)
    return sizes, positions


def _unused_factory() -> Tensor:
    raise AssertionError("PartitionFragment keeps per-element state in the partition state")


def _unused_view(tensor: Tensor) -> Tensor:
    raise AssertionError("PartitionFragment keeps per-element state in the partition state")


Layout = dict[int, tuple[Tensor, list[Piece]]]


class ZeroFragmentSource:
    """The fragment source installed on a DeepSpeed basic optimizer (``optimizer.fragment_source``).

    ``build_layout`` maps ``id(flat partition)`` to ``(flat partition, pieces)``; it is rebuilt
    once if DeepSpeed hands over a flat tensor it has not seen (a reload that replaced it).
    ``partition_keys`` are the per-element state keys every tensor has, stored partition-shaped.
    """

    def __init__(self, build_layout: Callable[[], Layout], partition_keys: Iterable[str]) -> None:
        self._build_layout = build_layout
        self.layout: Layout = build_layout()
        self.partition_keys = frozenset(partition_keys)

    def pieces(self, flat: Tensor) -> list[Piece]:
        entry = self.layout.get(id(flat))
        if entry is None or entry[0] is not flat:
            self.layout = self._build_layout()
            entry = self.layout.get(id(flat))
        if entry is None or entry[0] is not flat:
            raise RuntimeError(
                "dist_cautious: the optimizer was handed a tensor that is not one of DeepSpeed's flat "
                f"fp32 partitions (shape {tuple(flat.shape)}); was it re-wrapped after deepspeed.initialize?"
            )
        return entry[1]

    def __call__(self, params: Iterable[Tensor], state: dict[Tensor, dict[str, Any]]) -> Iterator[Fragment]:
        for flat in params:
            if flat.grad is None:
                continue
            partition_state = state[flat]
            for piece in self.pieces(flat):
                yield fragment_of(piece, flat, partition_state, self.partition_keys)


def _name(names: dict[Tensor, str], param: Tensor, fallback: str) -> str:
    return names.get(param, fallback)


def zero12_layout(zero_optimizer: Any, names: dict[Tensor, str]) -> Layout:
    """Pieces of ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and bf16-wrapper (``BF16_Optimizer``)
    partitions, read from each lp param's ``_hp_mapping``."""
    if hasattr(zero_optimizer, "single_partition_of_fp32_groups"):
        flats, lp_groups = zero_optimizer.single_partition_of_fp32_groups, zero_optimizer.bit16_groups
    else:
        flats, lp_groups = zero_optimizer.fp32_groups_flat_partition, zero_optimizer.bf16_groups
    layout: Layout = {}
    for group_index, (flat, lp_params) in enumerate(zip(flats, lp_groups)):
        group = zero_optimizer.real_dp_process_group[group_index]
        pieces = []
        for index, lp in enumerate(lp_params):
            mapping = getattr(lp, "_hp_mapping", None)
            name = _name(names, lp, f"group{group_index}.param{index}")
            if mapping is None:
                pieces.append(Piece(index, name, lp, lp.shape, 0, 0, 0, group))
                continue
            hp, lp_address = mapping.hp_fragment_address, mapping.lp_fragment_address
            pieces.append(Piece(index, name, lp, lp.shape, hp.start, lp_address.start, hp.numel, group))
        layout[id(flat)] = (flat, pieces)
    return layout


def zero3_local_range(param: Tensor, rank: int) -> tuple[int, int]:
    """Flat range ``[start, end)`` of ``param`` held by partition rank ``rank`` under ZeRO-3."""
    per_rank = param.partition_numel()
    start = min(rank * per_rank, param.ds_numel)
    return start, min(start + per_rank, param.ds_numel)


def zero3_layout(zero_optimizer: Any, names: dict[Tensor, str]) -> Layout:
    """Pieces of ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``) sub-group partitions."""
    layout: Layout = {}
    for sub_group, (flat, params) in enumerate(zip(zero_optimizer.fp32_partitioned_groups_flat, zero_optimizer.fp16_groups)):
        pieces = []
        for index, param in enumerate(params):
            group = zero_optimizer._get_param_partition_group(param)
            start, end = zero3_local_range(param, dist.get_rank(group=group))
            _, flat_offset, _ = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
            name = _name(names, param, f"subgroup{sub_group}.param{index}")
            pieces.append(Piece(index, name, param, torch.Size(param.ds_shape), flat_offset, start, end - start, group))
        layout[id(flat)] = (flat, pieces)
    return layout
