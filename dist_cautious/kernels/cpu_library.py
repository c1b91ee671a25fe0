"""The CPU kernels' custom ops, ``torch.ops.dist_cautious_cpu.*``, and their fake implementations.

The extension (``csrc/cpu/binding.cpp``) defines the ops, their schemas and their CPU kernels in
C++ (``TORCH_LIBRARY``), so a call goes from Python straight to the dispatcher and on to the
kernel, with no Python forwarder in between. Going through the dispatcher is what makes the
kernels visible: a ``TorchDispatchMode`` counts each call as one op, ``FakeTensorMode`` runs the
fake implementations below instead of the kernels (a whole CPU step can be traced without
touching data), and ``torch.compile`` can trace the code around them.

An eager step with no dispatch mode active calls the same C++ functions directly through the
extension's Python module instead (``Route``; why and what it saves: ``kernels/routing.py``).

The fake implementations check what the Python caller controls and a shape-only run can know
(list lengths, element counts, the clip divisors' length) and return outputs of the right shape,
dtype and device; the binding's remaining checks (contiguity, dtypes, layouts) need real tensors.
``kernels()`` loads nothing: ``cpu_ops.load`` imports the extension first, which defines the ops.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import Tensor

from dist_cautious.kernels import fake_checks, routing

NAMESPACE = "dist_cautious_cpu"

#: the ops the extension defines, by name (``torch.ops.dist_cautious_cpu.<name>``)
OPS = (
    "adamw_mask_counts",
    "lion_mask_counts",
    "adamw_apply",
    "lion_apply",
    "lion_encode",
    "lion_decode_apply",
    "came_factored_sq_sums",
    "came_vector_second_moment",
    "came_update_sumsq",
    "came_momentum",
    "came_apply",
    "came_factor_update",
    "mask_scales",
)


_fail = functools.partial(fake_checks.fail, "CPU")
_same_length = functools.partial(fake_checks.same_length, "CPU")


def _same_sizes(name: str, grads: Sequence[Tensor], **tensors: Sequence[Optional[Tensor]]) -> None:
    """Each listed tensor has its grad's element count (the kernels read them as flat)."""
    for key, values in tensors.items():
        for index, (grad, value) in enumerate(zip(grads, values)):
            if value is not None and value.numel() != grad.numel():
                _fail(name, f"{key}[{index}] has {value.numel()} elements, grads[{index}] {grad.numel()}")


def _per_tensor(grads: Sequence[Tensor]) -> Tensor:
    """A float32 vector with one entry per tensor: the counts and sums the kernels return."""
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty(len(grads), dtype=torch.float32, device=device)


def _fake_mask_counts(grads: list[Tensor], exp_avgs: list[Tensor], weight: float) -> Tensor:
    _same_length("mask_counts", grads=grads, exp_avgs=exp_avgs)
    _same_sizes("mask_counts", grads, exp_avgs=exp_avgs)
    return _per_tensor(grads)


def _fake_adamw_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], neg_step_sizes: list[float],
    sqrt_bc2s: list[float], decays: list[float], m_weight: float, beta2: float, one_minus_beta2: float, eps: float, scales: Optional[Tensor],
) -> None:  # fmt: skip
    name = "adamw_apply"
    _same_length(
        name, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, neg_step_sizes=neg_step_sizes, sqrt_bc2s=sqrt_bc2s,
        decays=decays,
    )  # fmt: skip
    _same_sizes(name, grads, params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)


def _fake_lion_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], decays: list[float], update_weight: float, m_weight: float,
    neg_lrs: list[float], scales: Optional[Tensor],
) -> None:  # fmt: skip
    _same_length("lion_apply", params=params, grads=grads, exp_avgs=exp_avgs, decays=decays, neg_lrs=neg_lrs)
    _same_sizes("lion_apply", grads, params=params, exp_avgs=exp_avgs)


def _fake_lion_encode(grads: list[Tensor], exp_avgs: list[Tensor], codes: list[Tensor], update_weight: float, m_weight: float) -> Tensor:
    _same_length("lion_encode", grads=grads, exp_avgs=exp_avgs, codes=codes)
    _same_sizes("lion_encode", grads, exp_avgs=exp_avgs)
    return _per_tensor(grads)


def _fake_lion_decode_apply(params: list[Tensor], codes: list[Tensor], decays: list[float], neg_lrs: list[float], scales: Tensor) -> None:
    _same_length("lion_decode_apply", params=params, codes=codes, decays=decays, neg_lrs=neg_lrs)


def _fake_came_factored_sq_sums(
    grads: list[Tensor], starts: list[int], rows: list[int], cols: list[int], eps1: float, row_sums: list[Tensor], col_sums: list[Tensor],
    row_states: list[Optional[Tensor]], beta2: float, one_minus_beta2: float, folded: list[Optional[Tensor]],
) -> None:  # fmt: skip
    _same_length(
        "came_factored_sq_sums", grads=grads, starts=starts, rows=rows, cols=cols, row_sums=row_sums, col_sums=col_sums,
        row_states=row_states, folded=folded,
    )  # fmt: skip


def _fake_came_vector_second_moment(grads: list[Tensor], exp_avg_sqs: list[Tensor], beta2: float, one_minus_beta2: float, eps1: float) -> None:
    _same_length("came_vector_second_moment", grads=grads, exp_avg_sqs=exp_avg_sqs)
    _same_sizes("came_vector_second_moment", grads, exp_avg_sqs=exp_avg_sqs)


