"""CautiousAdamW (C-AdamW, arXiv 2411.16085); ``cautious=False`` is exactly ``torch.optim.AdamW``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dist_cautious.optim.base import FragmentOptimizer, Work, by_group, check_betas, global_mask_scales, check_lr, check_nonnegative, kernels_for


class CautiousAdamW(FragmentOptimizer):
    """AdamW whose update is zeroed where ``m * g <= 0`` and rescaled by ``1 / max(mean(mask), 1e-3)``,
    the mean taken over the whole original tensor wherever its shards live.

    State per param: ``exp_avg``, ``exp_avg_sq`` (fp32, shaped like the local param) and ``step``.
    One sum all-reduce of mask counts per step and process group, none when nothing is sharded.
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
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, cautious=cautious))

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], self._owner)
        group["betas"] = check_betas(group["betas"], 2, self._owner)
        check_nonnegative(group["eps"], "eps", self._owner)
        check_nonnegative(group["weight_decay"], "weight_decay", self._owner)

    def step_fragments(self, work: Work) -> None:
        batches = by_group(work)
        scales = global_mask_scales(
            batches,
            lambda group, fragments: kernels_for(fragments).adamw_mask_counts(
                [f.grad for f in fragments], [f.elementwise_state("exp_avg") for f in fragments], group["betas"][0]
            ),
        )
        for (group, fragments), scale in zip(batches, scales):
            beta1, beta2 = group["betas"]
            kernels_for(fragments).adamw_apply(
                [f.param for f in fragments],
                [f.grad for f in fragments],
                [f.elementwise_state("exp_avg") for f in fragments],
                [f.elementwise_state("exp_avg_sq") for f in fragments],
                self.step_counts(fragments),
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                scales=scale,
            )
