"""The six optimizers the job and the demos offer, by name, with their default learning rates.

``adamw`` is the baseline: ``CautiousAdamW(cautious=False)``, which is exactly
``torch.optim.AdamW`` and, unlike it, exact under every sharding too. ``came`` is CAME without
the mask (exactly came-pytorch), ``c-came`` with it. The default learning rates are the ones
the convergence demo uses for the small byte-level GPT, not tuned per optimizer: Lion-family
1/3 of AdamW's (the Lion paper advises 3-10x smaller) with weight decay scaled up so that
``lr * weight_decay`` matches AdamW's; CAME's clipped, bias-free update is about AdamW-sized, so
it takes AdamW's rate.

Names are matched as ``dist_cautious.integrations.names`` says: any case, ``-`` / ``_``
optional, timm's ``cadamw`` / ``clion`` included. ``create_optimizer`` is the public factory
(timm's ``create_optimizer_v2`` shape): the class's own defaults, not the demo's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.optim import Optimizer

from dist_cautious.integrations.names import lookup
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


def canonical_name(name: str) -> str:
    """The key of ``OPTIMIZERS`` that ``name`` (any accepted spelling or alias) means;
    ``ValueError`` listing the accepted names otherwise. Usable as an argparse ``type``."""
    entry = lookup(name)
    for key, spec in OPTIMIZERS.items():
        if spec.factory is entry.cls and spec.kwargs["cautious"] == entry.implied["cautious"]:
            return key
    raise AssertionError(f"no demo optimizer for {entry.name}")  # every table entry has one


def optimizer_spec(name: str) -> OptimizerSpec:
    """The demo's spec for ``name`` (any accepted spelling or alias)."""
    return OPTIMIZERS[canonical_name(name)]


def create_optimizer(name: str, params: Iterable[Any] | torch.nn.Module, **kwargs: Any) -> Optimizer:
    """The optimizer ``name`` over ``params`` (tensors, param-group dicts, or a module, whose
    ``parameters()`` are taken), built with the class's own defaults, the keywords the name
    implies (``cadamw`` / ``clion`` / ``c-came``: ``cautious=True``; ``adamw`` / ``lion`` /
    ``came``: ``cautious=False``), then ``kwargs``, which win. timm's ``caution=`` is accepted
    as ``cautious=``. Unknown names raise ``ValueError`` listing the accepted ones."""
    entry = lookup(name)
    if "caution" in kwargs:
        if "cautious" in kwargs and bool(kwargs["cautious"]) != bool(kwargs["caution"]):
            raise ValueError(f"create_optimizer({name!r}): caution={kwargs['caution']} contradicts cautious={kwargs['cautious']}")
        kwargs["cautious"] = kwargs.pop("caution")
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    return entry.cls(params, **{**entry.implied, **kwargs})


def make_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float | None = None, weight_decay: float | None = None, **options: Any
) -> Optimizer:
    """The named optimizer over ``params`` with the demo's defaults; ``lr`` / ``weight_decay``
    override them; ``options`` are the class's keyword flags (``cautious_weight_decay`` ...)."""
    spec = optimizer_spec(name)
    return spec.factory(
        params,
        lr=spec.lr if lr is None else lr,
        weight_decay=spec.weight_decay if weight_decay is None else weight_decay,
        **spec.kwargs,
        **options,
    )
