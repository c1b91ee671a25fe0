"""Run DeepSpeed engines on spawned CPU ranks (gloo) and the matching single-process reference.

One launch per world size runs many cases (process start-up and ``import deepspeed``, not the
math, dominate the time). Each case trains ``tests/dist/awkward_model.py`` through a plain
``deepspeed.initialize`` whose config names the optimizer by string, then returns the full fp32
master weights (``safe_get_full_fp32_param``) so the test compares them with the reference.

The reference is ``torch``-only, one process, the global batch: the same optimizer class with
the same JSON params. DeepSpeed gives a trainable param that got no gradient (``unused``) a
ZERO gradient, where ``torch.optim`` would skip it; the reference does the same (zero grad), so
weight decay and momentum move ``unused`` in both. This is DeepSpeed's semantics, stated, not
hidden.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

import dist_cautious  # noqa: F401  (registers the optimizer names with DeepSpeed)
from dist_cautious import local_ranks
from dist_cautious.integrations.deepspeed import OPTIMIZERS
from tests.dist.awkward_model import GLOBAL_BATCH, batch, loss_fn, make_model

STEPS = 8

#: JSON params as a user writes them: lists, not tuples. Learning rates large enough that
#: 8 steps move every weight well beyond the comparison tolerance.
PARAMS: dict[str, dict[str, Any]] = {
    "CautiousAdamW": {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1},
    "CAME": {"lr": 1e-2, "betas": [0.9, 0.999, 0.9999], "eps": [1e-30, 1e-16], "weight_decay": 0.1},
    "CautiousLion": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
}


def ds_config(case: dict[str, Any], world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of ``case``: optimizer named by string, ZeRO stage, offload, dtype,
    clipping and gradient accumulation."""
    ga = case.get("ga", 1)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size // ga,
        "gradient_accumulation_steps": ga,
        "optimizer": {"type": case["optimizer"], "params": {**case.get("params", PARAMS[case["optimizer"]]), "cautious": case["cautious"]}},
        "zero_optimization": {"stage": case["stage"]},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case.get("offload"):
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    # DeepSpeed clips at 1.0 unless told otherwise: state it, the reference clips the same way
    config["gradient_clipping"] = float(case.get("clip", 0.0))
    if case.get("dtype") == "bf16":
        config["bf16"] = {"enabled": True}
    if case.get("dtype") == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 1000, "hysteresis": 1}
    config.update(case.get("extra", {}))
    return config


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: torch.nn.Module, case: dict[str, Any]) -> list[Any]:
    """One group, or with ``groups`` the usual two: matrices with decay, the rest without (and a
    smaller lr), so DeepSpeed builds one flat partition per group."""
    if not case.get("groups"):
        return trainable(model)
    matrices = [p for p in trainable(model) if p.dim() >= 2]
    rest = [p for p in trainable(model) if p.dim() < 2]
    lr = PARAMS[case["optimizer"]]["lr"] / 2
    return [{"params": matrices}, {"params": rest, "weight_decay": 0.0, "lr": lr}]


def make_engine(case: dict[str, Any], world_size: int, model: torch.nn.Module | None = None) -> Any:
    import deepspeed

    model = make_model(0) if model is None else model
    config = ds_config(case, world_size)
    if case.get("client"):  # the optimizer built by the user and handed to initialize
        spec = config.pop("optimizer")
        optimizer = OPTIMIZERS[spec["type"]](param_groups(model, case), **spec["params"])
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, case), config=config)
    return engine


