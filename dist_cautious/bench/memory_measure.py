"""Measured mode of the memory benchmark: real steps on every backend, the bytes each rank holds.

``measure_rank`` runs a few steps of the ``train`` model for each case (optimizer x backend x
precision, ``cases_for``) on this rank: single process at world size 1; DDP, FSDP2 (fp32 and
bf16 mixed precision) and DeepSpeed ZeRO-1/2/3, with and without CPU offload of the optimizer,
in fp32 and bf16, at larger world sizes. It reads what the rank really holds
(``dist_cautious.bench.held_bytes``) and pairs it with the analytic estimate
(``dist_cautious.bench.memory``) for the same shapes, setting, world size and rank.

When it is read: after the last step for single / DDP / FSDP2 (gradients are still held until
the next ``zero_grad``); for DeepSpeed after the last backward and before its ``engine.step()``,
because ZeRO frees the gradient partitions inside the step.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch.distributed as dist

from dist_cautious.bench.memory import Setup, estimate
from dist_cautious.bench.model_shapes import from_module

MEASURED = ("params", "grads", "master", "optimizer_state")
#: ZeRO-3 keeps params of at most this many elements whole on every rank; the measured model's
#: 1-D params stay whole and its matrices are partitioned, as in large models
MEASURE_ZERO3_PERSISTENCE = 1024


@dataclass(frozen=True)
class MeasureCase:
    """One measured setting: an optimizer of ``dist_cautious.train.optimizers`` on a backend."""

    optimizer: str
    backend: str  # single, ddp, fsdp2, deepspeed
    precision: str = "fp32"  # fp32, bf16 (FSDP2 mixed precision / DeepSpeed bf16)
    zero_stage: int = 0
    offload: bool = False

    @property
    def label(self) -> str:
        name = f"zero{self.zero_stage}" if self.backend == "deepspeed" else self.backend
        return name + ("+offload" if self.offload else "")

    def setup(self, world_size: int) -> Setup:
        """The estimator's description of this case."""
        sharding = {"single": "none", "ddp": "none", "fsdp2": "fsdp"}.get(self.backend, f"zero{self.zero_stage}")
        precision = "bf16-mixed" if self.precision == "bf16" else "fp32"
        offload = "optimizer" if self.offload else "none"
        return Setup(self.optimizer, sharding, world_size, precision, offload, zero3_persistence_threshold=MEASURE_ZERO3_PERSISTENCE)


def cases_for(world_size: int, optimizers: Iterable[str], deepspeed: bool = True) -> list[MeasureCase]:
    """Every backend that runs at ``world_size``, for each optimizer."""
    backends: list[tuple[str, str, int, bool]] = [("single", "fp32", 0, False)]
    if world_size > 1:
        backends = [("ddp", "fp32", 0, False), ("fsdp2", "fp32", 0, False), ("fsdp2", "bf16", 0, False)]
        if deepspeed:
            backends += [("deepspeed", p, s, o) for s in (1, 2, 3) for o in (False, True) for p in ("fp32", "bf16")]
    return [MeasureCase(name, *backend) for name in optimizers for backend in backends]


def _deepspeed_engine(case: MeasureCase, model: Any, world_size: int) -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import dist_cautious.integrations.deepspeed as integration
    from dist_cautious.train.loop import TrainConfig, deepspeed_config

    deepspeed.utils.logger.setLevel(logging.ERROR)
    integration.register()
    config = TrainConfig(
        optimizer=case.optimizer, backend="deepspeed", zero_stage=case.zero_stage, offload=case.offload, precision=case.precision,
        global_batch=2 * world_size, zero3_persistence_threshold=MEASURE_ZERO3_PERSISTENCE,
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=deepspeed_config(config, world_size, 1e-3))
    return engine


