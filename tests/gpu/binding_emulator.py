"""A torch emulation of ``dist_cautious_cuda_kernels`` (csrc/cuda/binding.cpp + the kernels).

It has the binding's exact function names, argument order and argument checks, and computes what
the kernels compute, per tensor, with torch ops on any device. ``CudaOps(BindingEmulator(), "cpu")``
then runs ``cuda_ops``' whole wiring (argument order, factored / 1-D partitions, ``out_index``
slots, count and sum buffers, per-tensor scalars) on the CPU, so CI checks it without a GPU.

Factored ranges use the kernels' index formulas, not ``FactoredLayout``: global row id of flat
index ``f`` is ``f // C`` and column id is ``(f // (R*C)) * C + f % C``; agreement with the
reference path therefore also checks those formulas against the layout's own bookkeeping.
"""

from __future__ import annotations

import torch
from torch import Tensor

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_value(tensor: Tensor, what: str, numel: int = -1) -> None:
    if tensor.dtype not in _VALUE_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if numel >= 0 and tensor.numel() != numel:
        raise ValueError(f"{what} has {tensor.numel()} elements, expected {numel}")


def _check_state(tensor: Tensor, what: str, numel: int = -1) -> None:
    if tensor.dtype != torch.float32:
        raise TypeError(f"{what} must be float32, got {tensor.dtype}")
    _check_value(tensor, what, numel)


def _same_length(*lists) -> None:
    lengths = {len(items) for items in lists}
    if len(lengths) != 1:
        raise ValueError(f"lists differ in length: {sorted(lengths)}")


def _fp32(value: float) -> float:
    """A Python scalar rounded to fp32, as the binding's static_cast<float>."""
    return float(torch.tensor(value, dtype=torch.float32))


def _lerp(a: Tensor, b: Tensor, weight: float) -> Tensor:
    return torch.lerp(a, b, _fp32(weight))


def _store(param: Tensor, value: Tensor) -> None:
    param.copy_(value)


#: the step-scalars table's columns (csrc/cuda/dc_kernels.h, StepScalarColumn)
ALPHA, INV_BC2_SQRT, DECAY, NEG_LR = range(4)


def _host_lists(step_scalars, slots: int, *lists) -> tuple:
    """The host per-tensor lists that must have one value per tensor: all of ``lists`` without a
    step-scalars table; none with one, after the binding's checks of it (fp32 ``[slots, 4]``, the
    host lists empty)."""
    if step_scalars is None:
        return lists
    if any(len(values) for values in lists):
        raise ValueError("with step_scalars the host lists must be empty")
    _check_state(step_scalars, "step_scalars")
    if tuple(step_scalars.shape) != (slots, 4):
        raise ValueError(f"step_scalars must have shape [{slots}, 4], got {list(step_scalars.shape)}")
    return ()


def _per_tensor(step_scalars, slots, column: int, host_values) -> list[float]:
    """Each tensor's step scalar: column ``column`` of its row (its slot) of the table, already
    fp32; else its host value rounded to fp32."""
    if step_scalars is None:
        return [_fp32(value) for value in host_values]
    return [float(step_scalars[slot, column]) for slot in slots]


def _factored_ids(start: int, n: int, rows: int, cols: int, device) -> tuple[Tensor, Tensor]:
    flat = torch.arange(start, start + n, device=device, dtype=torch.int64)
    return flat // cols, (flat // (rows * cols)) * cols + flat % cols


