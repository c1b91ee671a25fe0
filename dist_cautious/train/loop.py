"""The training loop every backend shares: warm-up + cosine learning rate, mean loss over ranks,
a tqdm bar on rank 0, validation at the end, the bytes each rank holds, and, with a checkpoint
directory, checkpoints every N steps and a resume from the newest complete one
(``dist_cautious.train.resume``; ``DIST_CAUTIOUS_FAULT`` injects faults, ``train.faults``).

``train(config)`` runs on every rank of an already-launched job and returns a ``TrainResult``
(the same on every rank; rank 0 prints it). The global batch is fixed and split over ranks, so
the loss curve does not depend on the world size or the backend, only on the optimizer.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dist_cautious.train import backend as backends
from dist_cautious.train.corpus import VAL_FRACTION, VOCAB_SIZE, Corpus
from dist_cautious.train.faults import FaultPlan
from dist_cautious.train.model import GPTConfig, build_model
from dist_cautious.train.optimizers import make_optimizer, optimizer_spec
from dist_cautious.train.resume import Checkpointer, PoisonedState


@dataclass
class TrainConfig:
    optimizer: str = "cautious-adamw"
    backend: str = "fsdp2"
    steps: int = 200
    global_batch: int = 16
    context: int = 64
    width: int = 96
    layers: int = 3
    heads: int = 4
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    cautious_weight_decay: bool = False
    warmup: int = 20
    corpus_bytes: int = 2_000_000
    eval_batches: int = 4
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    zero_stage: int = 2
    offload: bool = False
    zero3_persistence_threshold: int = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
    log_every: int = 10
    progress: bool = True
    metrics_path: Optional[str] = None
    checkpoint_dir: Optional[str] = None  # None: no checkpoints
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def validate(self, world_size: int = 1) -> None:
        """``ValueError`` naming the bad argument, before any work starts."""
        optimizer_spec(self.optimizer)
        if self.backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {', '.join(backends.BACKENDS)}")
        for name in ("steps", "global_batch", "context", "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be an integer in [0, steps], got {self.warmup!r}")
        if self.global_batch % world_size:
            raise ValueError(f"global-batch {self.global_batch} must be divisible by the number of ranks {world_size}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero-stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if (self.zero_stage != 2 or self.offload) and self.backend != "deepspeed":
            raise ValueError("zero-stage and offload apply to backend deepspeed only")
        if self.precision == "bf16" and self.backend not in ("fsdp2", "deepspeed"):
            raise ValueError("precision bf16 is supported with backend fsdp2 (FSDP2 mixed precision) and deepspeed (its bf16 mode)")
        if not isinstance(self.zero3_persistence_threshold, int) or self.zero3_persistence_threshold < 0:
            raise ValueError(f"zero3-persistence-threshold must be an integer >= 0, got {self.zero3_persistence_threshold!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
        val_bytes = self.corpus_bytes - int(self.corpus_bytes * (1.0 - VAL_FRACTION))
        if val_bytes <= self.context + 1:
            raise ValueError(f"corpus-bytes {self.corpus_bytes}: its validation split ({val_bytes} bytes) is shorter than context {self.context} + 1")
        GPTConfig(VOCAB_SIZE, self.context, self.width, self.layers, self.heads)


@dataclass
class TrainResult:
    optimizer: str
    backend: str
    world_size: int
    steps: int
    losses: list[float] = field(default_factory=list)
    val_loss: float = float("nan")
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    parameters: int = 0
    memory: list[dict[str, int]] = field(default_factory=list)  # one entry per rank
    notes: list[str] = field(default_factory=list)  # what the memory lines need said (ZeRO-3 persistence)
    resumed_from: Optional[int] = None  # the checkpoint's step, when the job resumed

    def summary(self) -> str:
        lines = [
            f"{self.optimizer} / {self.backend} / {self.world_size} rank(s): {self.steps} steps"
            + (f" (resumed from step {self.resumed_from})" if self.resumed_from is not None else "") + ", "
            f"{self.parameters:,} params, final train loss {self.losses[-1]:.4f}, val loss {self.val_loss:.4f}, "
            f"{self.seconds:.1f}s ({self.tokens_per_second:,.0f} tokens/s)"
        ]
        for rank, mem in enumerate(self.memory):
            lines.append(
                f"  rank {rank}: params {_mib(mem['params'])}, grads {_mib(mem['grads'])}, "
                f"optimizer state {_mib(mem['optimizer_state'])}"
                + (f", fp32 partitions {_mib(mem['master'])}" if "master" in mem else "")
                + (f", other DeepSpeed buffers {_mib(mem['buffers'])}" if "buffers" in mem else "")
                + f" (held {_mib(mem['total'])}); "
                f"peak RSS {_mib(mem['peak_rss'])}"
                + (f", peak CUDA {_mib(mem['peak_cuda'])}" if mem.get("peak_cuda") else "")
            )
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of ``base`` (CAME's
    bias-free first steps are large: warm-up keeps every optimizer comparable)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class NonFiniteLoss(RuntimeError):
    """The training loss (mean over ranks) became nan or inf: the job stops at that step.

    Raised on every rank at the same step (every rank holds the same all-reduced mean), so the
    ranks stop together and can still leave the process group. ``step`` counts from 1, like the
    progress bar; ``peak_lr`` is the run's peak learning rate, the usual culprit."""

    def __init__(self, step: int, loss: float, peak_lr: float) -> None:
        super().__init__(f"step {step}: loss is {loss}; stopping")
        self.step, self.loss, self.peak_lr = step, loss, peak_lr


