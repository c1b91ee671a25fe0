"""The optimizer settings every sharding-invariance test runs, cautious on and off."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion

OPTIMIZERS = ("adamw", "came", "lion")
CASES = [(name, cautious) for name in OPTIMIZERS for cautious in (True, False)]


def make_optimizer(name: str, cautious: bool, params: Iterable[torch.Tensor], **options: bool) -> torch.optim.Optimizer:
    """Learning rates that move every weight visibly in 8 steps without chaotic training (CAME has no
    bias correction: its first steps are about 10x lr, so it gets a 10x smaller lr). ``options``:
    the optimizers' keyword flags (cautious_weight_decay, maximize, amsgrad)."""
    if name == "adamw":
        return CautiousAdamW(params, lr=1e-2, weight_decay=0.1, cautious=cautious, **options)
    if name == "came":
        return CAME(params, lr=1e-3, weight_decay=0.1, cautious=cautious, **options)
    if name == "lion":
        return CautiousLion(params, lr=1e-3, weight_decay=0.1, cautious=cautious, **options)
    raise ValueError(f"unknown optimizer {name!r}")
