"""CAME (arXiv 2307.02047), optionally cautious; ``cautious=False`` is exactly came-pytorch 0.1.3.

Factored second moments for tensors with ``ndim >= 2`` (over the last two dims; leading dims are
a batch of matrices), a confidence term from the residual ``(uh - m)^2``, an RMS clip of the
preconditioned update, no bias correction. Every mean is over the WHOLE original tensor, so a
step runs in four phases around three batched reductions (one all-reduce per process group
each): (1) row/col sums of ``g^2 + eps1``; (2) the update's sum of squares for the RMS clip;
(3) residual row/col sums and, if cautious, mask counts. Row/column state is small and kept
replicated on every rank that holds a piece of the tensor. The native CPU kernels fold (2) into
(1)'s pass over whole rows and carry the mask from (3) to the apply as bits (docs/cpu_kernels.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from dist_cautious.kernels.reference import CameFactors, FactorBuffers, FactorList
from dist_cautious.optim.base import (
    Batch, FragmentOptimizer, Work, cautious_decay_options, check_betas, check_flag, check_lr, check_nonnegative, kernels_for_group,
)  # fmt: skip
from dist_cautious.optim.capturable import lr_and_decay
from dist_cautious.shard.fragment import Fragment
from dist_cautious.shard.reducer import BatchedReducer


def _factor_shapes(shape: torch.Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row state ``S[:-1]`` and column state ``S[:-2] + S[-1:]``, as came-pytorch stores them."""
    return tuple(shape[:-1]), tuple(shape[:-2]) + tuple(shape[-1:])


def _normalised_rsqrt(rows: Tensor, cols: Tensor, rows_per_matrix: int) -> tuple[Tensor, Tensor, Tensor]:
    """CAME's ``rsqrt(r / mean(r))`` (mean over each matrix's rows), ``rsqrt(c)``, and the means."""
    by_matrix = rows.view(-1, rows_per_matrix)
    means = by_matrix.mean(dim=-1, keepdim=True)
    row_factor = (by_matrix / means).rsqrt().view(-1)
    return row_factor, cols.rsqrt(), means.view(-1)


def _ema_(state: Tensor, beta: float, sums: Tensor, count: int) -> None:
    """``state = beta state + (1 - beta) mean``, the mean being ``sums / count``."""
    state.mul_(beta).add_(sums / count, alpha=1 - beta)


