"""CautiousLion: Lion (arXiv 2302.06675) with the cautious mask; ``cautious=False`` is exactly Lion."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dist_cautious.optim.base import (
    FragmentOptimizer, Work, cautious_decay_options, check_betas, check_flag, check_lr, check_nonnegative,
    global_mask_scales, kernels_for_group,
)  # fmt: skip
from dist_cautious.optim.capturable import lr_and_decay


class CautiousLion(FragmentOptimizer):
    """Lion (sign of interpolated momentum, one state tensor) whose update is zeroed where it
    disagrees in sign with the gradient and rescaled by ``1 / max(mean(mask), 1e-3)``.

    State per param: ``exp_avg`` (fp32, float64 for float64 params; never masked) and ``step``.
    One sum all-reduce of mask counts per step and process group, none when nothing is sharded.
    ``maximize=True`` steps on the negated gradient, as torch.optim's optimizers do.
    ``cautious_weight_decay`` (CWD, arXiv 2510.12402) decays only where the update and the param
    agree in sign; independent of ``cautious``; it runs the torch reference ops.
    ``capturable=True``: a tensor ``lr`` and the step counts stay on the device, so a CUDA graph
    can capture the step (``optim.capturable``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        cautious: bool = True,
        *,
        cautious_weight_decay: bool = False,
        maximize: bool = False,
        capturable: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, cautious=cautious, cautious_weight_decay=cautious_weight_decay, maximize=maximize,
            capturable=capturable,
        )  # fmt: skip
        super().__init__(params, defaults)

    def check_hyperparameters(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"], self._owner)
        group["betas"] = check_betas(group["betas"], 2, self._owner)
        check_nonnegative(group["weight_decay"], "weight_decay", self._owner)
        for flag in ("cautious", "cautious_weight_decay", "maximize", "capturable"):
            check_flag(group.setdefault(flag, False), flag, self._owner)

    def step_fragments(self, work: Work) -> None:
        batches = self.batches_of(work)
        pending: dict[int, object] = {}

        def begin(group: dict[str, Any], fragments: list) -> Any:
            # the first of the two phases around the count reduction; native CPU kernels also
            # move the momentum here (see kernels.reference.lion_cautious_begin)
            counts, pending[id(fragments)] = kernels_for_group(group, fragments).lion_cautious_begin(
                [f.param for f in fragments], [f.grad for f in fragments], self.elementwise_states(fragments, "exp_avg"),
                beta1=group["betas"][0], beta2=group["betas"][1],
            )  # fmt: skip
            return counts

        scales = global_mask_scales(batches, begin)
        for batch, scale in zip(batches, scales):
            group, fragments = batch.group, batch.fragments
            self.step_counts(fragments)  # advanced once per step
            params, grads = [f.param for f in fragments], [f.grad for f in fragments]
            exp_avgs = self.elementwise_states(fragments, "exp_avg")
            hyper = dict(lr_and_decay(batch), beta1=group["betas"][0], beta2=group["betas"][1])
            hyper.update(cautious_decay_options(batch))
            ops = kernels_for_group(group, fragments)
            if scale is None:
                ops.lion_apply(params, grads, exp_avgs, **hyper)
            else:
                ops.lion_cautious_finish(pending[id(fragments)], params, grads, exp_avgs, **hyper, scales=scale)
