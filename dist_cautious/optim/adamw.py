"""CautiousAdamW (C-AdamW, arXiv 2411.16085); ``cautious=False`` is exactly ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from dist_cautious.optim.base import (
    FragmentOptimizer, Work, cautious_decay_options, check_betas, check_flag, check_lr, check_nonnegative,
    global_mask_scales, kernels_for_group, refuse_torch_only_options,
)  # fmt: skip
from dist_cautious.optim.capturable import lr_and_decay


class CautiousAdamW(FragmentOptimizer):
    """AdamW whose update is zeroed where ``m * g <= 0`` and rescaled by ``1 / max(mean(mask), 1e-3)``,
    the mean taken over the whole original tensor wherever its shards live.

    State per param: ``exp_avg``, ``exp_avg_sq`` (shaped like the local param; fp32, float64 for
    float64 params), ``max_exp_avg_sq`` with ``amsgrad``, and ``step``. One sum all-reduce of
    mask counts per step and process group, none when nothing is sharded.

    ``maximize`` and ``amsgrad`` have ``torch.optim.AdamW``'s exact meaning (both elementwise, so
    exact under every backend). ``cautious_weight_decay`` (CWD, arXiv 2510.12402) decays only
    where the update and the param agree in sign; independent of ``cautious``. With ``amsgrad``
    or CWD the step runs the torch reference ops (``kernels.reference``), not the fused kernels.
    ``capturable=True`` keeps the step counts (and a tensor ``lr``) on the device, so a CUDA graph
    can capture the step (``optim.capturable``). Of AdamW's other implementation switches,
    ``foreach`` / ``fused`` None or True and ``differentiable`` False are accepted (what this
    class always does); other values raise ``ValueError``.
    """

    partition_state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        cautious: bool = True,
        *,
        cautious_weight_decay: bool = False,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        refuse_torch_only_options(type(self).__name__, foreach=foreach, fused=fused, differentiable=differentiable)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious,
            cautious_weight_decay=cautious_weight_decay, amsgrad=amsgrad, maximize=maximize, capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults)

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], self._owner)
        group["betas"] = check_betas(group["betas"], 2, self._owner)
        check_nonnegative(group["eps"], "eps", self._owner)
        check_nonnegative(group["weight_decay"], "weight_decay", self._owner)
        for flag in ("cautious", "cautious_weight_decay", "amsgrad", "maximize", "capturable"):
            check_flag(group.setdefault(flag, False), flag, self._owner)

    def step_fragments(self, work: Work) -> None:
        batches = self.batches_of(work)
        scales = global_mask_scales(
            batches,
            lambda group, fragments: kernels_for_group(group, fragments).adamw_mask_counts(
                [f.grad for f in fragments], self.elementwise_states(fragments, "exp_avg"), group["betas"][0]
            ),
        )
        for batch, scale in zip(batches, scales):
            group, fragments = batch.group, batch.fragments
            beta1, beta2 = group["betas"]
            args = (
                [f.param for f in fragments],
                [f.grad for f in fragments],
                self.elementwise_states(fragments, "exp_avg"),
                self.elementwise_states(fragments, "exp_avg_sq"),
                self.step_counts(fragments),
            )
            hyper = dict(lr_and_decay(batch), beta1=beta1, beta2=beta2, eps=group["eps"], scales=scale)
            hyper.update(cautious_decay_options(batch))
            if group["amsgrad"]:
                hyper["max_exp_avg_sqs"] = self.elementwise_states(fragments, "max_exp_avg_sq")
            kernels_for_group(group, fragments).adamw_apply(*args, **hyper)
