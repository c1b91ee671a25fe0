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

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels.reference import CameFactors, mask_scales
from dist_cautious.optim.base import FragmentOptimizer, Work, by_group, check_betas, check_lr, check_nonnegative, kernels_for
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
    0-D tensors ``exp_avg_sq``; and ``step``.
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
    ) -> None:
        if lr is None:
            raise ValueError("CAME: lr is required (there is no default; 2e-4 is typical)")
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, betas=betas, weight_decay=weight_decay, cautious=cautious)
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

    def step_fragments(self, work: Work) -> None:
        batches = by_group(work)
        for _, fragments in batches:
            self.step_counts(fragments)  # advanced once per step
        factors = self._second_moment_factors(batches)
        clip_divisors = self._rms_clip_divisors(batches, factors)
        confidence, scales, pending = self._momentum_and_confidence(batches, factors, clip_divisors)
        for (group, fragments), batch_confidence, batch_scales, batch_pending in zip(batches, confidence, scales, pending):
            ops = kernels_for(fragments)
            params, grads = [f.param for f in fragments], [f.grad for f in fragments]
            exp_avgs = [f.elementwise_state("exp_avg") for f in fragments]
            hyper = dict(lr=float(group["lr"]), weight_decay=group["weight_decay"], scales=batch_scales)
            if group["cautious"]:
                ops.came_cautious_finish(batch_pending, params, grads, exp_avgs, batch_confidence, **hyper)
            else:
                ops.came_apply(params, grads, exp_avgs, batch_confidence, **hyper)

    def _second_moment_factors(self, batches: list[tuple[dict[str, Any], list[Fragment]]]) -> list[list[CameFactors]]:
        """Phase 1 + reduction 1: update the second moments, return each fragment's preconditioner."""
        reducer = BatchedReducer()
        pending = []
        for group, fragments in batches:
            eps1, beta2 = group["eps"][0], group["betas"][1]
            factored = [f for f in fragments if f.factored]
            sums = [self._new_factor_sums(f, reducer) for f in factored]
            row_states = [f.factor_state("exp_avg_sq_row", _factor_shapes(f.global_shape)[0]) for f in factored]
            ops = kernels_for(fragments)
            folded = ops.came_factored_sq_sums_begin(
                [f.grad for f in factored], [f.layout() for f in factored], eps1, [s[0] for s in sums], [s[1] for s in sums],
                row_states=row_states, beta2=beta2,
            )  # fmt: skip
            vectors = [f for f in fragments if not f.factored]
            ops.came_vector_second_moment([f.grad for f in vectors], [f.elementwise_state("exp_avg_sq") for f in vectors], beta2, eps1)
            pending.append({id(f): (*s, fold) for f, s, fold in zip(factored, sums, folded)})
        reducer.all_reduce()
        factors = []
        for (group, fragments), sums in zip(batches, pending):
            factored = [f for f in fragments if f.factored]
            updated = self._updated_factors(
                factored, "exp_avg_sq", group["betas"][1], [sums[id(f)][:2] for f in factored], [sums[id(f)][2] for f in factored]
            )
            by_fragment = dict(zip(map(id, factored), updated))
            factors.append([by_fragment.get(id(f)) or CameFactors(elementwise=f.elementwise_state("exp_avg_sq")) for f in fragments])
        return factors

    def _rms_clip_divisors(self, batches: list[tuple[dict[str, Any], list[Fragment]]], factors: list[list[CameFactors]]) -> list[Tensor]:
        """Phase 2 + reduction 2: ``max(1, RMS(uh) / d)`` per tensor, RMS over the whole tensor."""
        reducer = BatchedReducer()
        sumsqs = []
        for (group, fragments), batch_factors in zip(batches, factors):
            batch_sumsq = kernels_for(fragments).came_update_sumsq([f.grad for f in fragments], batch_factors)
            for index, fragment in enumerate(fragments):
                if fragment.group is not None:  # nothing to reduce for a whole local tensor
                    reducer.add(fragment.group, batch_sumsq[index : index + 1])
            sumsqs.append(batch_sumsq)
        reducer.all_reduce()
        divisors = []
        for (group, fragments), batch_sumsq in zip(batches, sumsqs):
            sizes = torch.tensor([f.numel for f in fragments], dtype=torch.float32, device=batch_sumsq.device)
            rms = batch_sumsq.sqrt() / sizes.sqrt()
            divisors.append((rms / group["clip_threshold"]).clamp(min=1.0))
        return divisors

    def _momentum_and_confidence(
        self,
        batches: list[tuple[dict[str, Any], list[Fragment]]],
        factors: list[list[CameFactors]],
        clip_divisors: list[Tensor],
    ) -> tuple[list[list[CameFactors]], list[Optional[Tensor]], list[object]]:
        """Phase 3 + reduction 3: momentum, residual sums and mask counts; return the confidence
        factors of the final update, the mask scales (``None`` where not cautious) and what the
        kernels keep for the apply phase of cautious groups (``came_cautious_begin``)."""
        reducer = BatchedReducer()
        pending = []
        for (group, fragments), batch_factors, divisors in zip(batches, factors, clip_divisors):
            res_sums = [self._new_factor_sums(f, reducer) if f.factored else (None, None) for f in fragments]
            ops = kernels_for(fragments)
            args = ([f.grad for f in fragments], [f.elementwise_state("exp_avg") for f in fragments], batch_factors, divisors)
            kwargs = dict(beta1=group["betas"][0], eps2=group["eps"][1], res_row_sums=[s[0] for s in res_sums], res_col_sums=[s[1] for s in res_sums])
            kept = None
            if group["cautious"]:
                counts, kept = ops.came_cautious_begin(*args, **kwargs)
                for index, fragment in enumerate(fragments):
                    if fragment.group is not None:
                        reducer.add(fragment.group, counts[index : index + 1])
            else:
                counts = ops.came_momentum(*args, **kwargs)
            pending.append((res_sums, counts, kept))
        reducer.all_reduce()
        confidence, scales = [], []
        for (group, fragments), (res_sums, counts, _) in zip(batches, pending):
            factored = [(f, sums) for f, sums in zip(fragments, res_sums) if f.factored]
            updated = self._updated_factors([f for f, _ in factored], "exp_avg_res", group["betas"][2], [sums for _, sums in factored])
            by_fragment = dict(zip((id(f) for f, _ in factored), updated))
            confidence.append([by_fragment.get(id(f)) or CameFactors() for f in fragments])
            scales.append(mask_scales(counts, [f.numel for f in fragments]) if group["cautious"] else None)
        return confidence, scales, [kept for _, _, kept in pending]

    @staticmethod
    def _new_factor_sums(fragment: Fragment, reducer: BatchedReducer) -> tuple[Tensor, Tensor]:
        """Zeroed full-size row and column partial-sum buffers, registered for reduction."""
        row_shape, col_shape = _factor_shapes(fragment.global_shape)
        device = fragment.param.device
        rows = torch.zeros(math.prod(row_shape), dtype=torch.float32, device=device)
        cols = torch.zeros(math.prod(col_shape), dtype=torch.float32, device=device)
        return reducer.add(fragment.group, rows), reducer.add(fragment.group, cols)

    @staticmethod
    def _updated_factors(
        fragments: list[Fragment], prefix: str, beta: float, sums: list[tuple[Tensor, Tensor]], folded: Optional[list[Optional[Tensor]]] = None
    ) -> list[CameFactors]:
        """Fold the reduced row/column sums into the replicated ``{prefix}_row`` / ``_col`` state
        (a mean over columns / rows) and return the normalised factors they define (with what
        phase 1 ``folded`` of phase 2, if anything). The same ops as ``_ema_`` and
        ``_normalised_rsqrt`` per tensor, issued as ``torch._foreach_*`` over all the fragments:
        the per-op dispatch, not the arithmetic, is what a small tensor's step pays for."""
        if not fragments:
            return []
        shapes = [_factor_shapes(f.global_shape) for f in fragments]
        rows = [f.factor_state(f"{prefix}_row", shape[0]) for f, shape in zip(fragments, shapes)]
        cols = [f.factor_state(f"{prefix}_col", shape[1]) for f, shape in zip(fragments, shapes)]
        for states, partial, counts in (
            (rows, [s[0] for s in sums], [f.global_shape[-1] for f in fragments]),
            (cols, [s[1] for s in sums], [f.global_shape[-2] for f in fragments]),
        ):
            torch._foreach_mul_(states, beta)
            torch._foreach_add_(states, torch._foreach_div(partial, counts), alpha=1 - beta)
        by_matrix = [r.view(-1, f.global_shape[-2]) for r, f in zip(rows, fragments)]
        means = [m.mean(dim=-1, keepdim=True) for m in by_matrix]
        row_factors = torch._foreach_rsqrt(torch._foreach_div(by_matrix, means))
        col_factors = torch._foreach_rsqrt(cols)
        folded = folded or [None] * len(fragments)
        return [
            CameFactors(f.layout(), r.view(-1), c)
            if fold is None
            else CameFactors(f.layout(), r.view(-1), c, folded=fold, row_means=mean.view(-1))
            for f, r, c, mean, fold in zip(fragments, row_factors, col_factors, means, folded)
        ]
