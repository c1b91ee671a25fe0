"""Optimizer names as users write them: ours, timm's aliases, any case, hyphens or underscores.

One table serves every place a name arrives as a string: ``dist_cautious.create_optimizer``,
the ``dist-cautious train`` job and a DeepSpeed config's ``"optimizer": {"type": ...}``. A name
is matched case-insensitively after dropping ``-``, ``_``, ``.`` and spaces, so ``CautiousAdamW``,
``cautious-adamw``, ``cautious_adamw`` and ``CAUTIOUSADAMW`` are one name.

timm 1.0.31's registry (``timm/optim/_optim_factory.py``) names cautious AdamW ``cadamw`` and
cautious Lion ``clion`` (``caution=True``); its ``adamw`` and ``lion`` are the unmasked
optimizers, and it has no CAME. Its ``cadamc`` / ``clionc`` apply "corrected" weight decay
(scaled by ``lr / max_lr``), which these optimizers do not implement: those names are refused
rather than silently run as something else.

Each name carries the keyword defaults it implies (``cadamw`` means ``cautious=True``,
``adamw`` means ``cautious=False``); keywords the caller passes win over them, as in timm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer

from dist_cautious.optim import CAME, CautiousAdamW, CautiousLion


@dataclass(frozen=True)
class OptimizerName:
    """What one accepted name means: the class, the keyword defaults the name implies, and
    whether it is a baseline (unmasked AdamW / Lion) whose name DeepSpeed already owns."""

    name: str
    cls: type[Optimizer]
    implied: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False


def normalise(name: str) -> str:
    """``name`` lower-cased with ``-``, ``_``, ``.`` and whitespace removed."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a str, got {type(name).__name__}")
    return "".join(ch for ch in name.lower() if ch not in "-_. \t")


_TABLE: tuple[OptimizerName, ...] = (
    OptimizerName("adamw", CautiousAdamW, {"cautious": False}, baseline=True),
    OptimizerName("cautious-adamw", CautiousAdamW, {"cautious": True}),
    OptimizerName("cadamw", CautiousAdamW, {"cautious": True}),
    OptimizerName("came", CAME, {"cautious": False}),
    OptimizerName("c-came", CAME, {"cautious": True}),
    OptimizerName("cautious-came", CAME, {"cautious": True}),
    OptimizerName("lion", CautiousLion, {"cautious": False}, baseline=True),
    OptimizerName("cautious-lion", CautiousLion, {"cautious": True}),
    OptimizerName("clion", CautiousLion, {"cautious": True}),
)

#: normalised name -> its meaning
NAMES: dict[str, OptimizerName] = {normalise(entry.name): entry for entry in _TABLE}

#: timm names for variants these optimizers do not implement, and why
_REFUSED: dict[str, str] = {
    "cadamc": "timm's corrected weight decay (lr**2 / max_lr scaling) is not implemented",
    "clionc": "timm's corrected weight decay (lr**2 / max_lr scaling) is not implemented",
}


def accepted_names(include_baselines: bool = True) -> list[str]:
    """The accepted names, hyphenated (any case works, ``-`` / ``_`` are optional, so the
    class names ``CautiousAdamW``, ``CAME``, ``CautiousLion`` are among them)."""
    return [entry.name for entry in _TABLE if include_baselines or not entry.baseline]


def lookup(name: str, include_baselines: bool = True) -> OptimizerName:
    """The meaning of ``name``; ``ValueError`` listing the accepted names if it has none.
    ``include_baselines=False`` leaves out ``adamw`` / ``lion`` (DeepSpeed's own names)."""
    key = normalise(name)
    if key in _REFUSED:
        raise ValueError(f"optimizer {name!r} is not supported: {_REFUSED[key]}; accepted names: {', '.join(accepted_names(include_baselines))}")
    entry = NAMES.get(key)
    if entry is None or (entry.baseline and not include_baselines):
        raise ValueError(
            f"unknown optimizer {name!r}; accepted names (case-insensitive, '-' or '_' optional): "
            f"{', '.join(accepted_names(include_baselines))}"
        )
    return entry


def is_ours(name: str, include_baselines: bool = True) -> bool:
    """Whether ``name`` names one of the optimizers (never raises)."""
    try:
        lookup(name, include_baselines)
    except (TypeError, ValueError):
        return False
    return True


__all__ = ["OptimizerName", "NAMES", "normalise", "accepted_names", "lookup", "is_ours"]