class NonFiniteState(NonFiniteLoss):
    """A weight or optimizer-state tensor is nan/inf when a checkpoint is due (a non-finite
    gradient poisons the update of a step whose loss, computed before it, was finite): the job
    stops at that step and writes no checkpoint."""

    def __init__(self, step: int, what: str, peak_lr: float) -> None:
        super().__init__(step, float("nan"), peak_lr)
        self.args = (f"step {step}: non-finite values in {what}; stopping, no checkpoint written",)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def train(config: TrainConfig, runtime: Optional[backends.Runtime] = None) -> TrainResult:
    """Run the job on this rank (joining the process group the environment describes)."""
    from dist_cautious.bench.held_bytes import deepspeed_held_bytes, held_bytes

    runtime = runtime or backends.init_runtime(config.backend, config.device)
    config.validate(runtime.world_size)
    faults = FaultPlan.from_env(runtime.rank)
    checkpointer = Checkpointer(config, faults) if config.checkpoint_dir else None
    resume = checkpointer.find() if checkpointer else None
    corpus = Corpus.from_stdlib(config.corpus_bytes, VAL_FRACTION)
    model_config = GPTConfig(VOCAB_SIZE, config.context, config.width, config.layers, config.heads)
    model = build_model(model_config, config.seed)
    parameters = sum(p.numel() for p in model.parameters())
    model = backends.wrap_model(model, config.backend, runtime, config.precision)
    spec = optimizer_spec(config.optimizer)
    base_lr = spec.lr if config.lr is None else config.lr
    engine = None
    if config.backend == "deepspeed":
        engine = _deepspeed_engine(model, config, runtime, base_lr, load_universal=bool(resume and resume.universal))
        optimizer = engine.optimizer
    else:
        optimizer = make_optimizer(config.optimizer, model.parameters(), base_lr, config.weight_decay, **_optimizer_options(config))
    loss_of = (lambda x, y: engine.module.loss(x, y)) if engine else (lambda x, y: _loss(model, x, y))

    result = TrainResult(config.optimizer, config.backend, runtime.world_size, config.steps, parameters=parameters)
    first = 0
    if resume is not None:
        first, result.losses = checkpointer.load(resume, model, optimizer, engine)
        result.resumed_from = first
    bar = _progress(config, runtime, first)
    memory: dict[str, int] = {}
    start = time.perf_counter()
    for step in range(first, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, base_lr, config.warmup, config.steps)
        if not engine:
            optimizer.zero_grad()  # at the top, so the last step's gradients are still held when memory is measured
        inputs, targets = corpus.batch("train", step, config.global_batch, config.context, runtime.rank, runtime.world_size, config.seed)
        loss = loss_of(inputs.to(runtime.device), targets.to(runtime.device))
        if engine:
            engine.backward(loss)
            if step == config.steps - 1:  # ZeRO frees its gradient partitions inside the step
                memory = deepspeed_held_bytes(engine)
            engine.step()
        else:
            loss.backward()
            faults.poison(step + 1, model.parameters())
            optimizer.step()
        result.losses.append(_mean_over_ranks(loss))
        if not math.isfinite(result.losses[-1]):  # same value on every rank: all stop here
            if bar is not None:
                bar.close()
            raise NonFiniteLoss(step + 1, result.losses[-1], base_lr)
        faults.fire("step", step + 1)
        if checkpointer is not None and checkpointer.due(step + 1):
            try:
                checkpointer.save(step + 1, model, optimizer, engine, result.losses)
            except PoisonedState as error:
                if bar is not None:
                    bar.close()
                raise NonFiniteState(step + 1, str(error), base_lr) from error
        if bar is not None:
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    result.seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    result.tokens_per_second = (config.steps - first) * config.global_batch * config.context / result.seconds
    if not engine:
        memory = held_bytes(model, optimizer)
    else:
        memory = memory or deepspeed_held_bytes(engine)  # resumed with no step left to run
        result.notes = _zero3_persistence_notes(engine, config)
    memory["peak_rss"] = _peak_rss_bytes()
    if runtime.device.type == "cuda":
        memory["peak_cuda"] = torch.cuda.max_memory_allocated(runtime.device)
    result.memory = _gather(memory, runtime)
    result.val_loss = _validate(loss_of, corpus, config, runtime)
    if runtime.is_main and config.metrics_path:
        Path(config.metrics_path).write_text(json.dumps(asdict(result), indent=1))
    return result


