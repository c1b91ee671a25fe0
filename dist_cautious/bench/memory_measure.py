"""Measured mode of the memory benchmark: real sharded steps, the bytes each rank really holds.

``held_bytes`` sums the storages (each counted once) behind a model's local params, local grads
and the optimizer's state tensors: for FSDP2 that is the padded shard storage each rank keeps,
not the logical shard size. ``measure_rank`` runs a few steps of the ``train`` model for each
optimizer on this rank (single process, or FSDP2 over all ranks) and pairs each measurement with
the analytic estimate for the same shapes, world size and rank.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dist_cautious.bench.memory import Setup, estimate
from dist_cautious.bench.model_shapes import from_module

MEASURED = ("params", "grads", "optimizer_state")


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, master: Sequence[Tensor] = ()) -> dict[str, int]:
    """Bytes of the storages behind params, grads and optimizer state on this rank, and of
    ``master`` (a backend's own flat fp32 partitions, e.g. DeepSpeed's), each storage once."""
    seen: set[tuple[str, int]] = set()

    def storage_bytes(tensor: Any) -> int:
        if not isinstance(tensor, Tensor):
            return 0
        storage = _local(tensor).untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()

    params = list(model.parameters())
    sizes = {
        "params": sum(storage_bytes(p) for p in params),
        "grads": sum(storage_bytes(p.grad) for p in params),
        "optimizer_state": sum(storage_bytes(value) for state in optimizer.state.values() for value in state.values()),
    }
    if master:
        sizes["master"] = sum(storage_bytes(t) for t in master)
    sizes["total"] = sum(sizes.values())
    return sizes


def measure_rank(optimizers: list[str], model_kwargs: dict[str, int], steps: int, result_path: str | None, device: str = "cpu") -> list[dict[str, Any]]:
    """On every rank of the job: for each optimizer, build, shard (FSDP2 when more than one
    rank), step ``steps`` times, measure; rank 0 gathers all rows and pickles them to
    ``result_path``. Returns the gathered rows (on rank 0; this rank's rows elsewhere)."""
    from dist_cautious.train import backend
    from dist_cautious.train.corpus import VOCAB_SIZE, Corpus
    from dist_cautious.train.model import GPTConfig, build_model
    from dist_cautious.train.optimizers import make_optimizer

    world = int(os.environ.get("WORLD_SIZE", 1))
    kind = "fsdp2" if world > 1 else "single"
    runtime = backend.init_runtime(kind, device)
    config = GPTConfig(VOCAB_SIZE, **model_kwargs)
    corpus = Corpus.from_stdlib(64 * 1024)
    rows = []
    for name in optimizers:
        model = build_model(config)
        shapes = from_module("train-gpt", model)
        model = backend.wrap_model(model, kind, runtime)
        optimizer = make_optimizer(name, model.parameters())
        for step in range(steps):
            optimizer.zero_grad()
            inputs, targets = corpus.batch("train", step, 2 * world, config.context, runtime.rank, world)
            model.loss(inputs.to(runtime.device), targets.to(runtime.device)).backward()
            optimizer.step()
        measured = held_bytes(model, optimizer)
        predicted = estimate(shapes, Setup(name, "fsdp" if kind == "fsdp2" else "none", world, "fp32"), runtime.rank)
        rows.append({
            "optimizer": name, "backend": kind, "world_size": world, "rank": runtime.rank,
            "measured": {k: measured[k] for k in MEASURED}, "estimated": {k: predicted.total(k) for k in MEASURED},
        })
        del model, optimizer
    if dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for rank_rows in gathered for row in rank_rows]
    if runtime.is_main and result_path:
        with open(result_path, "wb") as handle:
            pickle.dump(rows, handle)
    backend.shutdown()
    return rows


def measure(optimizers: list[str], world_sizes: list[int], model_kwargs: dict[str, int], steps: int = 2) -> list[dict[str, Any]]:
    """Run ``measure_rank`` in freshly spawned local CPU jobs, one per world size."""
    import tempfile

    from dist_cautious.train.backend import spawn_local

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in world_sizes:
            path = f"{tmp}/rows-{world}.pkl"
            spawn_local(measure_rank, world, (optimizers, model_kwargs, steps, path))
            with open(path, "rb") as handle:
                rows.extend(pickle.load(handle))
    return rows


def relative_error(row: dict[str, Any], category: str | None = None) -> float:
    """|estimated - measured| / measured, for one category or the total."""
    keys = MEASURED if category is None else (category,)
    measured = sum(row["measured"][k] for k in keys)
    estimated = sum(row["estimated"][k] for k in keys)
    return abs(estimated - measured) / max(measured, 1)
