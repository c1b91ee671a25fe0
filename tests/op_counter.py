"""Dispatch modes for tests: ``CountOps`` counts the ops that reach the dispatcher (the
dispatch-count tests of issue 12), ``StepRecorder`` records each with its arguments."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class CountOps(TorchDispatchMode):
    """Counts every op that reaches the dispatcher while active (a native kernel registered as a
    custom op counts as one): ``count`` in all, ``by_name`` per ``namespace::name``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        self.by_name[f"{func.namespace}::{func._opname}"] += 1
        return func(*args, **(kwargs or {}))


class StepRecorder(TorchDispatchMode):
    """Every op dispatched inside it: name, the tensors it read and the tensors it produced."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, list[torch.Tensor], list[torch.Tensor], dict[str, Any]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        named = {arg.name: value for arg, value in zip(func._schema.arguments, args)} | kwargs
        self.calls.append((func, inputs, outputs, named))
        return out

    def custom_ops(self, namespace: str) -> list[tuple[str, dict[str, Any]]]:
        """(name, arguments by name) of each op of ``namespace`` dispatched, in order."""
        return [(func._opname, named) for func, _, _, named in self.calls if func.namespace == namespace]

    def written(self, func: Any, named: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors an op's schema says it writes."""
        tensors = []
        for arg in func._schema.arguments:
            if arg.alias_info is not None and arg.alias_info.is_write and arg.name in named:
                tensors += [t for t in tree_flatten(named[arg.name])[0] if isinstance(t, torch.Tensor)]
        return tensors
