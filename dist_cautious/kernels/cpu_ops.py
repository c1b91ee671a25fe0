"""The native CPU kernels behind the reference signatures.

``load()`` builds (or imports) the ``dist_cautious_cpu_kernels`` extension from ``csrc/cpu`` and
returns a ``CpuOps`` namespace with the functions of ``kernels/reference.py``, same names, same
arguments, same results to fp32 rounding (most outputs bit for bit; sums differ only in the order
of additions, see docs/cpu_kernels.md). ``kernels.ops_for`` picks it for CPU tensors.

The extension handles CPU, contiguous, 1-D tensors with fp32 state and fp32 / bf16 / fp16 params
and grads. A call whose tensors fall outside that (an fp64 param, a strided view) runs the
reference function instead: the same math, only slower, never different results.

The kernels are also PyTorch custom ops, ``torch.ops.dist_cautious_cpu.*`` (``cpu_library``):
a call goes through them when a dispatch mode or ``torch.compile`` must see it, else straight
to the extension (``kernels/routing.py``).

Python computes every per-tensor scalar exactly as the reference does (in double, e.g.
``lr / (1 - beta1**step)``) and the extension rounds it to fp32 once, as torch does when a
Python number meets an fp32 tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor

from dist_cautious.kernels import cpu_library, reference, routing
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors, FactorBuffers, FactorList, PerTensor, mask_scales

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IDENTITY, _ELEMENTWISE, _FACTORED = 0, 1, 2


def _native_ok(values: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]] = ()) -> bool:
    """True when every tensor is one the extension takes: CPU, contiguous, a supported dtype
    (state: fp32)."""
    for tensor in values:
        if tensor is not None and (tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype not in _NATIVE_DTYPES):
            return False
    for tensor in state:
        if tensor is not None and (tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.dtype != torch.float32):
            return False
    return True


def _scales_ok(scales: Optional[Tensor]) -> bool:
    return scales is None or (scales.device.type == "cpu" and scales.dtype == torch.float32)


class _FactorArgs:
    """CameFactors flattened into the parallel lists the extension takes (with the ``folded``
    shortcut's buffers and row means where a factored entry has both, else ``None``)."""

    @staticmethod
    def of(factors: Sequence[CameFactors]) -> "_FactorArgs":
        """Kept on a ``FactorList`` (made once per step plan), else made for this call."""
        if isinstance(factors, FactorList):
            if factors.packed is None:
                factors.packed = _FactorArgs(factors)
            return factors.packed
        return _FactorArgs(factors)

    def __init__(self, factors: Sequence[CameFactors]) -> None:
        self.kinds: list[int] = []
        self.starts: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.row: list[Optional[Tensor]] = []
        self.col: list[Optional[Tensor]] = []
        self.elem: list[Optional[Tensor]] = []
        for factor in factors:
            layout: Optional[FactoredLayout] = factor.layout
            if layout is not None:
                self.kinds.append(_FACTORED)
                self.starts.append(layout.start)
                self.rows.append(layout.rows)
                self.cols.append(layout.cols)
                self.row.append(factor.row)
                self.col.append(factor.col)
                self.elem.append(None)
            else:
                self.kinds.append(_ELEMENTWISE if factor.elementwise is not None else _IDENTITY)
                self.starts.append(0)
                self.rows.append(1)
                self.cols.append(1)
                self.row.append(None)
                self.col.append(None)
                self.elem.append(factor.elementwise)
        #: bytes of mask scratch per fragment, kept by ``_came_momentum`` for a ``FactorList``
        self.mask_bytes: list[int] = []
        self.folded = [f.folded if f.layout is not None and f.folded is not None and f.row_means is not None else None for f in factors]
        self.row_means = [f.row_means if fold is not None else None for f, fold in zip(factors, self.folded)]

    def tensors(self) -> list[Optional[Tensor]]:
        return [*self.row, *self.col, *self.elem]

    def args(self) -> tuple[Any, ...]:
        return (self.kinds, self.starts, self.rows, self.cols, self.row, self.col, self.elem)


class _ByteScratch:
    """Byte buffers handed out between two phases of one step and taken back after it.

    Kept for later steps: a fresh multi-GB buffer every step would pay a page fault per 4 KiB
    (measured 5.8x the cost of refilling a kept 400 MB buffer here). The pool holds at most as
    many buffers as were ever in use at once (one per param group and device in a step).
    """

    def __init__(self) -> None:
        self._free: list[Tensor] = []
        #: per buffer (by id; the entry holds the buffer, so the id is not reused meanwhile): the
        #: sizes it was last split into and those views. A step of the same tensors as the last
        #: reuses them instead of making one view per tensor. Only the pool's buffers and the
        #: one being handed out keep an entry.
        self._splits: dict[int, tuple[Tensor, tuple[int, ...], list[Tensor]]] = {}

    def take(self, sizes: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """A buffer of at least ``sum(sizes)`` bytes and its consecutive views of ``sizes``.
        Under ``FakeTensorMode`` a fresh fake buffer, never pooled: the pool's real buffers
        cannot enter a fake step, nor a fake buffer a later real one."""
        total = sum(sizes)
        if routing.dispatched() and detect_fake_mode() is not None:
            buffer = torch.empty(total, dtype=torch.uint8)
            return buffer, list(buffer.split(list(sizes)))
        fitting = [i for i, b in enumerate(self._free) if b.numel() >= total]
        if fitting:
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].numel()))
        else:
            if self._free:  # all too small for this step: drop the largest rather than keep both
                self._free.pop(max(range(len(self._free)), key=lambda i: self._free[i].numel()))
            buffer = torch.empty(total, dtype=torch.uint8)
        kept = {id(b) for b in self._free} | {id(buffer)}
        for stale in [key for key in self._splits if key not in kept]:
            del self._splits[stale]
        key = tuple(sizes)
        split = self._splits.get(id(buffer))
        if split is None or split[1] != key:
            split = self._splits[id(buffer)] = (buffer, key, list(buffer[:total].split(list(sizes))))
        return buffer, list(split[2])

    def give_back(self, buffer: Tensor) -> None:
        if not isinstance(buffer, FakeTensor):
            self._free.append(buffer)


