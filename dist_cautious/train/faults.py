"""Fault injection for the training job: kill a rank, crash it, or poison a gradient, at a step.

The checkpoint tests need failures that happen at a known place: a rank SIGKILLed between two
checkpoints, a rank killed while a checkpoint is being written, a gradient that turns nan. The
train loop alone reads ``DIST_CAUTIOUS_FAULT``; nothing else in the package looks at it, and
with the variable unset every hook is a no-op. The value is a comma-separated list of faults,
each ``KIND:key=value:...``::

    kill:rank=1:step=5                 SIGKILL rank 1 right after optimizer step 5 (before its checkpoint)
    kill:rank=1:step=4:at=save         SIGKILL rank 1 while checkpoint 4 is being written (its own
                                       files written, the checkpoint not yet complete)
    kill:rank=0:step=4:at=rename       SIGKILL rank 0 after checkpoint 4 got its final name, before
                                       its completion marker
    raise:step=3                       raise ``InjectedFault`` on the rank(s) after step 3 (a crash
                                       that unwinds: usable inside a test process)
    nan:step=3                         set one gradient element to nan before optimizer step 3

``rank`` defaults to every rank, ``at`` to ``step``. A fault fires only on attempt ``attempt``
(default 0) of the job, where the attempt is torchrun's ``TORCHELASTIC_RESTART_COUNT`` (0 when
unset): a job restarted by ``torchrun --max-restarts`` does not fail again at the same place.
Steps count from 1, as on the progress bar.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional

import torch

ENV = "DIST_CAUTIOUS_FAULT"
KINDS = ("kill", "raise", "nan")
POINTS = ("step", "save", "rename")


class InjectedFault(RuntimeError):
    """A ``raise`` fault fired (the job was asked to crash here)."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: Optional[int] = None  # None: every rank
    at: str = "step"
    attempt: int = 0


def parse(text: str) -> list[Fault]:
    """The faults ``text`` describes; ``ValueError`` naming the bad part."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *fields = item.split(":")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault kind {kind!r} in {item!r}; choose one of {', '.join(KINDS)}")
        values: dict[str, str] = {}
        for field in fields:
            key, sep, value = field.partition("=")
            if not sep or key not in ("rank", "step", "at", "attempt"):
                raise ValueError(f"{ENV}: expected rank=, step=, at= or attempt= in {item!r}, got {field!r}")
            values[key] = value
        if "step" not in values:
            raise ValueError(f"{ENV}: {item!r} names no step=")
        at = values.get("at", "step")
        if at not in POINTS or (kind == "nan" and at != "step"):
            raise ValueError(f"{ENV}: at={at!r} in {item!r}; a {kind} fault may fire at {', '.join(POINTS) if kind != 'nan' else 'step'}")
        try:
            step, attempt = int(values["step"]), int(values.get("attempt", 0))
            rank = int(values["rank"]) if "rank" in values else None
        except ValueError:
            raise ValueError(f"{ENV}: rank, step and attempt must be integers in {item!r}") from None
        faults.append(Fault(kind, step, rank, at, attempt))
    return faults


class FaultPlan:
    """The faults of this rank on this attempt; the loop calls ``fire`` and ``poison`` at its
    fault points."""

    def __init__(self, faults: Iterable[Fault], rank: int, attempt: int) -> None:
        self.faults = [f for f in faults if f.attempt == attempt and f.rank in (None, rank)]

    @classmethod
    def from_env(cls, rank: int) -> "FaultPlan":
        return cls(parse(os.environ.get(ENV, "")), rank, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def fire(self, at: str, step: int) -> None:
        """Kill this process or raise, if a fault is set for point ``at`` of ``step``."""
        for fault in self.faults:
            if fault.kind in ("kill", "raise") and fault.at == at and fault.step == step:
                if fault.kind == "raise":
                    raise InjectedFault(f"{ENV}: injected crash at {at} of step {step}")
                os.kill(os.getpid(), signal.SIGKILL)

    def poison(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """Set the first element of the first local gradient to nan, if a nan fault is set for ``step``."""
        if not any(f.kind == "nan" and f.step == step for f in self.faults):
            return
        for param in params:
            grad = param.grad
            if grad is None:
                continue
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if local.numel():
                local.view(-1)[0] = float("nan")
                return
