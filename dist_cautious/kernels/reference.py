"""The torch reference path: plain tensor ops, the executable statement of ALGORITHMS.md.

Every function takes lists of flat 1-D local tensors (fragments of larger tensors, possibly
empty): params and gradients of any float dtype, and state in the dtype of the math: fp32 for
fp32 / bf16 / fp16 params, float64 for float64 params (``shard.fragment.state_dtype``). Params
and gradients are read in the state's dtype and the param is written back in its own. The fused CPU and CUDA kernels implement these same signatures
and are tested against them element for element. The apply phases take ``lr`` and
``weight_decay`` as one number for the whole call or one per tensor (``PerTensor``), so that one
call covers param groups that differ only in those (the usual decay / no-decay split).

The cautious mask needs the count of agreeing entries over the WHOLE tensor before its scale
is known, so the cautious optimizers run in two phases with one reduction between:
``*_mask_counts`` (read-only) then ``*_apply`` (the fused update). Both phases compute the new
momentum with the same op, so they agree bit for bit on which entries are masked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from dist_cautious.kernels.layout import FactoredLayout


#: a hyperparameter that may differ per tensor: one number for all tensors of a call, or one per
#: tensor (a call that spans param groups of different ``lr`` / ``weight_decay``)
PerTensor = Union[float, Sequence[float]]


def per_tensor(value: PerTensor, count: int) -> list[float]:
    """``value`` as one float per tensor of a call over ``count`` tensors."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"dist_cautious kernels: {len(values)} per-tensor values for {count} tensors")
    return values


def decays_and_neg_lrs(lr: PerTensor, weight_decay: PerTensor, count: int) -> tuple[list[float], list[float]]:
    """Per tensor, the decay factor ``1 - lr * weight_decay`` and ``-lr`` that the fused kernels
    take (in Python double, as the reference computes them; the kernels round them to fp32)."""
    if isinstance(lr, (int, float)) and isinstance(weight_decay, (int, float)):
        return [1 - lr * weight_decay] * count, [-lr] * count
    lrs, decays = per_tensor(lr, count), per_tensor(weight_decay, count)
    return [1 - lr_i * wd_i for lr_i, wd_i in zip(lrs, decays)], [-lr_i for lr_i in lrs]


