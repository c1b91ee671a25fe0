"""The six optimizers the job and the demos offer, by name, with their default learning rates.

``adamw`` is the baseline: ``CautiousAdamW(cautious=False)``, which is exactly
``torch.optim.AdamW`` and, unlike it, exact under every sharding too. ``came`` is CAME without
the mask (exactly came-pytorch), ``c-came`` with it. The default learning rates are the ones
the convergence demo uses for the small byte-level GPT, not tuned per optimizer: Lion-family
1/3 of AdamW's (the Lion paper advises 3-10x smaller) with weight decay scaled up so that
``lr * weight_decay`` matches AdamW's; CAME's clipped, bias-free update is about AdamW-sized, so
it takes AdamW's rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from dist_cautious.optim import CAME, CautiousAdamW, CautiousLion


@dataclass(frozen=True)
class OptimizerSpec:
    label: str
    factory: Callable[..., Optimizer]
    lr: float
    weight_decay: float
    kwargs: dict[str, Any]


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("AdamW", CautiousAdamW, 3e-3, 0.01, {"cautious": False}),
    "cautious-adamw": OptimizerSpec("CautiousAdamW", CautiousAdamW, 3e-3, 0.01, {"cautious": True}),
    "came": OptimizerSpec("CAME", CAME, 3e-3, 0.01, {"cautious": False}),
    "c-came": OptimizerSpec("C-CAME", CAME, 3e-3, 0.01, {"cautious": True}),
    "lion": OptimizerSpec("Lion", CautiousLion, 1e-3, 0.03, {"cautious": False}),
    "cautious-lion": OptimizerSpec("CautiousLion", CautiousLion, 1e-3, 0.03, {"cautious": True}),
}


def optimizer_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float | None = None, weight_decay: float | None = None) -> Optimizer:
    """The named optimizer over ``params``; ``lr`` / ``weight_decay`` override the defaults."""
    spec = optimizer_spec(name)
    return spec.factory(
        params,
        lr=spec.lr if lr is None else lr,
        weight_decay=spec.weight_decay if weight_decay is None else weight_decay,
        **spec.kwargs,
    )