class BindingEmulator:
    """Same names and signatures as the compiled module's functions."""

    def lerp_mask_counts(self, grads, exp_avgs, weight: float, lion: bool) -> Tensor:
        if not grads:
            raise ValueError("empty list")
        _same_length(grads, exp_avgs)
        counts = torch.zeros(len(grads), dtype=torch.int64, device=grads[0].device)
        for index, (grad, exp_avg) in enumerate(zip(grads, exp_avgs)):
            _check_value(grad, "grad")
            _check_state(exp_avg, "exp_avg", grad.numel())
            g = grad.float()
            update = _lerp(exp_avg, g, weight)
            if lion:
                update = update.sign()
            counts[index] = int((update * g > 0).sum())
        return counts

    def adamw_apply(self, params, grads, exp_avgs, exp_avg_sqs, alphas, bc2_sqrts, decays, lerp_weight, beta2, one_minus_beta2, eps, scales,
                    step_scalars=None) -> None:
        _same_length(params, grads, exp_avgs, exp_avg_sqs, *_host_lists(step_scalars, len(grads), alphas, bc2_sqrts, decays))
        if scales is not None:
            _check_state(scales, "scales", len(grads))
        slots = range(len(grads))
        alpha = _per_tensor(step_scalars, slots, ALPHA, alphas)
        # 1 / fp32(sqrt(1 - beta2^t)): the double quotient rounded to fp32 is the fp32 quotient
        inv_bc2_sqrt = _per_tensor(step_scalars, slots, INV_BC2_SQRT, [1.0 / _fp32(value) for value in bc2_sqrts])
        decay = _per_tensor(step_scalars, slots, DECAY, decays)
        for index, (param, grad, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            _check_value(param, "param", grad.numel())
            _check_state(m, "exp_avg", grad.numel())
            _check_state(v, "exp_avg_sq", grad.numel())
            g = grad.float()
            p = param.float() * decay[index]
            m.copy_(_lerp(m, g, lerp_weight))
            v.mul_(_fp32(beta2)).add_(g * g, alpha=_fp32(one_minus_beta2))
            denom = v.sqrt() * inv_bc2_sqrt[index] + _fp32(eps)
            numerator = m if scales is None else torch.where(m * g > 0, m * scales[index], torch.zeros_like(m))
            _store(param, p + alpha[index] * (numerator / denom))

    def lion_apply(self, params, grads, exp_avgs, decays, weight1, weight2, neg_lrs, scales, step_scalars=None) -> None:
        _same_length(params, grads, exp_avgs, *_host_lists(step_scalars, len(grads), decays, neg_lrs))
        if scales is not None:
            _check_state(scales, "scales", len(grads))
        slots = range(len(grads))
        decay, neg_lr = _per_tensor(step_scalars, slots, DECAY, decays), _per_tensor(step_scalars, slots, NEG_LR, neg_lrs)
        for index, (param, grad, m) in enumerate(zip(params, grads, exp_avgs)):
            _check_value(param, "param", grad.numel())
            _check_state(m, "exp_avg", grad.numel())
            g = grad.float()
            p = param.float() * decay[index]
            update = _lerp(m, g, weight1).sign()
            if scales is not None:
                update = torch.where(update * g > 0, update * scales[index], torch.zeros_like(update))
            _store(param, p + neg_lr[index] * update)
            m.copy_(_lerp(m, g, weight2))

    def came_vector_second_moment(self, grads, exp_avg_sqs, beta2, one_minus_beta2, eps1) -> None:
        _same_length(grads, exp_avg_sqs)
        for grad, v in zip(grads, exp_avg_sqs):
            _check_state(v, "exp_avg_sq", grad.numel())
            g = grad.float()
            v.mul_(_fp32(beta2)).add_(g * g + _fp32(eps1), alpha=_fp32(one_minus_beta2))

    @staticmethod
    def _precondition(precond: Tensor, has: bool, value: Tensor) -> Tensor:
        if not has:
            return value
        _check_state(precond, "exp_avg_sq", value.numel())
        return precond.rsqrt() * value

    def came_vector_sumsq(self, grads, preconds, has_precond, out_index, sums) -> None:
        _same_length(grads, preconds, has_precond, out_index)
        if sums.dtype != torch.float64:
            raise TypeError("sums must be float64")
        for grad, precond, has, slot in zip(grads, preconds, has_precond, out_index):
            update = self._precondition(precond, has, grad.float())
            sums[slot] += (update * update).double().sum()

    def came_vector_momentum(self, grads, exp_avgs, preconds, has_precond, out_index, divisors, beta1, one_minus_beta1, counts) -> None:
        _same_length(grads, exp_avgs, preconds, has_precond, out_index)
        _check_state(divisors, "clip divisors")
        if counts.dtype != torch.int64:
            raise TypeError("counts must be int64")
        for grad, m, precond, has, slot in zip(grads, exp_avgs, preconds, has_precond, out_index):
            _check_state(m, "exp_avg", grad.numel())
            g = grad.float()
            update = self._precondition(precond, has, g) / divisors[slot]
            m.mul_(_fp32(beta1)).add_(update, alpha=_fp32(one_minus_beta1))
            counts[slot] += int((m * g > 0).sum())

    def came_vector_apply(self, params, grads, exp_avgs, preconds, has_precond, out_index, decays, neg_lrs, scales, num_scales,
                          step_scalars=None) -> None:
        _same_length(params, grads, exp_avgs, preconds, has_precond, out_index, *_host_lists(step_scalars, num_scales, decays, neg_lrs))
        if scales is not None:
            _check_state(scales, "scales", num_scales)
        decays, neg_lrs = _per_tensor(step_scalars, out_index, DECAY, decays), _per_tensor(step_scalars, out_index, NEG_LR, neg_lrs)
        for param, grad, m, precond, has, slot, decay, neg_lr in zip(params, grads, exp_avgs, preconds, has_precond, out_index, decays, neg_lrs):
            _check_value(param, "param", grad.numel())
            update = self._precondition(precond, has, m)
            if scales is not None:
                update = torch.where(m * grad.float() > 0, update * scales[slot], torch.zeros_like(update))
            _store(param, param.float() * decay + neg_lr * update)

    @staticmethod
    def _check_layout(grad: Tensor, start: int, batches: int, rows: int, cols: int) -> None:
        if min(rows, cols, batches) <= 0 or start < 0 or start + grad.numel() > batches * rows * cols:
            raise ValueError(f"range [{start}, {start + grad.numel()}) outside a ({batches}, {rows}, {cols}) tensor")

    def came_factored_sq_sums(self, grads, starts, batches, rows, cols, row_sums, col_sums, eps1) -> None:
        _same_length(grads, starts, batches, rows, cols, row_sums, col_sums)
        for grad, start, b, r, c, row_out, col_out in zip(grads, starts, batches, rows, cols, row_sums, col_sums):
            self._check_layout(grad, start, b, r, c)
            _check_state(row_out, "row sums", b * r)
            _check_state(col_out, "col sums", b * c)
            g = grad.float()
            row_id, col_id = _factored_ids(start, g.numel(), r, c, g.device)
            q = g * g + _fp32(eps1)
            row_out.index_add_(0, row_id, q)
            col_out.index_add_(0, col_id, q)

    def _factored_precond(self, grad, start, b, r, c, row_factor, col_factor) -> Tensor:
        self._check_layout(grad, start, b, r, c)
        _check_state(row_factor, "row factor", b * r)
        _check_state(col_factor, "col factor", b * c)
        row_id, col_id = _factored_ids(start, grad.numel(), r, c, grad.device)
        return row_factor[row_id] * col_factor[col_id]

    def came_factored_sumsq(self, grads, starts, batches, rows, cols, row_factor, col_factor, out_index, sums) -> None:
        _same_length(grads, starts, batches, rows, cols, row_factor, col_factor, out_index)
        if sums.dtype != torch.float64:
            raise TypeError("sums must be float64")
        for grad, start, b, r, c, rf, cf, slot in zip(grads, starts, batches, rows, cols, row_factor, col_factor, out_index):
            update = self._factored_precond(grad, start, b, r, c, rf, cf) * grad.float()
            sums[slot] += (update * update).double().sum()

    def came_factored_momentum(self, grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, res_row_sums, res_col_sums, out_index, divisors, beta1, one_minus_beta1, eps2, counts) -> None:
        _same_length(grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, res_row_sums, res_col_sums, out_index)
        _check_state(divisors, "clip divisors")
        if counts.dtype != torch.int64:
            raise TypeError("counts must be int64")
        for grad, m, start, b, r, c, rf, cf, row_out, col_out, slot in zip(grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, res_row_sums, res_col_sums, out_index):
            _check_state(m, "exp_avg", grad.numel())
            _check_state(row_out, "row sums", b * r)
            _check_state(col_out, "col sums", b * c)
            g = grad.float()
            update = self._factored_precond(grad, start, b, r, c, rf, cf) * g / divisors[slot]
            m.mul_(_fp32(beta1)).add_(update, alpha=_fp32(one_minus_beta1))
            residual = (update - m) ** 2 + _fp32(eps2)
            row_id, col_id = _factored_ids(start, g.numel(), r, c, g.device)
            row_out.index_add_(0, row_id, residual)
            col_out.index_add_(0, col_id, residual)
            counts[slot] += int((m * g > 0).sum())

    def came_factored_apply(self, params, grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, out_index, decays, neg_lrs, scales, num_scales,
                            step_scalars=None) -> None:
        _same_length(params, grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, out_index,
                     *_host_lists(step_scalars, num_scales, decays, neg_lrs))
        if scales is not None:
            _check_state(scales, "scales", num_scales)
        decays, neg_lrs = _per_tensor(step_scalars, out_index, DECAY, decays), _per_tensor(step_scalars, out_index, NEG_LR, neg_lrs)
        for param, grad, m, start, b, r, c, rf, cf, slot, decay, neg_lr in zip(
            params, grads, exp_avgs, starts, batches, rows, cols, row_factor, col_factor, out_index, decays, neg_lrs
        ):
            _check_value(param, "param", grad.numel())
            update = self._factored_precond(grad, start, b, r, c, rf, cf) * m
            if scales is not None:
                update = torch.where(m * grad.float() > 0, update * scales[slot], torch.zeros_like(update))
            _store(param, param.float() * decay + neg_lr * update)

    def came_factor_update(self, row_state, col_state, row_sums, col_sums, row_counts, col_counts, run_rows_per_matrix, run_rows,
                           beta, one_minus_beta, row_factor, col_factor, means) -> None:
        """The kernel's math with torch ops: the EMA with fp32 beta and 1 - beta, each matrix's
        mean of its new row state summed in float64 (the kernel's fixed order is checked against
        the real sources, tests/gpu/test_cuda_emulated.py), the factors by torch's rsqrt."""
        _same_length(run_rows_per_matrix, run_rows)
        rows, cols = row_state.numel(), col_state.numel()
        for tensor, what, numel in ((row_state, "row state", rows), (row_sums, "row sums", rows), (row_counts, "row counts", rows),
                                    (row_factor, "row factor", rows), (col_state, "column state", cols), (col_sums, "column sums", cols),
                                    (col_counts, "column counts", cols), (col_factor, "column factor", cols)):
            _check_state(tensor, what, numel)
        if any(R <= 0 or n < 0 or n % R for R, n in zip(run_rows_per_matrix, run_rows)) or sum(run_rows) != rows:
            raise ValueError(f"runs {list(zip(run_rows_per_matrix, run_rows))} are not whole matrices covering {rows} rows")
        _check_state(means, "means", sum(n // R for R, n in zip(run_rows_per_matrix, run_rows)))
        for state, sums, counts in ((row_state, row_sums, row_counts), (col_state, col_sums, col_counts)):
            state.mul_(_fp32(beta)).add_(sums / counts, alpha=_fp32(one_minus_beta))
        first = matrix = 0
        for R, n in zip(run_rows_per_matrix, run_rows):
            k = n // R
            by_matrix = row_state[first : first + n].view(k, R)
            means[matrix : matrix + k] = (by_matrix.double().sum(dim=1) / R).float()
            row_factor[first : first + n] = (by_matrix / means[matrix : matrix + k].view(k, 1)).rsqrt().view(-1)
            first, matrix = first + n, matrix + k
        torch.rsqrt(col_state, out=col_factor)

    def mask_scales(self, counts, sizes) -> Tensor:
        """1 / max(counts / sizes, 1e-3) with torch's ops, as the kernel rounds it (IEEE division,
        clamp keeping NaN, IEEE reciprocal)."""
        _check_per_tensor(counts, sizes, "counts", "sizes")
        return 1.0 / (counts / sizes).clamp(min=1e-3)

    def came_clip_divisors(self, sumsq, sqrt_sizes, clip_threshold) -> Tensor:
        """max(sqrt(sumsq) / sqrt_sizes * (1 / fp32(d)), 1): the division by the threshold as the
        binding passes it, a product by the fp32 reciprocal of fp32(d) (torch's CUDA division by
        a Python scalar); the square root correctly rounded (a double root rounded to fp32),
        as the kernel's sqrt.rn, not torch's CPU sqrt (MKL's)."""
        _check_per_tensor(sumsq, sqrt_sizes, "sums of squares", "square roots of the sizes")
        inv = _fp32(1.0 / _fp32(clip_threshold)) if _fp32(clip_threshold) != 0 else float("inf")
        return (sumsq.double().sqrt().float() / sqrt_sizes * inv).clamp(min=1.0)


def _check_per_tensor(values: Tensor, other: Tensor, what: str, other_what: str) -> None:
    if values.dim() != 1:
        raise ValueError(f"{what} must be a vector, got {values.dim()} dimensions")
    _check_state(values, what)
    _check_state(other, other_what, values.numel())
