"""The fused CUDA kernels behind the signatures of ``kernels.reference``.

``load()`` builds (or imports) ``dist_cautious_cuda_kernels`` from ``csrc/cuda`` and returns a
namespace with the same functions as ``dist_cautious.kernels.reference``; ``kernels.ops_for``
picks it for CUDA tensors. Each function covers its whole list of tensors in one kernel launch
per kind of work (multi-tensor apply), keeps mask counts and partial sums on the device (no host
synchronisation), and computes in fp32 with the reference's op order and rounding.

Host-side scalars are formed here in Python double precision exactly as ``reference.py`` forms
them (``1 - beta``, ``lr / (1 - beta1**t)``, ``sqrt(1 - beta2**t)``, ``1 - lr * weight_decay``);
the binding rounds them to fp32 the way torch rounds a Python scalar in its CUDA kernels. The
apply phases take ``lr`` and ``weight_decay`` as one number or one per tensor
(``reference.PerTensor``): the scalars that depend on them travel per tensor, in the kernels'
descriptors, so one launch covers param groups that differ in them, with each tensor's math that
of a call with its own scalars.

A call whose tensors the kernels do not take (float64, not contiguous, on different devices)
runs the reference function instead: same math, so the choice never changes a result's meaning.

Inside a dispatch mode or under ``torch.compile`` every kernel call goes through the dispatcher
as ``torch.ops.dist_cautious.<name>`` (``kernels.cuda_library``): fake tensors then run the ops'
fake implementations, and a dispatch mode sees and can count each launch. Otherwise a call goes
straight to the extension's function, which the op would have run: the op's Python forwarder
costs host time per tensor in the call (``kernels/routing.py``), and on a GPU host time is the
step. ``load()`` binds the compiled extension as the ops' CUDA implementation;
``fake_namespace()`` is the same namespace without building anything, for whole steps on fake
CUDA tensors (FakeTensorMode) on a machine without a GPU. Given real CUDA tensors with no
extension loaded, its ops raise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import cuda_library, reference, routing
from dist_cautious.kernels.layout import FactoredLayout
from dist_cautious.kernels.reference import CameFactors, FactorBuffers, PerTensor, mask_scales

_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _native_ok(values: Sequence[Sequence[Optional[Tensor]]], states: Sequence[Sequence[Optional[Tensor]]], device_type: str = "cuda") -> bool:
    """True when every tensor is a contiguous tensor of ``device_type`` on one device,
    params/grads in fp32/bf16/fp16 and state in fp32 (``None`` entries are unused slots)."""
    device = None
    for tensors, allowed in [(t, _VALUE_DTYPES) for t in values] + [(t, (torch.float32,)) for t in states]:
        for tensor in tensors:
            if tensor is None:
                continue
            if tensor.device.type != device_type or not tensor.is_contiguous() or tensor.dtype not in allowed:
                return False
            if device is None:
                device = tensor.device
            elif tensor.device != device:
                return False
    return True


def _device_scales(scales: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if scales is None:
        return None
    return scales.to(device=device, dtype=torch.float32).contiguous()


def _batch_rows_cols(layout: FactoredLayout) -> tuple[int, int, int]:
    return math.prod(layout.shape[:-2]), layout.rows, layout.cols


def _step_scalars(
    lrs: Tensor, weight_decays: Tensor, steps: Optional[Tensor] = None, beta1: float = 0.0, beta2: float = 0.0
) -> Tensor:
    """``capturable``: the table the apply kernels read per tensor instead of host scalars, made
    on the device by tensor ops (no copy from the host, so a CUDA graph can capture it): one row
    per tensor, fp32 ``(alpha, inv_bc2_sqrt, decay, neg_lr)`` = ``-(lr / (1 - beta1^t))``,
    ``1 / fp32(sqrt(1 - beta2^t))``, ``1 - lr * wd``, ``-lr``, each formed in float64 by the
    reference's op order and rounded once, as the host path forms and rounds them (alpha and
    inv_bc2_sqrt only with ``steps``: AdamW). ``lrs`` / ``weight_decays``: float64 per tensor.
    Equal to the host path's scalars bit for bit wherever the device's float64 ``pow`` equals the
    host's C ``pow`` (the CPU's does); an ulp of difference there reaches fp32 only when it
    crosses a rounding boundary."""
    decays = torch.rsub(lrs * weight_decays, 1).to(torch.float32)
    neg_lrs = torch.neg(lrs).to(torch.float32)
    if steps is None:
        alphas, inv_bc2_sqrts = torch.zeros_like(decays), torch.ones_like(decays)
    else:
        powers = steps.to(torch.float64)
        alphas = torch.neg(lrs / torch.rsub(torch.pow(beta1, powers), 1)).to(torch.float32)
        inv_bc2_sqrts = torch.reciprocal(torch.sqrt(torch.rsub(torch.pow(beta2, powers), 1)).to(torch.float32))
    return torch.stack([alphas, inv_bc2_sqrts, decays, neg_lrs], dim=1)


class CudaOps:
    """The reference functions, run by the ops ``torch.ops.dist_cautious.*`` with ``ext`` bound
    as their implementation on real ``device_type`` tensors.

    ``device_type`` is ``"cuda"`` for the real kernels; the CPU tests of this wiring bind an
    emulation of the binding (``tests/gpu/binding_emulator.py``) or the CPU-thread build of the
    real sources (``tests/gpu/cuda_on_cpu``) with ``"cpu"``. ``ext=None`` binds nothing: the ops
    then run on fake tensors only (``fake_namespace``) or on whatever ``load()`` bound.
    """

    CameFactors = CameFactors

    def __init__(self, ext: Any, device_type: str = "cuda", trusted: bool = False) -> None:
        self._ext = ext
        self._device_type = device_type
        self._trusted = trusted
        self._trusted_namespace: Optional[SimpleNamespace] = None
        self._ops = cuda_library.ops()
        self._kernels()

    def native_ok(self, values: Sequence[Optional[Tensor]], state: Sequence[Optional[Tensor]]) -> bool:
        """The check each call makes (``_native_ok``) over these tensors, made once by a caller
        that keeps them (the step plan), who may then call ``trusted()``'s kernels."""
        return _native_ok([values], [state], self._device_type)

    def trusted(self) -> SimpleNamespace:
        """The same kernels without the per-call Python loop over every tensor (``_ok``): on a
        GPU host time is the step. A call the kernels cannot take then raises in the binding
        (which checks every tensor in C++) instead of running the reference."""
        if self._trusted_namespace is None:
            self._trusted_namespace = CudaOps(self._ext, self._device_type, trusted=True).namespace()
        return self._trusted_namespace

    def _kernels(self) -> Any:
        """``ext`` itself when no dispatch mode or tracer must see the call, else
        ``torch.ops.dist_cautious`` with ``ext`` bound for its device type (re-bound if another
        instance, such as a second test backend, took the slot since)."""
        if self._ext is not None and not routing.dispatched():
            return self._ext
        if self._ext is not None and cuda_library.bound(self._device_type) is not self._ext:
            cuda_library.bind(self._ext, self._device_type)
        return self._ops

    def _ok(self, values: Sequence[Sequence[Optional[Tensor]]], states: Sequence[Sequence[Optional[Tensor]]]) -> bool:
        return self._trusted or _native_ok(values, states, self._device_type)

    # --- per-tensor scalars from reduced values --------------------------------------------
    def mask_scales(self, counts: Tensor, numels: Sequence[int] | Tensor) -> Tensor:
        """``reference.mask_scales`` for all tensors of a batch in one launch (fp32 device counts
        and the sizes tensor a step plan keeps), bit for bit torch's CUDA ops; a list of sizes,
        float64 or other devices run the reference."""
        if not isinstance(numels, Tensor) or counts.numel() == 0 or not self._ok([], [[counts, numels]]):
            return mask_scales(counts, numels)
        return self._kernels().mask_scales(counts, numels)

    def came_clip_divisors(self, sumsq: Tensor, sqrt_sizes: Tensor, clip_threshold: float) -> Tensor:
        """``reference.came_clip_divisors`` for all tensors of a batch in one launch, bit for bit
        torch's CUDA ops (IEEE sqrtf and division, the scalar division as a product by
        ``1 / fp32(d)``); float64 and other devices run the reference."""
        if sumsq.numel() == 0 or not self._ok([], [[sumsq, sqrt_sizes]]):
            return reference.came_clip_divisors(sumsq, sqrt_sizes, clip_threshold)
        return self._kernels().came_clip_divisors(sumsq, sqrt_sizes, clip_threshold)

    # --- CautiousAdamW -------------------------------------------------------------------
    def adamw_mask_counts(self, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
        if not grads or not self._ok([grads], [exp_avgs]):
            return reference.adamw_mask_counts(grads, exp_avgs, beta1)
        return self._kernels().lerp_mask_counts(list(grads), list(exp_avgs), 1 - beta1, False).float()

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
        if not grads:
            return
        if not self._ok([params, grads], [exp_avgs, exp_avg_sqs]):
            _refuse_on_device(lr, "adamw_apply")
            reference.adamw_apply(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, scales=scales)
            return
        scalars = (1 - beta1, beta2, 1 - beta2, eps, _device_scales(scales, grads[0].device))
        if isinstance(lr, Tensor):
            table = _step_scalars(lr, weight_decay, steps, beta1, beta2)
            self._kernels().adamw_apply(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), [], [], [], *scalars, table)
            return
        lrs = reference.per_tensor(lr, len(grads))
        decays, _ = reference.decays_and_neg_lrs(lr, weight_decay, len(grads))
        alphas = [-(lr_i / (1 - beta1**step)) for lr_i, step in zip(lrs, steps)]
        bc2_sqrts = [math.sqrt(1 - beta2**step) for step in steps]
        self._kernels().adamw_apply(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), alphas, bc2_sqrts, decays, *scalars, None)

    # --- CautiousLion ----------------------------------------------------------------------
    def lion_mask_counts(self, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], beta1: float) -> Tensor:
        if not grads or not self._ok([grads], [exp_avgs]):
            return reference.lion_mask_counts(grads, exp_avgs, beta1)
        return self._kernels().lerp_mask_counts(list(grads), list(exp_avgs), 1 - beta1, True).float()

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
        if not grads:
            return
        if not self._ok([params, grads], [exp_avgs]):
            _refuse_on_device(lr, "lion_apply")
            reference.lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, scales=scales)
            return
        device_scales = _device_scales(scales, grads[0].device)
        if isinstance(lr, Tensor):
            table = _step_scalars(lr, weight_decay)
            self._kernels().lion_apply(list(params), list(grads), list(exp_avgs), [], 1 - beta1, 1 - beta2, [], device_scales, table)
            return
        decays, neg_lrs = reference.decays_and_neg_lrs(lr, weight_decay, len(grads))
        self._kernels().lion_apply(list(params), list(grads), list(exp_avgs), decays, 1 - beta1, 1 - beta2, neg_lrs, device_scales, None)

    def lion_cautious_begin(
        self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], *, beta1: float, beta2: float
    ) -> tuple[Tensor, object]:
        """The reference split: read-only counts now, the fused step in ``lion_cautious_finish``."""
        return self.lion_mask_counts(grads, exp_avgs, beta1), None

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
        self.lion_apply(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, scales=scales)

    # --- CAME ------------------------------------------------------------------------------
    def came_factored_sq_sums(
        self, grads: Sequence[Tensor], layouts: Sequence[FactoredLayout], eps1: float, row_sums: Sequence[Tensor], col_sums: Sequence[Tensor]
    ) -> None:
        if not grads:
            return
        if not self._ok([grads], [row_sums, col_sums]):
            reference.came_factored_sq_sums(grads, layouts, eps1, row_sums, col_sums)
            return
        shapes = [_batch_rows_cols(layout) for layout in layouts]
        self._kernels().came_factored_sq_sums(
            list(grads), [layout.start for layout in layouts], [s[0] for s in shapes], [s[1] for s in shapes], [s[2] for s in shapes],
            list(row_sums), list(col_sums), eps1,
        )

    def came_vector_second_moment(self, grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], beta2: float, eps1: float) -> None:
        if not grads:
            return
        if not self._ok([grads], [exp_avg_sqs]):
            reference.came_vector_second_moment(grads, exp_avg_sqs, beta2, eps1)
            return
        self._kernels().came_vector_second_moment(list(grads), list(exp_avg_sqs), beta2, 1 - beta2, eps1)

    def came_update_sumsq(self, grads: Sequence[Tensor], factors: Sequence[CameFactors]) -> Tensor:
        if not grads or not self._ok([grads], [_factor_tensors(factors)]):
            return reference.came_update_sumsq(grads, factors)
        sums = torch.zeros(len(grads), dtype=torch.float64, device=grads[0].device)
        factored, vector = _split(factors)
        if factored:
            self._kernels().came_factored_sumsq(
                [grads[i] for i in factored], *_layout_lists(factors, factored),
                [factors[i].row for i in factored], [factors[i].col for i in factored], factored, sums,
            )
        if vector:
            preconds, has = _vector_preconds(factors, vector, grads)
            self._kernels().came_vector_sumsq([grads[i] for i in vector], preconds, has, vector, sums)
        return sums.float()

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
        if not grads or not self._ok([grads], [exp_avgs, _factor_tensors(factors), res_row_sums, res_col_sums]):
            return reference.came_momentum(grads, exp_avgs, factors, clip_divisors, beta1=beta1, eps2=eps2, res_row_sums=res_row_sums, res_col_sums=res_col_sums)
        device = grads[0].device
        counts = torch.zeros(len(grads), dtype=torch.int64, device=device)
        divisors = clip_divisors.to(device=device, dtype=torch.float32).contiguous()
        factored, vector = _split(factors)
        if factored:
            self._kernels().came_factored_momentum(
                [grads[i] for i in factored], [exp_avgs[i] for i in factored], *_layout_lists(factors, factored),
                [factors[i].row for i in factored], [factors[i].col for i in factored],
                [res_row_sums[i] for i in factored], [res_col_sums[i] for i in factored], factored,
                divisors, beta1, 1 - beta1, eps2, counts,
            )
        if vector:
            preconds, has = _vector_preconds(factors, vector, grads)
            self._kernels().came_vector_momentum(
                [grads[i] for i in vector], [exp_avgs[i] for i in vector], preconds, has, vector, divisors, beta1, 1 - beta1, counts
            )
        return counts.float()

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
        if not grads:
            return
        if not self._ok([params, grads], [exp_avgs, _factor_tensors(confidence)]):
            _refuse_on_device(lr, "came_apply")
            reference.came_apply(params, grads, exp_avgs, confidence, lr=lr, weight_decay=weight_decay, scales=scales)
            return
        device = grads[0].device
        device_scales = _device_scales(scales, device)
        table: Optional[Tensor] = None
        if isinstance(lr, Tensor):
            table = _step_scalars(lr, weight_decay)
            decays: list[float] = []
            neg_lrs: list[float] = []
        else:
            decays, neg_lrs = reference.decays_and_neg_lrs(lr, weight_decay, len(grads))

        def pick(values: list[float], positions: list[int]) -> list[float]:
            return [values[i] for i in positions] if values else []

        factored, vector = _split(confidence)
        if factored:
            self._kernels().came_factored_apply(
                [params[i] for i in factored], [grads[i] for i in factored], [exp_avgs[i] for i in factored],
                *_layout_lists(confidence, factored), [confidence[i].row for i in factored], [confidence[i].col for i in factored],
                factored, pick(decays, factored), pick(neg_lrs, factored), device_scales, len(grads), table,
            )
        if vector:
            preconds, has = _vector_preconds(confidence, vector, grads)
            self._kernels().came_vector_apply(
                [params[i] for i in vector], [grads[i] for i in vector], [exp_avgs[i] for i in vector], preconds, has, vector,
                pick(decays, vector), pick(neg_lrs, vector), device_scales, len(grads), table,
            )

    def came_factor_update(self, buffers: FactorBuffers, beta: float) -> None:
        """CAME's factor math on a segment's flat buffers in one launch (``came_factors.cu``):
        the EMAs of rows and columns, each matrix's mean, the row and column factors. Buffers the
        kernel does not take (float64, off the device) run the reference's torch ops instead.
        The run table the kernel reads is uploaded by the binding once per distinct list of runs
        (a plan keeps its buffers, so later steps copy nothing to the device)."""
        if not self._ok([], [buffers.tensors()]):
            reference.came_factor_update(buffers, beta)
            return
        self._kernels().came_factor_update(*buffers.op_args(beta))

    def came_factored_sq_sums_begin(self, grads: Sequence[Tensor], layouts: Sequence[Any], eps1: float, row_sums: Sequence[Tensor], col_sums: Sequence[Tensor], **_: Any) -> list[Optional[Tensor]]:
        """The reference pairing: phase 1 here, phase 2 a pass of its own (nothing folded)."""
        self.came_factored_sq_sums(grads, layouts, eps1, row_sums, col_sums)
        return [None] * len(grads)

    def came_cautious_begin(self, grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], factors: Sequence[CameFactors], clip_divisors: Tensor, **kwargs: Any) -> tuple[Tensor, object]:
        """The reference pairing: ``came_momentum`` now, ``came_apply`` (reading g) to finish."""
        return self.came_momentum(grads, exp_avgs, factors, clip_divisors, **kwargs), None

    def came_cautious_finish(self, pending: object, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], confidence: Sequence[CameFactors], **kwargs: Any) -> None:
        self.came_apply(params, grads, exp_avgs, confidence, **kwargs)

    def namespace(self) -> SimpleNamespace:
        """The module-like object ``kernels.ops_for`` hands to the optimizers."""
        names = [
            "adamw_mask_counts", "adamw_apply", "lion_mask_counts", "lion_apply", "lion_cautious_begin", "lion_cautious_finish",
            "came_factored_sq_sums",
            "came_vector_second_moment", "came_update_sumsq", "came_momentum", "came_apply", "came_cautious_begin", "came_cautious_finish",
            "came_factored_sq_sums_begin", "came_factor_update", "mask_scales", "came_clip_divisors",
        ]
        names += ["native_ok", "trusted"]
        return SimpleNamespace(CameFactors=CameFactors, native="cuda", capturable=True, **{name: getattr(self, name) for name in names})