class _CameMask:
    """The mask bits the native momentum pass of a cautious CAME step keeps for the apply pass."""

    def __init__(self, buffer: Tensor, masks: list[Tensor]) -> None:
        self.buffer = buffer
        self.masks = masks


class _LionCodes:
    """What the native first pass of a cautious Lion step leaves for the second."""

    def __init__(self, buffer: Tensor, codes: list[Tensor]) -> None:
        self.buffer = buffer
        self.codes = codes


class CpuOps:
    """The reference functions, run by the compiled extension ``module``."""

    CameFactors = CameFactors

    def __init__(self, module: Any) -> None:
        self.module = module
        self._kernels = cpu_library.Route(module)
        self._scratch = _ByteScratch()
        self._trusted: Optional[CpuOps] = None

    @staticmethod
    def _ok(values: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]] = ()) -> bool:
        return _native_ok(values, state)

    #: the check ``trusted`` skips, for a caller to make once (the step plan)
    native_ok = staticmethod(_native_ok)

    def trusted(self) -> "CpuOps":
        """The same kernels without the per-call, per-tensor ``_native_ok`` check, for a caller
        that has checked its tensors once and keeps them (the optimizers' step plan): that check
        over every tensor of every call was a large part of a small-tensor step's host cost."""
        if self._trusted is None:
            self._trusted = _TrustedCpuOps(self.module, self._scratch)
        return self._trusted

    @property
    def isa(self) -> str:
        """The instruction set in use: 'avx512', 'avx2' or 'scalar'."""
        return self.module.current_isa()

    # --- per-tensor scalars from reduced values --------------------------------------------
    def mask_scales(self, counts: Tensor, numels: Sequence[int] | Tensor) -> Tensor:
        """``reference.mask_scales`` for all tensors of a batch in one native call (fp32 CPU
        counts and a sizes tensor, as the optimizers pass them), bit for bit."""
        if not isinstance(numels, Tensor) or not self._ok([], [counts, numels]):
            return mask_scales(counts, numels)
        return self._kernels().mask_scales(counts, numels)

    #: torch's ops: their CPU sqrt is MKL's, which no kernel of ours reproduces, and an ulp of
    #: difference in a divisor moves CAME's trajectory visibly (csrc/cpu/step_scalars.h)
    came_clip_divisors = staticmethod(reference.came_clip_divisors)

    # --- AdamW ---------------------------------------------------------------------------
    def adamw_mask_counts(self, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
        if not self._ok(grads, exp_avgs):
            return reference.adamw_mask_counts(grads, exp_avgs, beta1)
        return self._kernels().adamw_mask_counts(list(grads), list(exp_avgs), 1 - beta1)

    def adamw_apply(
        self,
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
    ) -> None:
        if not (self._ok([*params, *grads], [*exp_avgs, *exp_avg_sqs]) and _scales_ok(scales)):
            reference.adamw_apply(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scales=scales)
            return
        decays, neg_lrs = reference.decays_and_neg_lrs(lr, weight_decay, len(params))
        neg_step_sizes = [neg_lr / (1 - beta1**step) for neg_lr, step in zip(neg_lrs, steps)]
        sqrt_bc2s = [math.sqrt(1 - beta2**step) for step in steps]
        self._kernels().adamw_apply(
            list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), neg_step_sizes, sqrt_bc2s, decays, 1 - beta1, beta2, 1 - beta2, eps, scales,
        )  # fmt: skip

    # --- Lion ----------------------------------------------------------------------------
    def lion_mask_counts(self, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
        if not self._ok(grads, exp_avgs):
            return reference.lion_mask_counts(grads, exp_avgs, beta1)
        return self._kernels().lion_mask_counts(list(grads), list(exp_avgs), 1 - beta1)

    def lion_apply(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        *,
        lr: PerTensor,
        beta1: float,
        beta2: float,
        weight_decay: PerTensor,
        scales: Optional[Tensor] = None,
    ) -> None:
        if not (self._ok([*params, *grads], exp_avgs) and _scales_ok(scales)):
            reference.lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, scales=scales)
            return
        decays, neg_lrs = reference.decays_and_neg_lrs(lr, weight_decay, len(params))
        self._kernels().lion_apply(list(params), list(grads), list(exp_avgs), decays, 1 - beta1, 1 - beta2, neg_lrs, scales)

    def lion_cautious_begin(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *, beta1: float, beta2: float
    ) -> tuple[Tensor, object]:
        """One pass: counts, the new momentum, and a 2-bit code per element of the masked update
        (n / 4 bytes of scratch until ``lion_cautious_finish``)."""
        if not self._ok([*params, *grads], exp_avgs):
            return reference.lion_cautious_begin(params, grads, exp_avgs, beta1=beta1, beta2=beta2)
        buffer, codes = self._scratch.take([self.module.lion_code_bytes(g.numel()) for g in grads])
        counts = self._kernels().lion_encode(list(grads), list(exp_avgs), codes, 1 - beta1, 1 - beta2)
        return counts, _LionCodes(buffer, codes)

    def lion_cautious_finish(
        self,
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
    ) -> None:
        if not isinstance(pending, _LionCodes):
            reference.lion_cautious_finish(pending, params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, scales=scales)
            return
        cpu_scales = scales.detach().to(device="cpu", dtype=torch.float32)
        self._kernels().lion_decode_apply(list(params), pending.codes, *reference.decays_and_neg_lrs(lr, weight_decay, len(params)), cpu_scales)
        self._scratch.give_back(pending.buffer)

    # --- CAME ----------------------------------------------------------------------------
    def came_factored_sq_sums(
        self, grads: Sequence[Tensor], layouts: Sequence[FactoredLayout], eps1: float, row_sums: Sequence[Tensor], col_sums: Sequence[Tensor]
    ) -> None:
        if not self._ok(grads, [*row_sums, *col_sums]):
            reference.came_factored_sq_sums(grads, layouts, eps1, row_sums, col_sums)
            return
        self._check_layouts(grads, layouts)
        none = [None] * len(grads)
        self._kernels().came_factored_sq_sums(
            list(grads), [l.start for l in layouts], [l.rows for l in layouts], [l.cols for l in layouts], eps1, list(row_sums), list(col_sums),
            none, 0.0, 0.0, none,
        )  # fmt: skip

    def came_factored_sq_sums_begin(
        self,
        grads: Sequence[Tensor],
        layouts: Sequence[FactoredLayout],
        eps1: float,
        row_sums: Sequence[Tensor],
        col_sums: Sequence[Tensor],
        *,
        row_states: Sequence[Tensor],
        beta2: float,
        folded: Optional[Sequence[Tensor]] = None,
    ) -> Sequence[Optional[Tensor]]:
        """Phase 1 that also folds phase 2's sum of squares over whole rows into a B*C buffer per
        fragment (``CameFactors.folded``): phase 2 then reads g only in partial rows. ``folded``:
        zeroed fp32 buffers of the column sums' sizes to fold into (returned as given; a step
        plan keeps them as views of one buffer), else allocated here."""
        if not self._ok(grads, [*row_sums, *col_sums, *row_states, *(folded or ())]):
            return reference.came_factored_sq_sums_begin(grads, layouts, eps1, row_sums, col_sums, row_states=row_states, beta2=beta2)
        self._check_layouts(grads, layouts)
        if folded is None:
            folded = [torch.zeros_like(cols) for cols in col_sums]
        self._kernels().came_factored_sq_sums(
            list(grads), [l.start for l in layouts], [l.rows for l in layouts], [l.cols for l in layouts], eps1, list(row_sums), list(col_sums),
            list(row_states), beta2, 1 - beta2, list(folded),
        )  # fmt: skip
        return folded

    def came_vector_second_moment(self, grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], beta2: float, eps1: float) -> None:
        if not self._ok(grads, exp_avg_sqs):
            reference.came_vector_second_moment(grads, exp_avg_sqs, beta2, eps1)
            return
        self._kernels().came_vector_second_moment(list(grads), list(exp_avg_sqs), beta2, 1 - beta2, eps1)

    def came_update_sumsq(self, grads: Sequence[Tensor], factors: Sequence[CameFactors]) -> Tensor:
        packed = _FactorArgs.of(factors)
        if not self._ok(grads, packed.tensors()):
            return reference.came_update_sumsq(grads, factors)
        self._check_factors(grads, factors)
        folded, row_means = packed.folded, packed.row_means
        if not self._ok([], [t for t in folded + row_means if t is not None]):
            folded, row_means = [None] * len(factors), [None] * len(factors)
        return self._kernels().came_update_sumsq(list(grads), *packed.args(), folded, row_means)

    def came_momentum(
        self,
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
        kwargs = dict(beta1=beta1, eps2=eps2, res_row_sums=res_row_sums, res_col_sums=res_col_sums)
        counts, _ = self._came_momentum(grads, exp_avgs, factors, clip_divisors, keep_mask=False, **kwargs)
        return counts

    def came_cautious_begin(
        self,
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
        """``came_momentum`` that also keeps the mask ``m * g > 0`` as one bit per element (n / 8
        bytes of scratch until ``came_cautious_finish``), so the apply pass does not read g."""
        kwargs = dict(beta1=beta1, eps2=eps2, res_row_sums=res_row_sums, res_col_sums=res_col_sums)
        return self._came_momentum(grads, exp_avgs, factors, clip_divisors, keep_mask=True, **kwargs)

    def _came_momentum(
        self,
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        factors: Sequence[CameFactors],
        clip_divisors: Tensor,
        *,
        keep_mask: bool,
        beta1: float,
        eps2: float,
        res_row_sums: Sequence[Optional[Tensor]],
        res_col_sums: Sequence[Optional[Tensor]],
    ) -> tuple[Tensor, object]:
        packed = _FactorArgs.of(factors)
        if not self._ok(grads, [*exp_avgs, *packed.tensors(), *res_row_sums, *res_col_sums]):
            kwargs = dict(beta1=beta1, eps2=eps2, res_row_sums=res_row_sums, res_col_sums=res_col_sums)
            return reference.came_cautious_begin(grads, exp_avgs, factors, clip_divisors, **kwargs)
        self._check_factors(grads, factors)
        clips = clip_divisors.detach().to(device="cpu", dtype=torch.float32).contiguous()
        kept: Optional[_CameMask] = None
        masks: list[Optional[Tensor]] = [None] * len(grads)
        if keep_mask:
            sizes = packed.mask_bytes if isinstance(factors, FactorList) and len(packed.mask_bytes) == len(grads) else None
            if sizes is None:
                sizes = [self.module.came_mask_bytes(g.numel()) for g in grads]
                if isinstance(factors, FactorList):  # a plan's fragments: the same sizes every step
                    packed.mask_bytes = sizes
            buffer, views = self._scratch.take(sizes)
            buffer[: sum(sizes)].zero_()  # the views, back to back: one op, not one per tensor
            kept, masks = _CameMask(buffer, views), list(views)
        counts = self._kernels().came_momentum(
            list(grads), list(exp_avgs), *packed.args(), clips, beta1, 1 - beta1, eps2, list(res_row_sums), list(res_col_sums), masks
        )
        return counts, kept

    def came_apply(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        confidence: Sequence[CameFactors],
        *,
        lr: PerTensor,
        weight_decay: PerTensor,
        scales: Optional[Tensor] = None,
    ) -> None:
        packed = _FactorArgs.of(confidence)
        if not (self._ok([*params, *grads], [*exp_avgs, *packed.tensors()]) and _scales_ok(scales)):
            reference.came_apply(params, grads, exp_avgs, confidence, lr=lr, weight_decay=weight_decay, scales=scales)
            return
        self._check_factors(grads, confidence)
        decays, neg_lrs = reference.decays_and_neg_lrs(lr, weight_decay, len(params))
        self._kernels().came_apply(list(params), list(grads), list(exp_avgs), *packed.args(), decays, neg_lrs, scales, [None] * len(params))

    def came_cautious_finish(
        self,
        pending: object,
        params: Sequence[Tensor],
        grads: Sequence[Tensor],
        exp_avgs: Sequence[Tensor],
        confidence: Sequence[CameFactors],
        *,
        lr: PerTensor,
        weight_decay: PerTensor,
        scales: Tensor,
    ) -> None:
        packed = _FactorArgs.of(confidence)
        if not isinstance(pending, _CameMask) or not self._ok(params, [*exp_avgs, *packed.tensors()]):
            reference.came_cautious_finish(pending, params, grads, exp_avgs, confidence, lr=lr, weight_decay=weight_decay, scales=scales)
            return
        self._check_factors(grads, confidence)
        cpu_scales = scales.detach().to(device="cpu", dtype=torch.float32)
        self._kernels().came_apply(
            list(params), list(grads), list(exp_avgs), *packed.args(), *reference.decays_and_neg_lrs(lr, weight_decay, len(params)), cpu_scales,
            pending.masks,
        )  # fmt: skip
        self._scratch.give_back(pending.buffer)

    def came_factor_update(self, buffers: FactorBuffers, beta: float) -> None:
        """One native call for a segment's factor math (fp32 buffers; float64 ones run the
        reference ops)."""
        if not self._ok([], buffers.tensors()):
            reference.came_factor_update(buffers, beta)
            return
        self._kernels().came_factor_update(*buffers.op_args(beta))

    # --- argument checks -----------------------------------------------------------------
    @staticmethod
    def _check_layouts(grads: Sequence[Tensor], layouts: Sequence[FactoredLayout]) -> None:
        if len(grads) != len(layouts):
            raise ValueError(f"{len(grads)} grads but {len(layouts)} layouts")
        for grad, layout in zip(grads, layouts):
            if grad.numel() != layout.end - layout.start:
                raise ValueError(f"grad of {grad.numel()} elements for a layout range of {layout.end - layout.start}")

    @staticmethod
    def _check_factors(grads: Sequence[Tensor], factors: Sequence[CameFactors]) -> None:
        if len(grads) != len(factors):
            raise ValueError(f"{len(grads)} grads but {len(factors)} factors")
        for grad, factor in zip(grads, factors):
            if factor.layout is not None and grad.numel() != factor.layout.end - factor.layout.start:
                raise ValueError(f"grad of {grad.numel()} elements for a layout range of {factor.layout.end - factor.layout.start}")


class _TrustedCpuOps(CpuOps):
    """``CpuOps`` whose tensors the caller has already checked with ``native_ok``."""

    def __init__(self, module: Any, scratch: _ByteScratch) -> None:
        super().__init__(module)
        self._scratch = scratch
        self._trusted = self

    @staticmethod
    def _ok(values: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]] = ()) -> bool:
        return True

    @staticmethod
    def _check_layouts(grads: Sequence[Tensor], layouts: Sequence[FactoredLayout]) -> None:
        """Counts only: the step plan made each layout from the fragment whose grad it passes
        (a grad's shape is the param's, checked before every step), so per-tensor sizes match."""
        if len(grads) != len(layouts):
            raise ValueError(f"{len(grads)} grads but {len(layouts)} layouts")

    @staticmethod
    def _check_factors(grads: Sequence[Tensor], factors: Sequence[CameFactors]) -> None:
        """Counts only, as ``_check_layouts``."""
        if len(grads) != len(factors):
            raise ValueError(f"{len(grads)} grads but {len(factors)} factors")


def native_ok(values: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]] = ()) -> bool:
    """Public form of the check the kernels make per call (see ``CpuOps.trusted``)."""
    return _native_ok(values, state)


def load() -> CpuOps:
    """Build (first use, cached) or import the extension; raises if it cannot be built."""
    from dist_cautious.kernels import build

    return CpuOps(build.load("cpu"))
