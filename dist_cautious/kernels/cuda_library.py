"""The CUDA binding's entry points as PyTorch custom ops: ``torch.ops.dist_cautious.*``.

Why custom ops rather than plain calls into the pybind module: an op that goes through torch's
dispatcher is visible to everything that works at that level. Under ``FakeTensorMode`` the fake
implementations below run instead of the kernels, so a whole optimizer step on fake CUDA tensors
can be traced on a machine without a GPU (device placement, host synchronisation, which ops run);
a ``TorchDispatchMode`` can count the kernels a step launches; ``torch.compile`` can trace around
them. The schemas declare which arguments each op writes (``Tensor(a!)``), so nothing that
reorders or functionalises ops can lose an in-place update.

Each op's real implementation is a thin forwarder to a *backend*: an object with the binding's
functions (``dist_cautious_cuda_kernels``, or a test build of it). ``bind(ext, "cuda")`` installs
the backend when the compiled extension loads (``cuda_ops.load``); the tests' CPU-thread build
binds itself to ``"cpu"``. An op dispatched to a device with no backend bound raises; it never
does nothing. The fake implementations only check what the binding checks (lengths, devices,
contiguity, dtypes, element counts, layouts, output slots) and make outputs of the right shape,
dtype and device.

The four apply ops end in an optional ``step_scalars`` (``capturable=True``): each tensor's
lr- and step-dependent scalars from an fp32 device table ``[slots, 4]`` (row ``out_index``:
alpha, inv_bc2_sqrt, decay, neg_lr, in the fp32 form the kernels use) instead of the host lists
``alphas`` / ``bc2_sqrts`` / ``decays`` / ``neg_lrs``, which must then be empty.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import fake_checks

NAMESPACE = "dist_cautious"

#: schema per op, in the binding's argument order; ``(x!)`` marks what the op writes in place
SCHEMAS: dict[str, str] = {
    "lerp_mask_counts": "(Tensor[] grads, Tensor[] exp_avgs, float weight, bool lion) -> Tensor",
    "adamw_apply": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float[] alphas, "
        "float[] bc2_sqrts, float[] decays, float lerp_weight, float beta2, float one_minus_beta2, float eps, Tensor? scales, "
        "Tensor? step_scalars=None) -> ()"
    ),
    "lion_apply": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float[] decays, float weight1, float weight2, "
        "float[] neg_lrs, Tensor? scales, Tensor? step_scalars=None) -> ()"
    ),
    "came_vector_second_moment": "(Tensor[] grads, Tensor(a!)[] exp_avg_sqs, float beta2, float one_minus_beta2, float eps1) -> ()",
    "came_vector_sumsq": "(Tensor[] grads, Tensor[] preconds, bool[] has_precond, int[] out_index, Tensor(a!) sums) -> ()",
    "came_vector_momentum": (
        "(Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor[] preconds, bool[] has_precond, int[] out_index, Tensor divisors, "
        "float beta1, float one_minus_beta1, Tensor(b!) counts) -> ()"
    ),
    "came_vector_apply": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] preconds, bool[] has_precond, int[] out_index, "
        "float[] decays, float[] neg_lrs, Tensor? scales, int num_scales, Tensor? step_scalars=None) -> ()"
    ),
    "came_factored_sq_sums": (
        "(Tensor[] grads, int[] starts, int[] batches, int[] rows, int[] cols, Tensor(a!)[] row_sums, Tensor(b!)[] col_sums, "
        "float eps1) -> ()"
    ),
    "came_factored_sumsq": (
        "(Tensor[] grads, int[] starts, int[] batches, int[] rows, int[] cols, Tensor[] row_factor, Tensor[] col_factor, "
        "int[] out_index, Tensor(a!) sums) -> ()"
    ),
    "came_factored_momentum": (
        "(Tensor[] grads, Tensor(a!)[] exp_avgs, int[] starts, int[] batches, int[] rows, int[] cols, Tensor[] row_factor, "
        "Tensor[] col_factor, Tensor(b!)[] res_row_sums, Tensor(c!)[] res_col_sums, int[] out_index, Tensor divisors, "
        "float beta1, float one_minus_beta1, float eps2, Tensor(d!) counts) -> ()"
    ),
    "came_factored_apply": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, int[] starts, int[] batches, int[] rows, int[] cols, "
        "Tensor[] row_factor, Tensor[] col_factor, int[] out_index, float[] decays, float[] neg_lrs, Tensor? scales, "
        "int num_scales, Tensor? step_scalars=None) -> ()"
    ),
    "came_factor_update": (
        "(Tensor(a!) row_state, Tensor(b!) col_state, Tensor row_sums, Tensor col_sums, Tensor row_counts, Tensor col_counts, "
        "int[] run_rows_per_matrix, int[] run_rows, float beta, float one_minus_beta, Tensor(c!) row_factor, Tensor(d!) col_factor, "
        "Tensor(e!) means) -> ()"
    ),
    "mask_scales": "(Tensor counts, Tensor sizes) -> Tensor",
    "came_clip_divisors": "(Tensor sumsq, Tensor sqrt_sizes, float clip_threshold) -> Tensor",
}

#: columns of the apply ops' step-scalars table (capturable): alpha, inv_bc2_sqrt, decay, neg_lr
#: per tensor (csrc/cuda/dc_kernels.h, StepScalarColumn)
STEP_SCALAR_COLUMNS = 4

#: device type -> dispatch key of the real implementations
_DISPATCH_KEYS = {"cuda": "CUDA", "cpu": "CPU"}
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
#: device type -> the object whose functions run the ops on real tensors of that device type
_backends: dict[str, Any] = {}


def bind(ext: Any, device_type: str = "cuda") -> None:
    """Run ``torch.ops.dist_cautious.*`` on real ``device_type`` tensors with ``ext``'s functions
    (same names and arguments as the binding); replaces any backend bound before for that type."""
    if device_type not in _DISPATCH_KEYS:
        raise ValueError(f"dist_cautious custom ops: no dispatch key for device type {device_type!r}")
    missing = [name for name in SCHEMAS if not callable(getattr(ext, name, None))]
    if missing:
        raise TypeError(f"dist_cautious custom ops: {type(ext).__name__} lacks {missing}")
    _backends[device_type] = ext


def bound(device_type: str = "cuda") -> Optional[Any]:
    """The backend bound for ``device_type``, or ``None`` (then only fake tensors can run the ops)."""
    return _backends.get(device_type)


def ops() -> Any:
    """``torch.ops.dist_cautious``: the registered ops."""
    return getattr(torch.ops, NAMESPACE)


def _forwarder(name: str, device_type: str) -> Any:
    def forward(*args: Any) -> Any:
        backend = _backends.get(device_type)
        if backend is None:
            raise RuntimeError(
                f"{NAMESPACE}::{name} on real {device_type} tensors, but no {device_type} kernels are bound: "
                "the extension was not loaded (cuda_ops.load()), and the op namespace alone runs only under FakeTensorMode"
            )
        return getattr(backend, name)(*args)

    forward.__name__ = f"{name}_{device_type}"
    return forward


# --- fake implementations: the binding's checks, outputs of the right shape --------------------


_fail = functools.partial(fake_checks.fail, "CUDA")
_same_length = functools.partial(fake_checks.same_length, "CUDA")


def _flat(name: str, tensor: Tensor, what: str, device: torch.device, numel: int = -1, dtypes: tuple[torch.dtype, ...] = _VALUE_DTYPES) -> None:
    if tensor.device != device:
        _fail(name, f"{what} must be on {device}, got {tensor.device}")
    if not tensor.is_contiguous():
        _fail(name, f"{what} must be contiguous")
    if tensor.dtype not in dtypes:
        _fail(name, f"{what} must be one of {dtypes}, got {tensor.dtype}")
    if numel >= 0 and tensor.numel() != numel:
        _fail(name, f"{what} has {tensor.numel()} elements, expected {numel}")


def _state(name: str, tensor: Tensor, what: str, device: torch.device, numel: int = -1) -> None:
    _flat(name, tensor, what, device, numel, (torch.float32,))


def _slots(name: str, out_index: Sequence[int], limit: int) -> None:
    for index in out_index:
        if not 0 <= index < limit:
            _fail(name, f"out_index {index} outside [0, {limit})")


def _scales(name: str, scales: Optional[Tensor], device: torch.device, count: int) -> None:
    if scales is not None:
        _state(name, scales, "scales", device, count)


def _host_scalars(
    name: str, step_scalars: Optional[Tensor], device: torch.device, slots: int, **lists: Sequence[float]
) -> dict[str, Sequence[float]]:
    """The apply ops' host per-tensor lists that must have one value per tensor: all of ``lists``
    without a step-scalars table; none with one (capturable: the scalars come from the device
    table, fp32 ``[slots, STEP_SCALAR_COLUMNS]``, and the host lists must be empty)."""
    if step_scalars is None:
        return lists
    given = {key: len(values) for key, values in lists.items() if len(values)}
    if given:
        _fail(name, f"with step_scalars the host lists must be empty, got {given}")
    _state(name, step_scalars, "step_scalars", device)
    if tuple(step_scalars.shape) != (slots, STEP_SCALAR_COLUMNS):
        _fail(name, f"step_scalars must have shape [{slots}, {STEP_SCALAR_COLUMNS}], got {list(step_scalars.shape)}")
    return {}


def _elementwise(
    name: str, grads: Sequence[Tensor], device: torch.device, values: dict[str, Sequence[Tensor]], states: dict[str, Sequence[Tensor]]
) -> None:
    for index, grad in enumerate(grads):
        _flat(name, grad, f"grads[{index}]", device)
        for key, tensors in values.items():
            _flat(name, tensors[index], f"{key}[{index}]", device, grad.numel())
        for key, tensors in states.items():
            _state(name, tensors[index], f"{key}[{index}]", device, grad.numel())


def _preconds(name: str, grads: Sequence[Tensor], preconds: Sequence[Tensor], has: Sequence[bool], device: torch.device) -> None:
    for index, (grad, precond, used) in enumerate(zip(grads, preconds, has)):
        _flat(name, grad, f"grads[{index}]", device)
        if used:
            _state(name, precond, f"preconds[{index}]", device, grad.numel())


def _factored(
    name: str,
    grads: Sequence[Tensor],
    starts: Sequence[int],
    batches: Sequence[int],
    rows: Sequence[int],
    cols: Sequence[int],
    device: torch.device,
    row_like: dict[str, Sequence[Tensor]],
    col_like: dict[str, Sequence[Tensor]],
) -> None:
    for index, (grad, start, b, r, c) in enumerate(zip(grads, starts, batches, rows, cols)):
        _flat(name, grad, f"grads[{index}]", device)
        if min(b, r, c) <= 0 or start < 0 or start + grad.numel() > b * r * c:
            _fail(name, f"grads[{index}]: range [{start}, {start + grad.numel()}) outside a ({b}, {r}, {c}) tensor")
        for key, tensors in row_like.items():
            _state(name, tensors[index], f"{key}[{index}]", device, b * r)
        for key, tensors in col_like.items():
            _state(name, tensors[index], f"{key}[{index}]", device, b * c)


def _buffer(name: str, tensor: Tensor, what: str, device: torch.device, dtype: torch.dtype) -> None:
    _flat(name, tensor, what, device, -1, (dtype,))


def _fake_lerp_mask_counts(grads: list[Tensor], exp_avgs: list[Tensor], weight: float, lion: bool) -> Tensor:
    name = "lerp_mask_counts"
    if not grads:
        _fail(name, "empty list")
    _same_length(name, grads=grads, exp_avgs=exp_avgs)
    device = grads[0].device
    _elementwise(name, grads, device, {}, {"exp_avgs": exp_avgs})
    return torch.empty(len(grads), dtype=torch.int64, device=device)


def _fake_adamw_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], alphas: list[float],
    bc2_sqrts: list[float], decays: list[float], lerp_weight: float, beta2: float, one_minus_beta2: float, eps: float,
    scales: Optional[Tensor], step_scalars: Optional[Tensor] = None,
) -> None:  # fmt: skip
    name = "adamw_apply"
    if not grads:
        return
    device = grads[0].device
    host = _host_scalars(name, step_scalars, device, len(grads), alphas=alphas, bc2_sqrts=bc2_sqrts, decays=decays)
    _same_length(name, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, **host)
    _elementwise(name, grads, device, {"params": params}, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    _scales(name, scales, device, len(grads))


def _fake_lion_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], decays: list[float], weight1: float, weight2: float,
    neg_lrs: list[float], scales: Optional[Tensor], step_scalars: Optional[Tensor] = None,
) -> None:  # fmt: skip
    name = "lion_apply"
    if not grads:
        return
    device = grads[0].device
    host = _host_scalars(name, step_scalars, device, len(grads), decays=decays, neg_lrs=neg_lrs)
    _same_length(name, params=params, grads=grads, exp_avgs=exp_avgs, **host)
    _elementwise(name, grads, device, {"params": params}, {"exp_avgs": exp_avgs})
    _scales(name, scales, device, len(grads))


def _fake_came_vector_second_moment(grads: list[Tensor], exp_avg_sqs: list[Tensor], beta2: float, one_minus_beta2: float, eps1: float) -> None:
    name = "came_vector_second_moment"
    if not grads:
        return
    _same_length(name, grads=grads, exp_avg_sqs=exp_avg_sqs)
    _elementwise(name, grads, grads[0].device, {}, {"exp_avg_sqs": exp_avg_sqs})


def _fake_came_vector_sumsq(grads: list[Tensor], preconds: list[Tensor], has_precond: list[bool], out_index: list[int], sums: Tensor) -> None:
    name = "came_vector_sumsq"
    if not grads:
        return
    _same_length(name, grads=grads, preconds=preconds, has_precond=has_precond, out_index=out_index)
    device = grads[0].device
    _buffer(name, sums, "sums", device, torch.float64)
    _preconds(name, grads, preconds, has_precond, device)
    _slots(name, out_index, sums.numel())


def _fake_came_vector_momentum(
    grads: list[Tensor], exp_avgs: list[Tensor], preconds: list[Tensor], has_precond: list[bool], out_index: list[int], divisors: Tensor,
    beta1: float, one_minus_beta1: float, counts: Tensor,
) -> None:  # fmt: skip
    name = "came_vector_momentum"
    if not grads:
        return
    _same_length(name, grads=grads, exp_avgs=exp_avgs, preconds=preconds, has_precond=has_precond, out_index=out_index)
    device = grads[0].device
    _state(name, divisors, "clip divisors", device)
    _buffer(name, counts, "counts", device, torch.int64)
    _elementwise(name, grads, device, {}, {"exp_avgs": exp_avgs})
    _preconds(name, grads, preconds, has_precond, device)
    _slots(name, out_index, min(counts.numel(), divisors.numel()))


def _fake_came_vector_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], preconds: list[Tensor], has_precond: list[bool], out_index: list[int],
    decays: list[float], neg_lrs: list[float], scales: Optional[Tensor], num_scales: int, step_scalars: Optional[Tensor] = None,
) -> None:  # fmt: skip
    name = "came_vector_apply"
    if not grads:
        return
    device = grads[0].device
    host = _host_scalars(name, step_scalars, device, num_scales, decays=decays, neg_lrs=neg_lrs)
    _same_length(
        name, params=params, grads=grads, exp_avgs=exp_avgs, preconds=preconds, has_precond=has_precond, out_index=out_index, **host
    )  # fmt: skip
    _elementwise(name, grads, device, {"params": params}, {"exp_avgs": exp_avgs})
    _preconds(name, grads, preconds, has_precond, device)
    _scales(name, scales, device, num_scales)
    _slots(name, out_index, num_scales)


def _fake_came_factored_sq_sums(
    grads: list[Tensor], starts: list[int], batches: list[int], rows: list[int], cols: list[int], row_sums: list[Tensor],
    col_sums: list[Tensor], eps1: float,
) -> None:  # fmt: skip
    name = "came_factored_sq_sums"
    if not grads:
        return
    _same_length(name, grads=grads, starts=starts, batches=batches, rows=rows, cols=cols, row_sums=row_sums, col_sums=col_sums)
    _factored(name, grads, starts, batches, rows, cols, grads[0].device, {"row_sums": row_sums}, {"col_sums": col_sums})


def _fake_came_factored_sumsq(
    grads: list[Tensor], starts: list[int], batches: list[int], rows: list[int], cols: list[int], row_factor: list[Tensor],
    col_factor: list[Tensor], out_index: list[int], sums: Tensor,
) -> None:  # fmt: skip
    name = "came_factored_sumsq"
    if not grads:
        return
    _same_length(name, grads=grads, starts=starts, batches=batches, rows=rows, cols=cols, row_factor=row_factor, col_factor=col_factor, out_index=out_index)
    device = grads[0].device
    _buffer(name, sums, "sums", device, torch.float64)
    _factored(name, grads, starts, batches, rows, cols, device, {"row_factor": row_factor}, {"col_factor": col_factor})
    _slots(name, out_index, sums.numel())


def _fake_came_factored_momentum(
    grads: list[Tensor], exp_avgs: list[Tensor], starts: list[int], batches: list[int], rows: list[int], cols: list[int],
    row_factor: list[Tensor], col_factor: list[Tensor], res_row_sums: list[Tensor], res_col_sums: list[Tensor], out_index: list[int],
    divisors: Tensor, beta1: float, one_minus_beta1: float, eps2: float, counts: Tensor,
) -> None:  # fmt: skip
    name = "came_factored_momentum"
    if not grads:
        return
    _same_length(
        name, grads=grads, exp_avgs=exp_avgs, starts=starts, batches=batches, rows=rows, cols=cols, row_factor=row_factor,
        col_factor=col_factor, res_row_sums=res_row_sums, res_col_sums=res_col_sums, out_index=out_index,
    )  # fmt: skip
    device = grads[0].device
    _state(name, divisors, "clip divisors", device)
    _buffer(name, counts, "counts", device, torch.int64)
    _elementwise(name, grads, device, {}, {"exp_avgs": exp_avgs})
    _factored(
        name, grads, starts, batches, rows, cols, device,
        {"row_factor": row_factor, "res_row_sums": res_row_sums}, {"col_factor": col_factor, "res_col_sums": res_col_sums},
    )  # fmt: skip
    _slots(name, out_index, min(counts.numel(), divisors.numel()))


def _fake_came_factored_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], starts: list[int], batches: list[int], rows: list[int],
    cols: list[int], row_factor: list[Tensor], col_factor: list[Tensor], out_index: list[int], decays: list[float],
    neg_lrs: list[float], scales: Optional[Tensor], num_scales: int, step_scalars: Optional[Tensor] = None,
) -> None:  # fmt: skip
    name = "came_factored_apply"
    if not grads:
        return
    device = grads[0].device
    host = _host_scalars(name, step_scalars, device, num_scales, decays=decays, neg_lrs=neg_lrs)
    _same_length(
        name, params=params, grads=grads, exp_avgs=exp_avgs, starts=starts, batches=batches, rows=rows, cols=cols,
        row_factor=row_factor, col_factor=col_factor, out_index=out_index, **host,
    )  # fmt: skip
    _elementwise(name, grads, device, {"params": params}, {"exp_avgs": exp_avgs})
    _factored(name, grads, starts, batches, rows, cols, device, {"row_factor": row_factor}, {"col_factor": col_factor})
    _scales(name, scales, device, num_scales)
    _slots(name, out_index, num_scales)


def _fake_came_factor_update(
    row_state: Tensor, col_state: Tensor, row_sums: Tensor, col_sums: Tensor, row_counts: Tensor, col_counts: Tensor,
    run_rows_per_matrix: list[int], run_rows: list[int], beta: float, one_minus_beta: float, row_factor: Tensor, col_factor: Tensor,
    means: Tensor,
) -> None:  # fmt: skip
    name = "came_factor_update"
    fake_checks.factor_update_sizes(
        "CUDA", row_state, col_state, row_sums, col_sums, row_counts, col_counts, run_rows_per_matrix, run_rows, row_factor, col_factor, means
    )
    device = row_state.device
    for what, tensor in (
        ("row state", row_state), ("column state", col_state), ("row sums", row_sums), ("column sums", col_sums),
        ("row counts", row_counts), ("column counts", col_counts), ("row factor", row_factor), ("column factor", col_factor),
        ("means", means),
    ):  # fmt: skip
        _state(name, tensor, what, device)


def _per_tensor_values(name: str, values: Tensor, other: Tensor, what: str, other_what: str) -> Tensor:
    """The step-scalar ops: a new fp32 vector, one value per tensor, from two of equal length."""
    if values.dim() != 1:
        _fail(name, f"{what} must be a vector, got {values.dim()} dimensions")
    _state(name, values, what, values.device)
    _state(name, other, other_what, values.device, values.numel())
    return torch.empty(values.numel(), dtype=torch.float32, device=values.device)


def _fake_mask_scales(counts: Tensor, sizes: Tensor) -> Tensor:
    return _per_tensor_values("mask_scales", counts, sizes, "counts", "sizes")


def _fake_came_clip_divisors(sumsq: Tensor, sqrt_sizes: Tensor, clip_threshold: float) -> Tensor:
    return _per_tensor_values("came_clip_divisors", sumsq, sqrt_sizes, "sums of squares", "square roots of the sizes")


_FAKES = {
    "lerp_mask_counts": _fake_lerp_mask_counts,
    "adamw_apply": _fake_adamw_apply,
    "lion_apply": _fake_lion_apply,
    "came_vector_second_moment": _fake_came_vector_second_moment,
    "came_vector_sumsq": _fake_came_vector_sumsq,
    "came_vector_momentum": _fake_came_vector_momentum,
    "came_vector_apply": _fake_came_vector_apply,
    "came_factored_sq_sums": _fake_came_factored_sq_sums,
    "came_factored_sumsq": _fake_came_factored_sumsq,
    "came_factored_momentum": _fake_came_factored_momentum,
    "came_factored_apply": _fake_came_factored_apply,
    "came_factor_update": _fake_came_factor_update,
    "mask_scales": _fake_mask_scales,
    "came_clip_divisors": _fake_came_clip_divisors,
}
assert _FAKES.keys() == SCHEMAS.keys()


def _register() -> None:
    for name, schema in SCHEMAS.items():
        qualname = f"{NAMESPACE}::{name}"
        torch.library.define(qualname, schema, lib=_lib)
        for device_type, key in _DISPATCH_KEYS.items():
            _lib.impl(name, _forwarder(name, device_type), key)
        torch.library.register_fake(qualname, _FAKES[name], lib=_lib)


_register()


def op_names() -> list[str]:
    """The ops' qualified names (``dist_cautious::<name>``), as a dispatch mode reports them."""
    return [f"{NAMESPACE}::{name}" for name in SCHEMAS]