def _refuse_on_device(lr: Any, op: str) -> None:
    """The reference ops take lr and steps as host numbers: a capturable call (a device ``lr``)
    whose tensors the kernels do not take raises rather than read them back."""
    if isinstance(lr, Tensor):
        raise ValueError(f"dist_cautious CUDA kernels: {op} with capturable=True needs contiguous fp32 / bf16 / fp16 tensors on one device")


def _factor_tensors(factors: Sequence[CameFactors]) -> list[Optional[Tensor]]:
    return [t for f in factors for t in (f.row, f.col, f.elementwise)]


def _split(factors: Sequence[CameFactors]) -> tuple[list[int], list[int]]:
    """Positions of factored (row x column) and of elementwise / identity factors."""
    factored = [i for i, f in enumerate(factors) if f.layout is not None]
    vector = [i for i, f in enumerate(factors) if f.layout is None]
    return factored, vector


def _layout_lists(factors: Sequence[CameFactors], positions: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    layouts = [factors[i].layout for i in positions]
    shapes = [_batch_rows_cols(layout) for layout in layouts]
    return [layout.start for layout in layouts], [s[0] for s in shapes], [s[1] for s in shapes], [s[2] for s in shapes]


def _vector_preconds(factors: Sequence[CameFactors], positions: list[int], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[bool]]:
    """The elementwise second moments (``rsqrt`` applied in the kernel) or, for the identity, a
    placeholder that the kernel never reads."""
    elementwise = [factors[i].elementwise for i in positions]
    has = [tensor is not None for tensor in elementwise]
    if all(has):
        return elementwise, has
    placeholder = grads[positions[0]].new_empty(0, dtype=torch.float32)  # one for all: never read
    return [placeholder if tensor is None else tensor for tensor in elementwise], has


def load() -> SimpleNamespace:
    """Build or import the CUDA extension, bind it as the CUDA implementation of
    ``torch.ops.dist_cautious.*`` and return the kernel namespace; raises without CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    from dist_cautious.kernels.build import load as build_load

    return CudaOps(build_load("cuda")).namespace()


def fake_namespace() -> SimpleNamespace:
    """The CUDA kernel namespace over the registered custom ops, without building or binding the
    extension: a whole step on fake CUDA tensors (``FakeTensorMode``) runs the ops' fake
    implementations, so device placement, host synchronisation and dispatch can be checked on a
    machine without a GPU. It never turns a real step into a no-op: on real CUDA tensors its ops
    run the kernels ``load()`` bound in this process, or raise when none were bound.
    ``kernels.ops_override("cuda", fake_namespace())`` hands it to the optimizers."""
    namespace = CudaOps(None, "cuda").namespace()
    namespace.native = "cuda (custom ops only; fake tensors unless load() bound the extension)"
    return namespace