def _as(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` in ``like``'s dtype (the dtype of the math), without a copy when it is."""
    return tensor if tensor.dtype == like.dtype else tensor.to(like.dtype)


def _store(param: Tensor, computed: Tensor) -> None:
    if computed is not param:
        param.copy_(computed)


def _count_agreeing(update: Tensor, grad: Tensor) -> Tensor:
    """phi = 1[update * grad > 0]: the product form, so an underflow to 0 masks the entry.
    Counted in the math's dtype (float64 math counts in float64)."""
    return (update * grad > 0).sum(dtype=update.dtype)


def _decay_(param: Tensor, update: Tensor, decay: float, cautious: bool) -> None:
    """Decoupled weight decay ``p *= 1 - decay`` (``decay = lr * weight_decay``). With
    ``cautious`` (cautious weight decay, arXiv 2510.12402) only where the update ``u`` that is
    subtracted and the param agree in sign, ``u * p >= 0``: taken from their signs, so that no
    product underflows (exact either way). Called before ``p`` receives ``-lr * u``."""
    if not cautious:
        param.mul_(1 - decay)
        return
    agree = torch.sign(update).mul_(torch.sign(param)) >= 0
    factor = torch.full((), 1 - decay, dtype=param.dtype, device=param.device)
    param.mul_(torch.where(agree, factor, torch.ones((), dtype=param.dtype, device=param.device)))


def mask_scales(counts: Tensor, numels: Sequence[int] | Tensor) -> Tensor:
    """scale = 1 / max(mean(phi), 1e-3) per tensor, from global counts and global sizes (a list,
    or the fp32 tensor of them that a step plan keeps: no ``torch.tensor(list)`` per step)."""
    sizes = numels if isinstance(numels, Tensor) else torch.tensor(numels, dtype=torch.float32, device=counts.device)
    return 1.0 / (counts / sizes).clamp(min=1e-3)


def came_clip_divisors(sumsq: Tensor, sqrt_sizes: Tensor, clip_threshold: float) -> Tensor:
    """CAME's RMS clip per tensor, ``max(1, RMS(uh) / d)``: ``RMS = sqrt(sumsq) / sqrt(N)`` from
    the global sum of squares of the preconditioned update and the tensor's size ``N``."""
    return (sumsq.sqrt() / sqrt_sizes / clip_threshold).clamp(min=1.0)


def adamw_mask_counts(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
    """Local count of ``m_new * g > 0`` per tensor, ``m_new = lerp(m, g, 1 - beta1)``; reads only."""
    counts = [_count_agreeing(torch.lerp(m, _as(g, m), 1 - beta1), _as(g, m)) for g, m in zip(grads, exp_avgs)]
    return torch.stack(counts) if counts else torch.zeros(0)


def adamw_apply(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    lr: PerTensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: PerTensor,
    scales: Optional[Tensor] = None,
    max_exp_avg_sqs: Optional[Sequence[Tensor]] = None,
    cautious_weight_decay: bool = False,
) -> None:
    """One AdamW step in the op order of ``torch.optim.AdamW``; with ``scales`` (one per tensor)
    the update is masked where ``m * g <= 0`` and multiplied by the tensor's scale. With
    ``max_exp_avg_sqs`` (amsgrad) the denominator uses the running maximum of ``v``, as torch's.
    ``cautious_weight_decay``: decay only where the update and the param agree in sign."""
    lrs, decays = per_tensor(lr, len(params)), per_tensor(weight_decay, len(params))
    for index, (param, grad, exp_avg, exp_avg_sq, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        p, g = _as(param, exp_avg), _as(grad, exp_avg)
        lr, weight_decay = lrs[index], decays[index]
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        second_moment = exp_avg_sq
        if max_exp_avg_sqs is not None:
            second_moment = torch.maximum(max_exp_avg_sqs[index], exp_avg_sq, out=max_exp_avg_sqs[index])
        denom = (second_moment.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        numerator = exp_avg
        if scales is not None:
            numerator = exp_avg * (exp_avg * g > 0).to(exp_avg.dtype).mul_(scales[index])
        _decay_(p, numerator, lr * weight_decay, cautious_weight_decay)  # the update's sign is the numerator's
        p.addcdiv_(numerator, denom, value=-step_size)
        _store(param, p)


def lion_mask_counts(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
    """Local count of ``sign(lerp(m, g, 1 - beta1)) * g > 0`` per tensor; reads only."""
    counts = [_count_agreeing(torch.lerp(m, _as(g, m), 1 - beta1).sign_(), _as(g, m)) for g, m in zip(grads, exp_avgs)]
    return torch.stack(counts) if counts else torch.zeros(0)


def lion_apply(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: PerTensor,
    beta1: float,
    beta2: float,
    weight_decay: PerTensor,
    scales: Optional[Tensor] = None,
    cautious_weight_decay: bool = False,
) -> None:
    """One Lion step; the momentum is never masked. ``cautious_weight_decay``: decay only where
    the (masked) update and the param agree in sign."""
    lrs, decays = per_tensor(lr, len(params)), per_tensor(weight_decay, len(params))
    for index, (param, grad, exp_avg) in enumerate(zip(params, grads, exp_avgs)):
        p, g = _as(param, exp_avg), _as(grad, exp_avg)
        lr, weight_decay = lrs[index], decays[index]
        update = torch.lerp(exp_avg, g, 1 - beta1).sign_()
        if scales is not None:
            update.mul_((update * g > 0).to(update.dtype).mul_(scales[index]))
        _decay_(p, update, lr * weight_decay, cautious_weight_decay)
        p.add_(update, alpha=-lr)
        exp_avg.lerp_(g, 1 - beta2)
        _store(param, p)


# The cautious Lion step as two calls around the mask reduction. ``lion_cautious_begin`` returns
# the local counts and a ``pending`` value that only ``lion_cautious_finish`` of the same kernel
# set reads. Here they are the read-only count and the fused step above; the native CPU kernels
# instead move the momentum in the first pass and keep a 2-bit code of each masked update for the
# second (20.5 B/param instead of 28). Between the two calls the momentum is unspecified.


def lion_cautious_begin(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *, beta1: float, beta2: float
) -> tuple[Tensor, object]:
    """Phase 1 of a cautious Lion step: local mask counts (as ``lion_mask_counts``) and what the
    second phase needs. ``params`` are not touched."""
    return lion_mask_counts(grads, exp_avgs, beta1), None


def lion_cautious_finish(
    pending: object,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    *,
    lr: PerTensor,
    beta1: float,
    beta2: float,
    weight_decay: PerTensor,
    scales: Tensor,
    cautious_weight_decay: bool = False,
) -> None:
    """Phase 2: params (and, if phase 1 left it, the momentum) of a cautious Lion step with the
    global ``scales``; the same inputs as ``lion_cautious_begin`` had."""
    lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, scales=scales, cautious_weight_decay=cautious_weight_decay)


# --- CAME -------------------------------------------------------------------------------------
# A factored fragment's preconditioner is the outer product of a row and a column factor over its
# FactoredLayout; a 1-D / 0-D fragment's is elementwise. The four phases below are separated by
# the three reductions of the design: (g^2 + eps1) row/col sums; the sum of squares of the
# preconditioned update for the RMS clip; residual row/col sums together with mask counts.


@dataclass(frozen=True)
class CameFactors:
    """What multiplies a fragment's input in a CAME phase.

    Factored: ``row[row(i)] * col[col(i)]`` over ``layout`` (``row`` already divided by its
    per-matrix mean and rsqrt-ed, ``col`` rsqrt-ed). Elementwise: ``rsqrt(elementwise)``
    (the 1-D second moment); ``None`` everywhere means the identity (CAME's 1-D confidence step).

    ``folded`` and ``row_means`` are an optional shortcut for ``came_update_sumsq`` that a kernel
    set may use or ignore (this reference ignores it): the per-column sums of ``g^2 / R_i`` over
    the fragment's whole rows that ``came_factored_sq_sums_begin`` of the native CPU kernels
    gathered in phase 1, and each matrix's mean of the updated row state.
    """

    layout: Optional[FactoredLayout] = None
    row: Optional[Tensor] = None
    col: Optional[Tensor] = None
    elementwise: Optional[Tensor] = None
    folded: Optional[Tensor] = None
    row_means: Optional[Tensor] = None

    def math_dtype(self, grad: Tensor) -> torch.dtype:
        """The dtype of the math these factors take part in: their own, or for the identity
        the one a param of ``grad``'s dtype gets (float64 for float64, else fp32)."""
        for tensor in (self.row, self.elementwise):
            if tensor is not None:
                return tensor.dtype
        return torch.float64 if grad.dtype == torch.float64 else torch.float32

    def apply_to(self, tensor: Tensor) -> Tensor:
        if self.layout is not None:
            return self.layout.outer(self.row, self.col).mul_(tensor)
        if self.elementwise is not None:
            return self.elementwise.rsqrt().mul_(tensor)
        return tensor.clone()


class FactorList(list):
    """A list of ``CameFactors`` that a step plan keeps across steps: the tensors inside are
    rewritten in place, never replaced, so a kernel set may keep what it derives from the list
    (``packed``: the native CPU kernels' flattened argument lists) instead of rebuilding it
    per call and per tensor."""

    packed: Any = None


@dataclass(frozen=True)
class FactorBuffers:
    """The replicated row / column state of one kind (second moment or residual) of a set of
    factored tensors, and what a step derives from it, each in ONE flat buffer of the math's
    dtype (rows of all matrices back to back, then likewise the columns), so that the factor
    math of a step is one call. Made once per step plan; rewritten in place every step.

    ``runs``: ``(R, rows)`` pairs in row order: ``rows`` consecutive rows of matrices of ``R``
    rows each (whole matrices). ``row_counts`` / ``col_counts``: per row the number of columns
    ``C`` its sum covers, per column the number of rows ``R`` (what a sum is divided by for a
    mean). ``means`` holds one value per matrix, in row order."""

    row_state: Tensor
    col_state: Tensor
    row_sums: Tensor
    col_sums: Tensor
    row_counts: Tensor
    col_counts: Tensor
    runs: tuple[tuple[int, int], ...]
    row_factor: Tensor
    col_factor: Tensor
    means: Tensor

    def tensors(self) -> list[Tensor]:
        """Every buffer, for a kernel set's check that it takes them all."""
        return [self.row_state, self.col_state, self.row_sums, self.col_sums, self.row_counts, self.col_counts, self.row_factor, self.col_factor, self.means]

    def op_args(self, beta: float) -> tuple[Any, ...]:
        """The arguments of the kernels' ``came_factor_update`` op (CPU and CUDA share its
        schema), in the schema's order."""
        return (
            self.row_state, self.col_state, self.row_sums, self.col_sums, self.row_counts, self.col_counts,
            [rows for rows, _ in self.runs], [count for _, count in self.runs], beta, 1 - beta, self.row_factor, self.col_factor, self.means,
        )  # fmt: skip


def came_factor_update(buffers: FactorBuffers, beta: float) -> None:
    """CAME's factor math after a reduction of row / column sums, over all tensors of
    ``buffers`` at once: the EMA ``state = beta state + (1 - beta) sums / counts`` of rows and
    columns, each matrix's mean of its row state, the row factor ``rsqrt(r / mean(r))`` and the
    column factor ``rsqrt(c)``. The sums are consumed (overwritten here)."""
    for state, sums, counts in ((buffers.row_state, buffers.row_sums, buffers.row_counts), (buffers.col_state, buffers.col_sums, buffers.col_counts)):
        state.mul_(beta).add_(sums.div_(counts), alpha=1 - beta)
    first = matrix = 0
    for rows_per_matrix, rows in buffers.runs:
        matrices = rows // rows_per_matrix
        by_matrix = buffers.row_state[first : first + rows].view(matrices, rows_per_matrix)
        means = buffers.means[matrix : matrix + matrices].view(matrices, 1)
        torch.mean(by_matrix, dim=-1, keepdim=True, out=means)
        torch.div(by_matrix, means, out=buffers.row_factor[first : first + rows].view(matrices, rows_per_matrix))
        first, matrix = first + rows, matrix + matrices
    buffers.row_factor.rsqrt_()
    torch.rsqrt(buffers.col_state, out=buffers.col_factor)


def came_factored_sq_sums(
    grads: Sequence[Tensor], layouts: Sequence[FactoredLayout], eps1: float, row_sums: Sequence[Tensor], col_sums: Sequence[Tensor]
) -> None:
    """Add each fragment's partial row and column sums of ``g^2 + eps1`` into full-size buffers."""
    for grad, layout, rows, cols in zip(grads, layouts, row_sums, col_sums):
        g = _as(grad, rows)
        layout.add_row_col_sums(g * g + eps1, rows, cols)


def came_factored_sq_sums_begin(
    grads: Sequence[Tensor],
    layouts: Sequence[FactoredLayout],
    eps1: float,
    row_sums: Sequence[Tensor],
    col_sums: Sequence[Tensor],
    *,
    row_states: Sequence[Tensor],
    beta2: float,
    folded: Optional[Sequence[Tensor]] = None,
) -> list[Optional[Tensor]]:
    """``came_factored_sq_sums``, and per fragment what it folded for ``came_update_sumsq``
    (``CameFactors.folded``): nothing here, where phase 2 is its own pass over g. ``row_states``
    are the row second moments before this step's update; ``folded``, zeroed B*C buffers a
    kernel set may fold into instead of allocating its own, is unused here."""
    came_factored_sq_sums(grads, layouts, eps1, row_sums, col_sums)
    return [None] * len(grads)


def came_vector_second_moment(grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], beta2: float, eps1: float) -> None:
    """1-D / 0-D tensors: ``v = beta2 v + (1 - beta2)(g^2 + eps1)``, elementwise and local."""
    for grad, exp_avg_sq in zip(grads, exp_avg_sqs):
        g = _as(grad, exp_avg_sq)
        exp_avg_sq.mul_(beta2).add_(g * g + eps1, alpha=1 - beta2)


def came_update_sumsq(grads: Sequence[Tensor], factors: Sequence[CameFactors]) -> Tensor:
    """Local sum of squares of the preconditioned update ``uh = g * factors`` per tensor."""
    sums = [factor.apply_to(grad.to(factor.math_dtype(grad))).square().sum() for grad, factor in zip(grads, factors)]
    return torch.stack(sums) if sums else torch.zeros(0)


def came_momentum(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    factors: Sequence[CameFactors],
    clip_divisors: Tensor,
    *,
    beta1: float,
    eps2: float,
    res_row_sums: Sequence[Optional[Tensor]],
    res_col_sums: Sequence[Optional[Tensor]],
) -> Tensor:
    """``uh = g * factors / clip``, ``m = beta1 m + (1 - beta1) uh``; for factored fragments add
    partial row/col sums of ``(uh - m)^2 + eps2``. Returns local counts of ``m * g > 0`` (the
    confidence factor is positive, so this is the sign of the final update)."""
    counts = []
    for index, (grad, exp_avg, factor) in enumerate(zip(grads, exp_avgs, factors)):
        g = _as(grad, exp_avg)
        update = factor.apply_to(g).div_(clip_divisors[index])
        exp_avg.mul_(beta1).add_(update, alpha=1 - beta1)
        if factor.layout is not None:
            residual = (update - exp_avg).square_().add_(eps2)
            factor.layout.add_row_col_sums(residual, res_row_sums[index], res_col_sums[index])
        counts.append(_count_agreeing(exp_avg, g))
    return torch.stack(counts) if counts else torch.zeros(0)


def came_apply(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    confidence: Sequence[CameFactors],
    *,
    lr: PerTensor,
    weight_decay: PerTensor,
    scales: Optional[Tensor] = None,
    cautious_weight_decay: bool = False,
) -> None:
    """``u = m * confidence``; ``p *= 1 - lr wd`` (with ``cautious_weight_decay`` only where
    ``u * p >= 0``); ``p -= lr u`` (masked where ``m * g <= 0``)."""
    lrs, decays = per_tensor(lr, len(params)), per_tensor(weight_decay, len(params))
    for index, (param, grad, exp_avg, factor) in enumerate(zip(params, grads, exp_avgs, confidence)):
        p = _as(param, exp_avg)
        lr, weight_decay = lrs[index], decays[index]
        update = factor.apply_to(exp_avg)
        if scales is not None:
            update.mul_((exp_avg * _as(grad, exp_avg) > 0).to(exp_avg.dtype).mul_(scales[index]))
        _decay_(p, update, lr * weight_decay, cautious_weight_decay)
        p.add_(update, alpha=-lr)
        _store(param, p)


# The cautious CAME momentum and apply phases as a pair, like the cautious Lion pair above: here
# the plain two calls (the apply phase reads g again for the mask); the native CPU kernels keep
# the mask as one bit per element between them instead.


def came_cautious_begin(
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    factors: Sequence[CameFactors],
    clip_divisors: Tensor,
    *,
    beta1: float,
    eps2: float,
    res_row_sums: Sequence[Optional[Tensor]],
    res_col_sums: Sequence[Optional[Tensor]],
) -> tuple[Tensor, object]:
    """``came_momentum`` of a cautious step: its counts, and what ``came_cautious_finish`` needs."""
    counts = came_momentum(grads, exp_avgs, factors, clip_divisors, beta1=beta1, eps2=eps2, res_row_sums=res_row_sums, res_col_sums=res_col_sums)
    return counts, None


def came_cautious_finish(
    pending: object,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    confidence: Sequence[CameFactors],
    *,
    lr: PerTensor,
    weight_decay: PerTensor,
    scales: Tensor,
    cautious_weight_decay: bool = False,
) -> None:
    """``came_apply`` of a cautious step, after ``came_cautious_begin`` on the same tensors."""
    came_apply(params, grads, exp_avgs, confidence, lr=lr, weight_decay=weight_decay, scales=scales, cautious_weight_decay=cautious_weight_decay)