def measure_case(case: MeasureCase, model_kwargs: dict[str, int], steps: int, runtime: Any, corpus: Any) -> dict[str, Any]:
    """Build, wrap, step ``steps`` times and measure one case on this rank."""
    from dist_cautious.bench.held_bytes import deepspeed_held_bytes, held_bytes
    from dist_cautious.train import backend
    from dist_cautious.train.corpus import VOCAB_SIZE
    from dist_cautious.train.model import GPTConfig, build_model
    from dist_cautious.train.optimizers import make_optimizer

    world = runtime.world_size
    config = GPTConfig(VOCAB_SIZE, **model_kwargs)
    model = build_model(config)
    shapes = from_module("train-gpt", model)
    measured: dict[str, int] = {}
    if case.backend == "deepspeed":
        engine = _deepspeed_engine(case, model.to(runtime.device), world)
        for step in range(steps):
            inputs, targets = corpus.batch("train", step, 2 * world, config.context, runtime.rank, world)
            engine.backward(engine.module.loss(inputs.to(runtime.device), targets.to(runtime.device)))
            if step == steps - 1:
                measured = deepspeed_held_bytes(engine)
            engine.step()
        del engine
    else:
        model = backend.wrap_model(model, case.backend, runtime, case.precision)
        optimizer = make_optimizer(case.optimizer, model.parameters())
        for step in range(steps):
            optimizer.zero_grad()
            inputs, targets = corpus.batch("train", step, 2 * world, config.context, runtime.rank, world)
            _loss(model, inputs.to(runtime.device), targets.to(runtime.device)).backward()
            optimizer.step()
        measured = held_bytes(model, optimizer)
        measured["master"] = 0
    predicted = estimate(shapes, case.setup(world), runtime.rank)
    return {
        **asdict(case), "label": case.label, "world_size": world, "rank": runtime.rank,
        "measured": {k: measured[k] for k in MEASURED}, "estimated": {k: predicted.total(k) for k in MEASURED},
        "buffers": measured.get("buffers", 0),
    }  # fmt: skip


def _loss(model: Any, inputs: Any, targets: Any) -> Any:
    from dist_cautious.train.loop import _loss as train_loss

    return train_loss(model, inputs, targets)


def measure_rank(cases: list[MeasureCase], model_kwargs: dict[str, int], steps: int, result_path: str | None, device: str = "cpu") -> list[dict[str, Any]]:
    """On every rank of the job: measure each case; rank 0 gathers all rows and pickles them to
    ``result_path``. Returns the gathered rows (on rank 0; this rank's rows elsewhere)."""
    from dist_cautious.train import backend
    from dist_cautious.train.corpus import Corpus

    from dist_cautious.train.job_warnings import job_warning_filters

    world = int(os.environ.get("WORLD_SIZE", 1))
    runtime = backend.init_runtime("single" if world == 1 else "fsdp2", device)
    corpus = Corpus.from_stdlib(64 * 1024)
    with job_warning_filters():
        rows = [measure_case(case, model_kwargs, steps, runtime, corpus) for case in _with_progress(cases, runtime.is_main, world)]
    if dist.is_initialized():
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = [row for rank_rows in gathered for row in rank_rows]
    if runtime.is_main and result_path:
        with open(result_path, "wb") as handle:
            pickle.dump(rows, handle)
    backend.shutdown()
    return rows


def _with_progress(cases: list[MeasureCase], show: bool, world: int) -> Iterable[MeasureCase]:
    if not show:
        return cases
    from tqdm.auto import tqdm

    return tqdm(cases, desc=f"measuring at {world} rank{'s' * (world > 1)}", unit="case", leave=False)


def measure(world_sizes: list[int], optimizers: list[str], model_kwargs: dict[str, int], steps: int = 2, deepspeed: bool = True) -> list[dict[str, Any]]:
    """Run ``measure_rank`` over ``cases_for`` each world size, in freshly spawned local CPU jobs."""
    from dist_cautious.train.backend import spawn_local

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in world_sizes:
            path = f"{tmp}/rows-{world}.pkl"
            spawn_local(measure_rank, world, (cases_for(world, optimizers, deepspeed), model_kwargs, steps, path))
            with open(path, "rb") as handle:
                rows.extend(pickle.load(handle))
    return rows


def relative_error(row: dict[str, Any], category: str | None = None) -> float:
    """|estimated - measured| / measured, for one category or the total."""
    keys = MEASURED if category is None else (category,)
    measured = sum(row["measured"][k] for k in keys)
    estimated = sum(row["estimated"][k] for k in keys)
    return abs(estimated - measured) / max(measured, 1)


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (case, rank), measured / estimated bytes per category, the other
    buffers DeepSpeed keeps (measured only), and the relative error of the total."""
    header = ["optimizer", "backend", "precision", "world", "rank"] + [f"{k} measured / estimated" for k in MEASURED] + ["other buffers", "total error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(header) - 5)) + "|"]
    for row in rows:
        cells = [row["optimizer"], row["label"], row["precision"], str(row["world_size"]), str(row["rank"])]
        cells += [f"{row['measured'][k]:,} / {row['estimated'][k]:,}" for k in MEASURED]
        cells += [f"{row['buffers']:,}", f"{100 * relative_error(row):.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    worst = max((relative_error(row) for row in rows), default=0.0)
    lines.append(f"\nlargest relative error of a per-rank total: {100 * worst:.2f}%")
    return "\n".join(lines)