def micro_batches(step: int, rank: int, world_size: int, ga: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the global batch of ``step``, split into ``ga`` equal micro-batches."""
    images, targets = batch(step, rank, world_size)
    return list(zip(images.chunk(ga), targets.chunk(ga)))


def train(engine: Any, case: dict[str, Any], rank: int, world_size: int, steps: range) -> None:
    ga = case.get("ga", 1)
    for step in steps:
        for images, targets in micro_batches(step, rank, world_size, ga):
            dtype = next(engine.module.parameters()).dtype
            loss = loss_fn(engine, images.to(dtype), targets.to(dtype))
            engine.backward(loss)
            engine.step()


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Full fp32 master weights of every trainable param (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param)
        out[name] = (param.detach() if full is None else full).float().cpu().clone()
    return out


def run_invariance_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Train STEPS steps; ``naive`` swaps in the default fragment source (each flat partition
    stepped as if it were one tensor, as a plain optimizer would) for the negative control."""
    engine = make_engine(case, world_size)
    if case.get("naive"):
        from dist_cautious.shard.adapters import default_fragments

        engine.basic_optimizer.fragment_source = default_fragments
    train(engine, case, rank, world_size, range(STEPS))
    return full_weights(engine)


def reference_run(case: dict[str, Any], steps: int = STEPS) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Single process, global batch, zero grads for trainable params without one (as DeepSpeed),
    ``clip_grad_norm_`` over all trainable grads when the case clips. ``case["params"]``
    (JSON params) defaults to ``PARAMS[optimizer]``."""
    model = make_model(0)
    params = copy.deepcopy(case.get("params", PARAMS[case["optimizer"]]))
    params["cautious"] = case["cautious"]
    optimizer = OPTIMIZERS[case["optimizer"]](param_groups(model, case), **params)
    with reference_kernels():
        _reference_steps(model, optimizer, case, steps)
    return model, optimizer


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """The torch reference path (the executable spec) for the single-process run, whatever the
    session's DIST_CAUTIOUS_KERNELS; restored afterwards."""
    previous = os.environ.get("DIST_CAUTIOUS_KERNELS")
    os.environ["DIST_CAUTIOUS_KERNELS"] = "reference"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["DIST_CAUTIOUS_KERNELS"]
        else:
            os.environ["DIST_CAUTIOUS_KERNELS"] = previous


def _reference_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, case: dict[str, Any], steps: int) -> None:
    for step in range(steps):
        images, targets = batch(step)
        loss_fn(model, images, targets).backward()
        for param in trainable(model):
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # DeepSpeed's semantics for a param without grad
        if case.get("clip"):
            torch.nn.utils.clip_grad_norm_(trainable(model), case["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def reference_weights(case: dict[str, Any], steps: int = STEPS) -> dict[str, torch.Tensor]:
    model, _ = reference_run(case, steps)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------


def init_deepspeed_rank(rank: int, world_size: int) -> None:
    """A spawned rank's set-up: DeepSpeed on the CPU accelerator over gloo."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # before importing deepspeed
    # The sharding tests check fragments and reductions; the kernels are checked against the
    # reference elsewhere. The reference path keeps every rank free of a JIT build at start-up.
    os.environ.setdefault("DIST_CAUTIOUS_KERNELS", "reference")
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    # a rank stuck in a collective whose peer died fails within the minute, not after 30
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=60))


def run_ranks(fn: Callable[[int, int, Any], Any], world_size: int, payload: Any = None, timeout: float = 150.0) -> list[Any]:
    """``fn(rank, world_size, payload)`` on ``world_size`` spawned DeepSpeed ranks; their results.
    On failure or timeout every child is killed and the error is raised here."""
    return local_ranks.run_ranks(fn, world_size, payload, timeout=timeout, init=init_deepspeed_rank)


def run_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[Any]:
    """Worker: every case in order. A case that raises records its error and ends the run on
    this rank (its peers then fail fast in their next collective instead of hanging); the
    remaining cases are marked as not run."""
    results: list[Any] = []
    for case in cases:
        kind = case.get("kind", "invariance")
        started = time.perf_counter()
        try:
            results.append(WORKERS[kind](case, rank, world_size))
        except Exception as error:  # reported by the test with the case that failed
            import traceback

            results.append({"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"})
            failed = case.get("id", kind)
            results.extend({"error": f"not run: case {failed!r} failed before it on rank {rank}"} for _ in cases[len(results) :])
            break
        finally:
            if os.environ.get("DIST_CAUTIOUS_TEST_TIMING") and rank == 0:
                print(f"[timing] ws{world_size} {case.get('id', kind)}: {time.perf_counter() - started:.2f}s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# the other workers
# ---------------------------------------------------------------------------------------------


class TensorStack(torch.nn.Module):
    """``layers`` Linear(5, 5) + tanh: the same math per step with more or fewer tensors."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(5, 5) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def run_count_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Per engine step, for models of 4 and 40 tensors: the all-reduces issued inside the
    optimizer's ``step`` (``torch.distributed.all_reduce`` wrapped while the step runs) and the
    ops it dispatches (``tests.op_counter.CountOps``). ``native``: whether the native CPU
    kernels ran (the torch reference path issues ops per tensor by design)."""
    import torch.distributed as dist

    from dist_cautious.kernels import ops_for
    from tests.op_counter import CountOps

    collectives: dict[int, list[int]] = {}
    dispatched: dict[int, list[int]] = {}
    original = dist.all_reduce
    for layers in (2, 20):
        engine = make_engine(case, world_size, TensorStack(layers))
        active = [False]
        calls = [0]
        ops = [0]

        def counting(*args: Any, **kwargs: Any) -> Any:
            if active[0]:
                calls[0] += 1
            return original(*args, **kwargs)

        step = engine.basic_optimizer.step

        def counted_step(*args: Any, **kwargs: Any) -> Any:
            active[0] = True
            try:
                with CountOps() as counter:
                    return step(*args, **kwargs)
            finally:
                active[0] = False
                ops[0] += counter.count

        engine.basic_optimizer.step = counted_step
        dist.all_reduce = counting
        try:
            per_step, ops_per_step = [], []
            for index in range(3):
                x = torch.randn(GLOBAL_BATCH // world_size, 5, generator=torch.Generator().manual_seed(index * 10 + rank))
                engine.backward(engine(x).pow(2).mean())
                before, ops_before = calls[0], ops[0]
                engine.step()
                per_step.append(calls[0] - before)
                ops_per_step.append(ops[0] - ops_before)
        finally:
            dist.all_reduce = original
        collectives[layers] = per_step
        dispatched[layers] = ops_per_step
    return {"collectives": collectives, "ops": dispatched, "native": hasattr(ops_for(torch.device("cpu")), "trusted")}


def _state_snapshot(engine: Any) -> dict[str, Any]:
    """Deep copy of the basic optimizer's state and of the fp32 params it steps."""
    optimizer = engine.basic_optimizer
    return {
        "state": copy.deepcopy({index: optimizer.state[p] for index, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p in optimizer.state}),
        "params": [p.detach().clone() for g in optimizer.param_groups for p in g["params"]],
        "weights": full_weights(engine),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _enable_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator reports fp16 unsupported when oneDNN lacks fp16 kernels; the
    loss-scaling logic under test is device-independent, so tests let it run on CPU."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True  # type: ignore[method-assign]


def run_overflow_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """A step whose gradients overflow (``inf`` loss) is skipped: optimizer state, fp32 master
    weights and model weights stay bit-identical; the next finite step trains again."""
    if case.get("dtype") == "fp16":
        _enable_cpu_fp16()
    engine = make_engine(case, world_size)
    train(engine, case, rank, world_size, range(3))
    before = _state_snapshot(engine)
    skipped = engine.skipped_steps
    images, targets = batch(3, rank, world_size)
    dtype = next(engine.module.parameters()).dtype
    loss = loss_fn(engine, images.to(dtype), targets.to(dtype)) * float("inf")
    engine.backward(loss)
    engine.step()
    after = _state_snapshot(engine)
    untouched = _same(before, after)
    train(engine, case, rank, world_size, range(4, 5))
    moved = not _same(after["weights"], full_weights(engine))
    return {"untouched": untouched, "skipped": engine.skipped_steps - skipped, "moved_after": moved}


def run_checkpoint_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """save_checkpoint after 4 steps; a fresh engine that load_checkpoint-s it and trains 4 more
    steps ends bit-identical to the engine that never stopped."""
    directory = case["dir"]
    engine = make_engine(case, world_size)
    train(engine, case, rank, world_size, range(STEPS // 2))
    engine.save_checkpoint(directory, tag="half")
    train(engine, case, rank, world_size, range(STEPS // 2, STEPS))
    straight = full_weights(engine)
    resumed = make_engine(case, world_size)
    resumed.load_checkpoint(directory, tag="half")
    train(resumed, case, rank, world_size, range(STEPS // 2, STEPS))
    return {"straight": straight, "resumed": full_weights(resumed)}


def run_full_state_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Full optimizer state of every param after STEPS steps, through
    ``get_full_optimizer_state`` (CAME factors included) and, for the partition-shaped
    per-element keys, DeepSpeed's own ``safe_get_full_optimizer_state``."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from dist_cautious.integrations.deepspeed import _state_keys, get_full_optimizer_state

    engine = make_engine(case, world_size)
    train(engine, case, rank, world_size, range(STEPS))
    ours: dict[str, dict[str, torch.Tensor]] = {}
    theirs: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        optimizer, flat, piece = param._dist_cautious_piece
        ours[name], theirs[name] = {}, {}
        for key in _state_keys(optimizer, flat, piece):
            ours[name][key] = get_full_optimizer_state(param, key).cpu()
            if key in optimizer.partition_state_keys:  # the only state DeepSpeed's getter can see
                theirs[name][key] = safe_get_full_optimizer_state(param, key).float().cpu().clone()
    return {"ours": ours, "theirs": theirs}


def run_save_full_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Train STEPS // 2 steps and write the world-size-independent full state."""
    from dist_cautious.integrations.deepspeed import save_full_state

    engine = make_engine(case, world_size)
    train(engine, case, rank, world_size, range(STEPS // 2))
    save_full_state(engine, case["path"])
    return full_weights(engine)


def run_load_full_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Resume a full state written at another world size and train the remaining steps."""
    from dist_cautious.integrations.deepspeed import load_full_state

    engine = make_engine(case, world_size)
    load_full_state(engine, case["path"])
    train(engine, case, rank, world_size, range(STEPS // 2, STEPS))
    return full_weights(engine)


def run_save_universal_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Train STEPS // 2 steps, save_checkpoint, and convert it with DeepSpeed's own
    ``ds_to_universal`` (rank 0, a subprocess, as a user would run it)."""
    import subprocess
    import sys

    import torch.distributed as dist

    engine = make_engine(case, world_size)
    train(engine, case, rank, world_size, range(STEPS // 2))
    engine.save_checkpoint(case["dir"], tag="half")
    outcome: dict[str, Any] = {}
    if rank == 0:
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", f"{case['dir']}/half",
                   "--output_folder", f"{case['dir']}/half_universal", "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ, DS_ACCELERATOR="cpu"))
        outcome = {"returncode": done.returncode, "output": (done.stdout + done.stderr)[-3000:]}
    dist.barrier()
    return outcome


def run_load_universal_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Resume a universal checkpoint written at another world size; train the remaining steps."""
    case = {**case, "extra": {**case.get("extra", {}), "checkpoint": {"load_universal": True}}}
    engine = make_engine(case, world_size)
    engine.load_checkpoint(case["dir"], tag="half_universal")
    train(engine, case, rank, world_size, range(STEPS // 2, STEPS))
    return full_weights(engine)


def run_refusal_case(case: dict[str, Any], rank: int, world_size: int) -> str:
    """``deepspeed.initialize`` must raise ValueError naming the setting; returns the message."""
    try:
        make_engine(case, world_size)
    except ValueError as error:
        return str(error)
    return "<no error>"


def run_config_file_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """A shipped ``configs/*.json`` as a user would load it; only batch sizes (to the world size),
    lr (so 8 steps move every weight well past the tolerance) and ``cautious`` are overridden."""
    import json

    import deepspeed

    with open(case["file"]) as handle:
        config = json.load(handle)
    config.pop("train_batch_size", None)
    config["train_micro_batch_size_per_gpu"] = GLOBAL_BATCH // world_size
    config["gradient_accumulation_steps"] = 1
    config["optimizer"]["params"].update(lr=case["lr"], cautious=case["cautious"])
    config["steps_per_print"] = 10**9
    model = make_model(0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable(model), config=config)
    train(engine, case, rank, world_size, range(STEPS))
    return full_weights(engine)


def _gather_pieces(flat: torch.Tensor, pieces: list[Any]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from this rank's pieces of ``flat`` (zero-padded, summed over each
    piece's group: exactly one rank holds each element)."""
    import torch.distributed as dist

    out = {}
    for piece in pieces:
        full = torch.zeros(piece.global_shape.numel(), dtype=torch.float32)
        if piece.numel:
            full.narrow(0, piece.start, piece.numel).copy_(flat.view(-1).narrow(0, piece.flat_offset, piece.numel))
        if piece.group is not None and dist.get_world_size(piece.group) > 1:
            dist.all_reduce(full, group=piece.group)
        out[piece.name] = full.view(piece.global_shape)
    return out


def _gather_by_concatenation(engine: Any, flat: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
    """Full fp32 tensors of ``flat`` (a ZeRO-1/2 or bf16-wrapper partition, or its grad) read
    WITHOUT the mapping under test: DeepSpeed partitions the padded concatenation of a group's
    params into equal contiguous slices, rank by rank, so all-gathering the slices and splitting
    the concatenation by the params' sizes recovers every tensor. A wrong offset in the
    integration's pieces then shows, where reading through the same pieces would cancel it.
    ``None`` for ZeRO-3 (per-param partitions), where the pieces are checked against
    DeepSpeed's own numbers when the layout is built."""
    import torch.distributed as dist

    wrapper = engine.optimizer
    flats = getattr(wrapper, "single_partition_of_fp32_groups", None) or getattr(wrapper, "fp32_groups_flat_partition", None)
    if not flats:
        return None
    lp_groups = getattr(wrapper, "bit16_groups", None) or wrapper.bf16_groups
    index = next(i for i, candidate in enumerate(flats) if candidate is flat or candidate.grad is flat)
    group = wrapper.real_dp_process_group[index]
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, flat.detach().contiguous(), group=group)
    whole = torch.cat(parts).float()
    out, offset = {}, 0
    for param, piece in zip(lp_groups[index], engine.basic_optimizer.fragment_source.pieces(flats[index])):
        out[piece.name] = whole.narrow(0, offset, param.numel()).view(param.shape).clone()
        offset += param.numel()
    return out


def run_lockstep_case(case: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Whatever the model dtype (bf16, fp16: the forward is not comparable to an fp32 run), the
    optimizer step itself must be exact: around every real step, gather the full fp32 grads and
    masters DeepSpeed hands the optimizer, step a single-process copy of the optimizer on them
    (its state persisting across steps) and compare with the gathered masters after the step.
    Under ZeRO-1/2 and the bf16 wrapper the gathers do not go through the integration's mapping
    (``_gather_by_concatenation``). Returns the largest differences over all steps and params."""
    if case.get("dtype") == "fp16":
        _enable_cpu_fp16()
    engine = make_engine(case, world_size)
    optimizer = engine.basic_optimizer
    source = optimizer.fragment_source
    params = copy.deepcopy(PARAMS[case["optimizer"]])
    reference_params: dict[str, torch.nn.Parameter] = {}
    reference = OPTIMIZERS[case["optimizer"]]([torch.nn.Parameter(torch.zeros(1))], **params, cautious=case["cautious"])
    reference.param_groups.clear()
    worst = {"abs": 0.0, "rel": 0.0, "excess": -1.0, "moved": 0.0, "steps": 0, "wrapper": type(engine.optimizer).__name__, "independent": False}
    real_step = optimizer.step

    def gather(flat: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        independent = _gather_by_concatenation(engine, values)
        if independent is not None:
            worst["independent"] = True
            return independent
        return _gather_pieces(values, source.pieces(flat))

    def lockstep(*args: Any, **kwargs: Any) -> Any:
        flats = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        before = [(gather(flat, flat), gather(flat, flat.grad)) for flat in flats]
        out = real_step(*args, **kwargs)
        for flat, (masters, grads) in zip(flats, before):
            stepped = []
            for name, master in masters.items():
                if name not in reference_params:
                    reference_params[name] = torch.nn.Parameter(master.clone())
                    reference.add_param_group({"params": [reference_params[name]]})
                reference_params[name].data.copy_(master)
                reference_params[name].grad = grads[name].clone()
                stepped.append(name)
            reference.step()
            after = gather(flat, flat)
            for name in stepped:
                worst["moved"] = max(worst["moved"], (after[name] - masters[name]).abs().max().item())
                diff = (after[name] - reference_params[name].detach()).abs()
                worst["abs"] = max(worst["abs"], diff.max().item())
                magnitude = reference_params[name].detach().abs()
                worst["rel"] = max(worst["rel"], (diff / (magnitude + 1e-6)).max().item())
                # > 0 where |diff| exceeds atol 1e-6 + rtol 1e-4 * |reference|
                worst["excess"] = max(worst["excess"], (diff - 1e-6 - 1e-4 * magnitude).max().item())
        worst["steps"] += 1
        return out

    optimizer.step = lockstep
    train(engine, case, rank, world_size, range(STEPS))
    return worst


WORKERS: dict[str, Callable[[dict[str, Any], int, int], Any]] = {
    "lockstep": run_lockstep_case,
    "invariance": run_invariance_case,
    "count": run_count_case,
    "overflow": run_overflow_case,
    "checkpoint": run_checkpoint_case,
    "full_state": run_full_state_case,
    "save_full": run_save_full_case,
    "load_full": run_load_full_case,
    "refusal": run_refusal_case,
    "save_universal": run_save_universal_case,
    "load_universal": run_load_universal_case,
    "config_file": run_config_file_case,
}