class CAME(FragmentOptimizer):
    """Confidence-guided Adaptive Memory Efficient optimizer, exact under any sharding.

    State: ``exp_avg`` (like the param); factored tensors ``exp_avg_sq_row`` (``S[:-1]``),
    ``exp_avg_sq_col`` (``S[:-2] + S[-1:]``), ``exp_avg_res_row``, ``exp_avg_res_col``; 1-D and
    0-D tensors ``exp_avg_sq``; and ``step``; all fp32, float64 for float64 params.
    ``maximize=True`` steps on the negated gradient, as torch.optim's optimizers do.
    ``cautious_weight_decay`` (CWD, arXiv 2510.12402) decays only where the update and the param
    agree in sign; independent of ``cautious``; it runs the torch reference ops.
    ``capturable=True``: a tensor ``lr`` and the step counts stay on the device, so a CUDA graph
    can capture the step (``optim.capturable``).
    """

    #: only ``exp_avg`` is per element for every tensor: under ZeRO, the 1-D / 0-D tensors'
    #: ``exp_avg_sq`` is kept per tensor, so the factored tensors hold no second moment per element
    partition_state_keys = ("exp_avg",)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Optional[float] = None,
        eps: tuple[float, float] = (1e-30, 1e-16),
        clip_threshold: float = 1.0,
        betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
        weight_decay: float = 0.0,
        cautious: bool = False,
        *,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        if lr is None:
            raise ValueError("CAME: lr is required (there is no default; 2e-4 is typical)")
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay, cautious=cautious,
            cautious_weight_decay=cautious_weight_decay, maximize=maximize, capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults)

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], self._owner)
        group["betas"] = check_betas(group["betas"], 3, self._owner)
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"{self._owner}: eps must be two numbers (eps1, eps2), got {eps!r}")
        for index, value in enumerate(eps):
            check_nonnegative(value, f"eps[{index}]", self._owner)
        group["eps"] = tuple(float(value) for value in eps)
        check_nonnegative(group["weight_decay"], "weight_decay", self._owner)
        threshold = group["clip_threshold"]
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"{self._owner}: clip_threshold must be a finite number > 0, got {threshold!r}")
        for flag in ("cautious", "cautious_weight_decay", "maximize", "capturable"):
            check_flag(group.setdefault(flag, False), flag, self._owner)

    def step_fragments(self, work: Work) -> None:
        plan = self._came_plan_for(work)
        for batch in plan.batches:
            self.step_counts(batch.fragments)  # advanced once per step
        self._second_moment_factors(plan)
        clip_divisors = self._rms_clip_divisors(plan)
        scales, pending = self._momentum_and_confidence(plan, clip_divisors)
        for batch, batch_scales, batch_pending in zip(plan.batches, scales, pending):
            group, fragments = batch.group, batch.fragments
            ops = kernels_for_group(group, fragments)
            params, grads = [f.param for f in fragments], [f.grad for f in fragments]
            hyper = dict(lr_and_decay(batch.source), scales=batch_scales, **cautious_decay_options(batch.source))
            if group["cautious"]:
                ops.came_cautious_finish(batch_pending, params, grads, batch.exp_avgs, batch.confidence, **hyper)
            else:
                ops.came_apply(params, grads, batch.exp_avgs, batch.confidence, **hyper)

    def _came_plan_for(self, work: Work) -> "_CamePlan":
        """The factor layout of this step: the one kept with the step plan in use while the
        state it installed still holds, else built now (and kept, if a step plan is in use).
        Without a step plan (params stepped on copies) it is built every step and copies the
        factor state in and out instead of owning it. ``_came_plan``: the one in use."""
        step_plan = getattr(self, "_plan_in_use", None)
        step_batches = self.batches_of(work)
        kept = step_plan.kept.get("came") if step_plan is not None else None
        if kept is None or kept.source is not step_batches or not kept.still_valid():
            kept = _CamePlan(step_batches, owns_state=step_plan is not None)
            if step_plan is not None:
                step_plan.kept["came"] = kept
        self._came_plan = kept if step_plan is not None else None
        return kept

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``FragmentOptimizer.load_state_dict``; the factor layout, which owns the old factor
        state, is dropped with the step plan."""
        self._came_plan = None
        super().load_state_dict(state_dict)

    def _second_moment_factors(self, plan: "_CamePlan") -> None:
        """Phase 1 + reduction 1: update the second moments; each batch's ``factors`` are then
        the preconditioners of this step."""
        reducer = BatchedReducer()
        plan.zero_sums(0)
        folded_by_batch = []
        for batch in plan.batches:
            group, ops = batch.group, kernels_for_group(batch.group, batch.fragments)
            eps1, beta2 = group["eps"][0], group["betas"][1]
            folded: list[Optional[Tensor]] = []
            if batch.factored:
                batch.folded_buffer.zero_()
                folded = ops.came_factored_sq_sums_begin(
                    [f.grad for f in batch.factored], batch.layouts, eps1, batch.row_sums[0], batch.col_sums[0],
                    row_states=batch.row_states, beta2=beta2, folded=batch.folded,
                )  # fmt: skip
            if batch.vectors:  # through the dispatcher (a mode, a tracer) an op needs a tensor argument
                ops.came_vector_second_moment([f.grad for f in batch.vectors], batch.vector_exp_avg_sqs, beta2, eps1)
            folded_by_batch.append(folded)
        plan.reduce_sums(0, reducer)
        reducer.all_reduce()
        for batch, folded in zip(plan.batches, folded_by_batch):
            ops = kernels_for_group(batch.group, batch.fragments)
            for segment in batch.segments:
                segment.update("exp_avg_sq", batch.group["betas"][1], ops)
            batch.choose_factors(folded)

    def _rms_clip_divisors(self, plan: "_CamePlan") -> list[Tensor]:
        """Phase 2 + reduction 2: ``max(1, RMS(uh) / d)`` per tensor, RMS over the whole tensor."""
        reducer = BatchedReducer()
        sumsqs = []
        for batch in plan.batches:
            batch_sumsq = kernels_for_group(batch.group, batch.fragments).came_update_sumsq([f.grad for f in batch.fragments], batch.factors)
            batch.reduce_per_tensor(batch_sumsq, reducer)
            sumsqs.append(batch_sumsq)
        reducer.all_reduce()
        return [
            kernels_for_group(batch.group, batch.fragments).came_clip_divisors(batch_sumsq, batch.sqrt_sizes, batch.group["clip_threshold"])
            for batch, batch_sumsq in zip(plan.batches, sumsqs)
        ]

    def _momentum_and_confidence(self, plan: "_CamePlan", clip_divisors: list[Tensor]) -> tuple[list[Optional[Tensor]], list[object]]:
        """Phase 3 + reduction 3: momentum, residual sums and mask counts; update each batch's
        ``confidence`` factors, return the mask scales (``None`` where not cautious) and what the
        kernels keep for the apply phase of cautious groups (``came_cautious_begin``)."""
        reducer = BatchedReducer()
        plan.zero_sums(1)
        pending = []
        for batch, divisors in zip(plan.batches, clip_divisors):
            group, fragments, ops = batch.group, batch.fragments, kernels_for_group(batch.group, batch.fragments)
            args = ([f.grad for f in fragments], batch.exp_avgs, batch.factors, divisors)
            kwargs = dict(beta1=group["betas"][0], eps2=group["eps"][1], res_row_sums=batch.res_row_sums, res_col_sums=batch.res_col_sums)
            kept = None
            if group["cautious"]:
                counts, kept = ops.came_cautious_begin(*args, **kwargs)
                batch.reduce_per_tensor(counts, reducer)
            else:
                counts = ops.came_momentum(*args, **kwargs)
            pending.append((counts, kept))
        plan.reduce_sums(1, reducer)
        reducer.all_reduce()
        scales = []
        for batch, (counts, _) in zip(plan.batches, pending):
            ops = kernels_for_group(batch.group, batch.fragments)
            for segment in batch.segments:
                segment.update("exp_avg_res", batch.group["betas"][2], ops)
            scales.append(ops.mask_scales(counts, batch.sizes) if batch.group["cautious"] else None)
        return scales, [kept for _, kept in pending]


#: per-matrix row means over runs of matrices of this many rows or more are taken one tensor at a
#: time: from torch's reduction grain size (32768) on, a mean with one output may be split over
#: threads, so batching it with other matrices could change its sum order; below it each row of a
#: batched ``(N, R).mean(dim=-1)`` is summed exactly as ``(B, R).mean(dim=-1)`` of its tensor
_BATCHED_MEAN_MAX_ROWS = 32768
_PHASES = 2  # partial-sum phases: (g^2 + eps1) sums, residual sums


class _FactorStore:
    """One replicated state key (``exp_avg_sq_row`` ...) of a segment's fragments in ONE flat
    buffer (in the segment's state dtype), so that an EMA over all of them is one op.

    ``owns_state``: the state dict entries become views into the buffer (kept with the step
    plan; ``installed`` checks each step that nobody replaced them). Otherwise the buffer is a
    copy made now, and ``store`` writes it back into the separate state tensors."""

    def __init__(self, fragments: list[Fragment], key: str, shapes: list[tuple[int, ...]], owns_state: bool, dtype: torch.dtype) -> None:
        self.key = key
        states = [f.factor_state(key, shape) for f, shape in zip(fragments, shapes)]
        self.flat = torch.cat(states).to(dtype) if states else torch.zeros(0, dtype=dtype)
        self.views = list(self.flat.split([math.prod(shape) for shape in shapes]))
        self.targets: Optional[list[Tensor]] = None
        #: with ``owns_state``: the state dicts and the views installed in them under ``key``
        self.owned_dicts: list[dict[str, Any]] = []
        self.owned: list[Tensor] = []
        if owns_state:
            for fragment, view, shape in zip(fragments, self.views, shapes):
                fragment.state[key] = view.view(shape)
                self.owned_dicts.append(fragment.state)
                self.owned.append(fragment.state[key])
        else:
            self.targets = states

    def store(self) -> None:
        """Write the buffer back into the state tensors it was copied from (one op), if a copy."""
        if self.targets is not None:
            torch._foreach_copy_(self.targets, self.views)

    def installed(self) -> bool:
        """Every state entry this store installed is still the one in its state dict."""
        return all(map(operator.is_, map(dict.get, self.owned_dicts, itertools.repeat(self.key)), self.owned))


class _Segment:
    """The factored fragments of one batch (param group, device) whose sums are reduced over one
    process group, ordered by rows per matrix ``R`` (stably, the same on every rank: from global
    shapes only). Their row / column states, partial sums and factors live in flat buffers, so
    each step of the factor math is one op over all of them; the per-matrix row means take one
    op per run of equal ``R``."""

    def __init__(self, group: Optional[dist.ProcessGroup], fragments: list[Fragment], owns_state: bool) -> None:
        self.group = group
        self.fragments = sorted(fragments, key=lambda f: f.global_shape[-2])
        self.device = device = self.fragments[0].param.device
        self.dtype = dtype = self.fragments[0].state_dtype
        shapes = [_factor_shapes(f.global_shape) for f in self.fragments]
        row_sizes = [math.prod(rows) for rows, _ in shapes]
        col_sizes = [math.prod(cols) for _, cols in shapes]
        self.num_rows, self.num_cols = sum(row_sizes), sum(col_sizes)
        # per element, what its sum is divided by for a mean: C for a row sum, R for a column sum
        self.row_counts = torch.cat([torch.full((n,), float(f.global_shape[-1]), dtype=dtype) for f, n in zip(self.fragments, row_sizes)]).to(device)
        self.col_counts = torch.cat([torch.full((n,), float(f.global_shape[-2]), dtype=dtype) for f, n in zip(self.fragments, col_sizes)]).to(device)
        self.stores = {
            key: _FactorStore(self.fragments, key, [shape[axis] for shape in shapes], owns_state, dtype)
            for key, axis in (("exp_avg_sq_row", 0), ("exp_avg_sq_col", 1), ("exp_avg_res_row", 0), ("exp_avg_res_col", 1))
        }
        # runs of matrices with equal R: (first row, number of rows, R)
        runs: list[list[int]] = []
        row_offset = 0
        for fragment, size in zip(self.fragments, row_sizes):
            rows_per_matrix = fragment.global_shape[-2]
            if runs and runs[-1][2] == rows_per_matrix < _BATCHED_MEAN_MAX_ROWS:
                runs[-1][1] += size
            else:
                runs.append([row_offset, size, rows_per_matrix])
            row_offset += size
        self.runs = [tuple(run) for run in runs]
        self.num_matrices = sum(size // rows for _, size, rows in self.runs)
        self.row_sizes, self.col_sizes = row_sizes, col_sizes
        self.outputs = {prefix: _Factors(self, device) for prefix in ("exp_avg_sq", "exp_avg_res")}
        self.factor_buffers: dict[str, FactorBuffers] = {}  # per prefix, made by attach_sums
        self.sums: list[tuple[Tensor, Tensor]] = []  # per phase: views into the plan's packed buffer

    def attach_sums(self, buffers: list[Tensor], offset: int) -> None:
        """Take rows then columns at ``offset`` of each phase's packed partial-sum buffer."""
        self.sums = [(buffer[offset : offset + self.num_rows], buffer[offset + self.num_rows : offset + self.num_rows + self.num_cols]) for buffer in buffers]
        runs = tuple((rows_per_matrix, count) for _, count, rows_per_matrix in self.runs)
        self.factor_buffers = {}
        for phase, prefix in enumerate(("exp_avg_sq", "exp_avg_res")):
            out = self.outputs[prefix]
            self.factor_buffers[prefix] = FactorBuffers(
                self.stores[f"{prefix}_row"].flat, self.stores[f"{prefix}_col"].flat, *self.sums[phase], self.row_counts, self.col_counts,
                runs, out.row, out.col, out.means,
            )  # fmt: skip

    def sum_views(self, phase: int) -> tuple[list[Tensor], list[Tensor]]:
        rows, cols = self.sums[phase]
        return list(rows.split(self.row_sizes)), list(cols.split(self.col_sizes))

    def update(self, prefix: str, beta: float, ops: Any) -> None:
        """Fold this step's reduced sums into the ``{prefix}_row`` / ``_col`` state and
        recompute the normalised factors (per element the math of ``_ema_`` and
        ``_normalised_rsqrt`` on each tensor): one ``came_factor_update`` of the kernel set
        ``ops`` over the flat buffers of all the segment's tensors."""
        ops.came_factor_update(self.factor_buffers[prefix], beta)
        self.stores[f"{prefix}_row"].store()
        self.stores[f"{prefix}_col"].store()


class _Factors:
    """A segment's normalised factors ``rsqrt(r / mean(r))`` and ``rsqrt(c)`` and the per-matrix
    means, in flat buffers rewritten in place every step (``came_factor_update``); the
    per-fragment views the kernels read are made once."""

    def __init__(self, segment: _Segment, device: torch.device) -> None:
        self.row = torch.empty(segment.num_rows, dtype=segment.dtype, device=device)
        self.col = torch.empty(segment.num_cols, dtype=segment.dtype, device=device)
        self.means = torch.empty(segment.num_matrices, dtype=segment.dtype, device=device)
        self.row_views = list(self.row.split(segment.row_sizes))
        self.col_views = list(self.col.split(segment.col_sizes))
        self.mean_views = list(self.means.split([size // f.global_shape[-2] for f, size in zip(segment.fragments, segment.row_sizes)]))


class _CameBatch:
    """One ``Batch`` of a step (param groups that share kernel calls, one device): its fragments
    in order, their segments, and the per-fragment lists the kernels take (views into the
    segments' buffers), made once."""

    def __init__(self, source: Batch, owns_state: bool) -> None:
        self.source = source
        self.group, self.fragments = source.group, source.fragments
        fragments = self.fragments
        self.factored = [f for f in fragments if f.factored]
        self.vectors = [f for f in fragments if not f.factored]
        by_group: dict[Optional[dist.ProcessGroup], list[Fragment]] = {}
        for fragment in self.factored:
            by_group.setdefault(fragment.group, []).append(fragment)
        self.segments = [_Segment(pg, members, owns_state) for pg, members in by_group.items()]
        self.exp_avgs = [f.elementwise_state("exp_avg") for f in fragments]
        self.vector_exp_avg_sqs = [f.elementwise_state("exp_avg_sq") for f in self.vectors]
        #: kept with a step plan (plain tensors, DTensors): (state dict, key, tensor) of the
        #: elementwise state viewed above, which ``still_valid`` checks is still in place
        self.viewed: tuple[list[dict[str, Any]], list[str], list[Tensor]] = ([], [], [])
        if owns_state:
            for fragment in fragments:
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in fragment.state:
                        self.viewed[0].append(fragment.state)
                        self.viewed[1].append(key)
                        self.viewed[2].append(fragment.state[key])
        device, dtype = fragments[0].param.device, fragments[0].state_dtype
        self.sizes = torch.tensor([f.numel for f in fragments], dtype=dtype, device=device)
        self.sqrt_sizes = self.sizes.sqrt()
        # per-tensor values (sums of squares, mask counts) to reduce: one entry per process group
        positions: dict[dist.ProcessGroup, list[int]] = {}
        for index, fragment in enumerate(fragments):
            if fragment.group is not None:
                positions.setdefault(fragment.group, []).append(index)
        self.per_tensor_reductions = [
            (pg, None if len(indices) == len(fragments) else torch.tensor(indices, dtype=torch.long, device=device)) for pg, indices in positions.items()
        ]
        col_total = sum(segment.num_cols for segment in self.segments)
        self.folded_buffer = torch.zeros(col_total, dtype=dtype, device=device)
        self.folded: list[Optional[Tensor]] = []
        self.factors: list[CameFactors] = []
        self.confidence: list[CameFactors] = []

    def finish(self) -> None:
        """After the plan attached the packed sums: the kernels' lists, in fragment order."""
        where = {id(f): (segment, i) for segment in self.segments for i, f in enumerate(segment.fragments)}
        sums = [[segment.sum_views(phase) for segment in self.segments] for phase in range(_PHASES)]
        seg_index = {id(segment): k for k, segment in enumerate(self.segments)}

        def pick(f: Fragment) -> tuple[_Segment, int, int]:
            segment, i = where[id(f)]
            return segment, i, seg_index[id(segment)]

        located = [pick(f) for f in self.factored]
        self.layouts = [f.layout() for f in self.factored]
        self.row_sums = [[sums[phase][k][0][i] for _, i, k in located] for phase in range(_PHASES)]
        self.col_sums = [[sums[phase][k][1][i] for _, i, k in located] for phase in range(_PHASES)]
        self.row_states = [segment.stores["exp_avg_sq_row"].views[i] for segment, i, _ in located]
        self.folded = list(self.folded_buffer.split([segment.col_sizes[i] for segment, i, _ in located]))
        res_rows = dict(zip(map(id, self.factored), self.row_sums[1]))
        res_cols = dict(zip(map(id, self.factored), self.col_sums[1]))
        self.res_row_sums = [res_rows.get(id(f)) for f in self.fragments]
        self.res_col_sums = [res_cols.get(id(f)) for f in self.fragments]
        vector_factors = {id(f): CameFactors(elementwise=v) for f, v in zip(self.vectors, self.vector_exp_avg_sqs)}

        def factors(prefix: str, folded: bool) -> list[CameFactors]:
            made = {}
            for (segment, i, _), f, layout, fold in zip(located, self.factored, self.layouts, self.folded):
                out = segment.outputs[prefix]
                extra = dict(folded=fold, row_means=out.mean_views[i]) if folded else {}
                made[id(f)] = CameFactors(layout, out.row_views[i], out.col_views[i], **extra)
            return FactorList(made.get(id(f)) or vector_factors.get(id(f)) or CameFactors() for f in self.fragments)

        self.plain_factors = factors("exp_avg_sq", folded=False)
        self.folded_factors = factors("exp_avg_sq", folded=True)
        confidence = {id(f): c for f, c in zip(self.fragments, factors("exp_avg_res", folded=False)) if f.factored}
        self.confidence = FactorList(confidence.get(id(f)) or CameFactors() for f in self.fragments)

    def choose_factors(self, folded: Sequence[Optional[Tensor]]) -> None:
        """This step's preconditioners: with the folded sums if the kernels filled the buffers
        handed to them, without if they folded nothing."""
        if folded is self.folded or not self.factored:
            self.factors = self.folded_factors if self.factored else self.plain_factors
        elif all(fold is None for fold in folded):
            self.factors = self.plain_factors
        else:  # a kernel set that folded into buffers of its own
            by_id = dict(zip(map(id, self.factored), folded))
            self.factors = []
            for fragment, factor in zip(self.fragments, self.folded_factors):
                if fragment.factored:
                    fold = by_id[id(fragment)]
                    factor = dataclasses.replace(factor, folded=fold, row_means=factor.row_means if fold is not None else None)
                self.factors.append(factor)

    def reduce_per_tensor(self, values: Tensor, reducer: BatchedReducer) -> None:
        """Register one value per fragment (``values[i]`` for fragment ``i``) for reduction over
        the fragment's process group; whole local tensors are not reduced."""
        for pg, index in self.per_tensor_reductions:
            reducer.add(pg, values, index)

    def still_valid(self) -> bool:
        states, keys, tensors = self.viewed
        if not all(map(operator.is_, map(dict.get, states, keys), tensors)):
            return False
        return all(store.installed() for segment in self.segments for store in segment.stores.values())


class _CamePlan:
    """CAME's layout of a step: the batches, and per phase ONE zeroed partial-sum buffer per
    process group (and device and dtype) that every fragment's row / column sums are views
    into, reduced in place."""

    def __init__(self, batches: list[Batch], owns_state: bool) -> None:
        #: the step's batches this layout was made for (``CAME._came_plan_for`` rebuilds it when
        #: they are made anew)
        self.source = batches
        self.batches = [_CameBatch(batch, owns_state) for batch in batches]
        # keyed by (process group, device, dtype): a buffer is one tensor
        sizes: dict[tuple[Optional[dist.ProcessGroup], torch.device, torch.dtype], int] = {}
        for batch in self.batches:
            for segment in batch.segments:
                key = (segment.group, segment.device, segment.dtype)
                sizes[key] = sizes.get(key, 0) + segment.num_rows + segment.num_cols
        self.sums: list[dict[tuple[Optional[dist.ProcessGroup], torch.device, torch.dtype], Tensor]] = [
            {key: torch.zeros(size, dtype=key[2], device=key[1]) for key, size in sizes.items()} for _ in range(_PHASES)
        ]
        offsets = dict.fromkeys(sizes, 0)
        for batch in self.batches:
            for segment in batch.segments:
                key = (segment.group, segment.device, segment.dtype)
                segment.attach_sums([self.sums[phase][key] for phase in range(_PHASES)], offsets[key])
                offsets[key] += segment.num_rows + segment.num_cols
            batch.finish()

    def zero_sums(self, phase: int) -> None:
        for buffer in self.sums[phase].values():
            buffer.zero_()

    def reduce_sums(self, phase: int, reducer: BatchedReducer) -> None:
        for (pg, _, _), buffer in self.sums[phase].items():
            reducer.add(pg, buffer)

    def still_valid(self) -> bool:
        return all(batch.still_valid() for batch in self.batches)