def _factor_lists(name: str, grads: Sequence[Tensor], *lists: Sequence[Any]) -> None:
    """kinds, starts, rows, cols, row / column / elementwise factors: one entry per grad."""
    keys = ("kinds", "starts", "rows", "cols", "row_factor", "col_factor", "elementwise")
    _same_length(name, grads=grads, **dict(zip(keys, lists)))
    _same_sizes(name, grads, elementwise=lists[6])


def _fake_came_update_sumsq(
    grads: list[Tensor], kinds: list[int], starts: list[int], rows: list[int], cols: list[int], row_factor: list[Optional[Tensor]],
    col_factor: list[Optional[Tensor]], elementwise: list[Optional[Tensor]], folded: list[Optional[Tensor]], row_means: list[Optional[Tensor]],
) -> Tensor:  # fmt: skip
    name = "came_update_sumsq"
    _factor_lists(name, grads, kinds, starts, rows, cols, row_factor, col_factor, elementwise)
    _same_length(name, grads=grads, folded=folded, row_means=row_means)
    return _per_tensor(grads)


def _fake_came_momentum(
    grads: list[Tensor], exp_avgs: list[Tensor], kinds: list[int], starts: list[int], rows: list[int], cols: list[int],
    row_factor: list[Optional[Tensor]], col_factor: list[Optional[Tensor]], elementwise: list[Optional[Tensor]], clips: Tensor, beta1: float,
    one_minus_beta1: float, eps2: float, res_row_sums: list[Optional[Tensor]], res_col_sums: list[Optional[Tensor]], masks: list[Optional[Tensor]],
) -> Tensor:  # fmt: skip
    name = "came_momentum"
    _factor_lists(name, grads, kinds, starts, rows, cols, row_factor, col_factor, elementwise)
    _same_length(name, grads=grads, exp_avgs=exp_avgs, res_row_sums=res_row_sums, res_col_sums=res_col_sums, masks=masks)
    _same_sizes(name, grads, exp_avgs=exp_avgs)
    if clips.numel() != len(grads):
        _fail(name, f"{clips.numel()} clip divisors for {len(grads)} tensors")
    return _per_tensor(grads)


def _fake_came_apply(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], kinds: list[int], starts: list[int], rows: list[int], cols: list[int],
    row_factor: list[Optional[Tensor]], col_factor: list[Optional[Tensor]], elementwise: list[Optional[Tensor]], decays: list[float],
    neg_lrs: list[float], scales: Optional[Tensor], masks: list[Optional[Tensor]],
) -> None:  # fmt: skip
    name = "came_apply"
    _factor_lists(name, grads, kinds, starts, rows, cols, row_factor, col_factor, elementwise)
    _same_length(name, grads=grads, params=params, exp_avgs=exp_avgs, masks=masks, decays=decays, neg_lrs=neg_lrs)
    _same_sizes(name, grads, params=params, exp_avgs=exp_avgs)


def _fake_came_factor_update(
    row_state: Tensor, col_state: Tensor, row_sums: Tensor, col_sums: Tensor, row_counts: Tensor, col_counts: Tensor,
    run_rows_per_matrix: list[int], run_rows: list[int], beta: float, one_minus_beta: float, row_factor: Tensor, col_factor: Tensor,
    means: Tensor,
) -> None:  # fmt: skip
    fake_checks.factor_update_sizes(
        "CPU", row_state, col_state, row_sums, col_sums, row_counts, col_counts, run_rows_per_matrix, run_rows, row_factor, col_factor, means
    )


def _fake_mask_scales(counts: Tensor, sizes: Tensor) -> Tensor:
    if counts.dim() != 1 or sizes.numel() != counts.numel():
        _fail("mask_scales", f"{counts.numel()} counts, {sizes.numel()} sizes")
    return torch.empty(counts.numel(), dtype=torch.float32, device=counts.device)


_FAKES = {
    "adamw_mask_counts": _fake_mask_counts,
    "lion_mask_counts": _fake_mask_counts,
    "adamw_apply": _fake_adamw_apply,
    "lion_apply": _fake_lion_apply,
    "lion_encode": _fake_lion_encode,
    "lion_decode_apply": _fake_lion_decode_apply,
    "came_factored_sq_sums": _fake_came_factored_sq_sums,
    "came_vector_second_moment": _fake_came_vector_second_moment,
    "came_update_sumsq": _fake_came_update_sumsq,
    "came_momentum": _fake_came_momentum,
    "came_apply": _fake_came_apply,
    "came_factor_update": _fake_came_factor_update,
    "mask_scales": _fake_mask_scales,
}
assert tuple(_FAKES) == OPS

_registered = False


def kernels() -> SimpleNamespace:
    """Each op's default overload by name (calling an overload skips the packet's overload
    lookup); the fake implementations registered on first call. The extension must be loaded."""
    global _registered
    namespace = getattr(torch.ops, NAMESPACE)
    if not _registered:
        for name in OPS:
            torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKES[name])
        _registered = True
    return SimpleNamespace(**{name: getattr(namespace, name).default for name in OPS})


class Route:
    """The kernels by name, reached through the dispatcher when ``routing.dispatched()`` says a
    mode or a tracer must see the call, else directly through the extension's module."""

    def __init__(self, module: Any) -> None:
        self._direct = module
        self._ops = kernels()

    def __call__(self) -> Any:
        return self._ops if routing.dispatched() else self._direct