def _loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    inner = getattr(model, "module", model)  # DDP wraps; FSDP2 does not
    if inner is model:
        return model.loss(inputs, targets)
    logits = model(inputs)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def _validate(loss_of: Any, corpus: Corpus, config: TrainConfig, runtime: backends.Runtime) -> float:
    losses = []
    for index in range(config.eval_batches):
        inputs, targets = corpus.batch("val", index, config.global_batch, config.context, runtime.rank, runtime.world_size, config.seed)
        losses.append(_mean_over_ranks(loss_of(inputs.to(runtime.device), targets.to(runtime.device))))
    return sum(losses) / len(losses)


def _gather(memory: dict[str, int], runtime: backends.Runtime) -> list[dict[str, int]]:
    if not dist.is_initialized():
        return [memory]
    everyone: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(everyone, memory)
    return everyone


def _progress(config: TrainConfig, runtime: backends.Runtime, first: int = 0) -> Any:
    if not (config.progress and runtime.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=first, desc=f"{config.optimizer} ({config.backend}, {runtime.world_size} rank{'s' * (runtime.world_size > 1)})", unit="step", dynamic_ncols=True, mininterval=0.5)


def deepspeed_config(config: TrainConfig, world_size: int, base_lr: float, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of the job: the optimizer named by string (as a user's JSON would),
    the ZeRO stage, optional CPU offload of the optimizer, bf16 if asked, ZeRO-3's param
    persistence threshold, and no gradient clipping (DeepSpeed 0.19 clips at 1.0 when the key
    is absent, which would make its run differ from the others). ``load_universal``: the job
    resumes from a universal checkpoint (another world size)."""
    spec = optimizer_spec(config.optimizer)
    zero: dict[str, Any] = {"stage": config.zero_stage}
    if config.offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    if config.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = config.zero3_persistence_threshold
    extra: dict[str, Any] = {"bf16": {"enabled": True}} if config.precision == "bf16" else {}
    if load_universal:
        extra["checkpoint"] = {"load_universal": True}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": config.global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": spec.factory.__name__,
            "params": {
                "lr": base_lr, "weight_decay": spec.weight_decay if config.weight_decay is None else config.weight_decay,
                **spec.kwargs, **_optimizer_options(config),
            },  # fmt: skip
        },
        "zero_optimization": zero,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the other backends do not clip
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _deepspeed_engine(model: torch.nn.Module, config: TrainConfig, runtime: backends.Runtime, base_lr: float, load_universal: bool = False) -> Any:
    """``deepspeed.initialize`` with the optimizer named in the config (the integration registers
    the names); DeepSpeed joins the process group ``init_runtime`` created."""
    if runtime.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import dist_cautious.integrations.deepspeed as integration

    integration.register()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=deepspeed_config(config, runtime.world_size, base_lr, load_universal))
    return engine


def _zero3_persistence_notes(engine: Any, config: TrainConfig) -> list[str]:
    """Under ZeRO-3, which params DeepSpeed keeps whole on every rank (``ds_persist``: at most
    ``stage3_param_persistence_threshold`` elements): without it, a small model's params line
    reads as unsharded with no word why."""
    if config.zero_stage != 3:
        return []
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_numel")]
    whole = [p for p in params if getattr(p, "ds_persist", False)]
    return [
        f"ZeRO-3 keeps {len(whole)} of {len(params)} params ({sum(p.ds_numel for p in whole):,} of {sum(p.ds_numel for p in params):,} elements) "
        f"whole on every rank: those of at most stage3_param_persistence_threshold = {config.zero3_persistence_threshold:,} elements "
        "(--zero3-persistence-threshold); the rest are partitioned"
    ]


def _optimizer_options(config: TrainConfig) -> dict[str, bool]:
    """The optimizer keyword flags the job sets (only those asked for: a DeepSpeed config then
    reads as before)."""
    return {"cautious_weight_decay": True} if config.cautious_weight_decay else {}
