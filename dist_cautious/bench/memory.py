"""Analytic per-rank memory of training state: params, grads, fp32 master weights, optimizer state.

What is counted is the steady state held between steps; activations, FSDP's transient unsharded
parameters, communication buckets and allocator slack are not. The model is its list of param
shapes (``model_shapes``); per rank:

Sharding (``none`` = single process / DDP; ``zero1``/``zero2``/``zero3`` = DeepSpeed's flat
partitions; ``fsdp`` = FSDP2 ``Shard(0)``: each tensor's rows in chunks of ``ceil(rows / world)``).
ZeRO-1 shards optimizer state (and master weights), ZeRO-2 also gradients, ZeRO-3 and FSDP also
params. FSDP2 stores each rank's param shard and the group's gradient shards padded to the full
chunk, the optimizer's per-element state unpadded: both are modelled, so the estimate matches
the bytes FSDP2 really holds. DeepSpeed's layouts are modelled as DeepSpeed 0.19 builds them,
for one param group: ZeRO-1/2 pad the concatenation of all params to a multiple of
``2 * world`` and give every rank one equal flat partition, cut anywhere; ZeRO-3 gives every
rank ``ceil(numel / world)`` elements of every param (the last rank's padded), back to back, and
keeps params of at most ``zero3_persistence_threshold`` elements whole on every rank as well
(``stage3_param_persistence_threshold``, 100,000 by default). DeepSpeed keeps an fp32 master
partition in every precision (fp32 too), and its gradient partition in the params' dtype.

Optimizer state (fp32): AdamW / CautiousAdamW ``exp_avg`` + ``exp_avg_sq`` (8 bytes/element);
Lion / CautiousLion ``exp_avg`` (4); CAME / C-CAME ``exp_avg`` plus, for tensors with >= 2 dims,
row and column factors of the second moment and of the residual (``S[:-1]`` and
``S[:-2] + S[-1:]`` each), for 1-D tensors ``exp_avg_sq``; plus a 4-byte ``step`` per tensor.
Under FSDP2 factors and steps are kept on every rank of the mesh; under ZeRO on every rank of
the group for every tensor of the group (each rank joins every tensor's reductions). Under ZeRO
the state every tensor has is partition-shaped (padding included) and CAME's 1-D
``exp_avg_sq`` is sized by the rank's real elements of each 1-D tensor, plus one partition-level
``step``. The cautious mask adds no state.
Not counted: on CPU tensors (CPU training, ZeRO-Offload, FSDP2 CPU offload) the native kernels
keep a reusable scratch buffer between steps, 1/4 byte per local element for CautiousLion and
1/8 for cautious CAME (6% and 3% of their fp32 state).

Precision: ``fp32`` (4-byte params and grads); ``bf16-mixed`` (2-byte params and grads and a 4-byte
master copy sharded like the optimizer state; under FSDP2's mixed precision the sharded params
and grads stay fp32 and ARE the master: 4 + 4 bytes, no extra copy); ``bf16`` (2-byte params and
grads, no master; optimizer state stays fp32). Offload: ``optimizer`` puts optimizer state and
master weights in host memory (ZeRO-Offload, FSDP2 does not split it this way), ``all`` also the
param and gradient shards (ZeRO-3 / FSDP2 CPU offload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dist_cautious.bench.model_shapes import ModelShapes, Shape

OPTIMIZER_NAMES = ("adamw", "cautious-adamw", "came", "c-came", "lion", "cautious-lion")
SHARDINGS = ("none", "zero1", "zero2", "zero3", "fsdp")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
OFFLOADS = ("none", "optimizer", "all")
CATEGORIES = ("params", "grads", "master", "optimizer_state")


@dataclass(frozen=True)
class Setup:
    """One training configuration to estimate."""

    optimizer: str = "adamw"
    sharding: str = "fsdp"
    world_size: int = 8
    precision: str = "bf16-mixed"
    offload: str = "none"
    zero3_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZER_NAMES), ("sharding", SHARDINGS), ("precision", PRECISIONS), ("offload", OFFLOADS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world size must be a positive integer, got {self.world_size!r}")
        if not isinstance(self.zero3_persistence_threshold, int) or self.zero3_persistence_threshold < 0:
            raise ValueError(f"zero3 persistence threshold must be an integer >= 0, got {self.zero3_persistence_threshold!r}")
        if self.offload == "all" and self.sharding not in ("zero3", "fsdp"):
            raise ValueError("offload 'all' (params and grads too) needs sharding zero3 or fsdp")


@dataclass
class Estimate:
    """Bytes one rank holds, by category, on the device and in host memory."""

    setup: Setup
    rank: int
    device: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    host: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def total(self, category: str) -> int:
        return self.device[category] + self.host[category]


def _state_per_element(optimizer: str, shape: Shape) -> tuple[int, int]:
    """fp32 state values per element of the tensor: (those every tensor has, which ZeRO stores
    partition-shaped; those only this tensor has, which ZeRO stores per tensor)."""
    if optimizer in ("adamw", "cautious-adamw"):
        return 2, 0
    if optimizer in ("lion", "cautious-lion"):
        return 1, 0
    return 1, 0 if len(shape) >= 2 else 1  # CAME: exp_avg, plus exp_avg_sq when not factored


def _factored_numel(optimizer: str, shape: Shape) -> int:
    """Elements of CAME's replicated row/column state (second moment and residual)."""
    if optimizer not in ("came", "c-came") or len(shape) < 2:
        return 0
    return 2 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1])


def _fsdp_rows(shape: Shape, world: int, rank: int) -> tuple[int, int]:
    """(local elements, padded elements) of ``rank``'s FSDP2 ``Shard(0)`` piece of ``shape``."""
    rows = shape[0] if shape else 1
    row_numel = math.prod(shape[1:]) if shape else 1
    chunk = math.ceil(rows / world)
    local_rows = min(max(rows - rank * chunk, 0), chunk)
    return local_rows * row_numel, chunk * row_numel


def zero12_partition_numel(shapes: tuple[Shape, ...], world: int) -> int:
    """Elements of every rank's flat ZeRO-1/2 partition: DeepSpeed pads the concatenation to a
    multiple of ``2 * world`` (its ``nccl_start_alignment_factor`` times the world size)."""
    total = sum(math.prod(shape) for shape in shapes)
    alignment = 2 * world
    return math.ceil(total / alignment) * alignment // world


def _zero_ranges(shapes: tuple[Shape, ...], world: int, rank: int) -> list[int]:
    """Real elements of each tensor inside ``rank``'s flat ZeRO-1/2 partition."""
    part = zero12_partition_numel(shapes, world)
    lo, hi = rank * part, (rank + 1) * part
    overlaps, offset = [], 0
    for shape in shapes:
        numel = math.prod(shape)
        overlaps.append(max(0, min(hi, offset + numel) - max(lo, offset)))
        offset += numel
    return overlaps


def _zero3_pieces(shapes: tuple[Shape, ...], world: int, rank: int) -> tuple[list[int], list[int]]:
    """(padded, real) elements of each param in ``rank``'s ZeRO-3 partition."""
    padded, real = [], []
    for shape in shapes:
        numel = math.prod(shape)
        per_rank = math.ceil(numel / world)
        padded.append(per_rank)
        real.append(max(0, min(per_rank, numel - rank * per_rank)))
    return padded, real


def _zero_sizes(model: ModelShapes, setup: Setup, rank: int, low_bytes: int) -> dict[str, int]:
    """Bytes per category under DeepSpeed ZeRO-1/2/3 (see the module docstring)."""
    shapes, world = model.shapes, setup.world_size
    full = [math.prod(shape) for shape in shapes]
    if setup.sharding == "zero3":
        padded, real = _zero3_pieces(shapes, world, rank)
        partition = sum(padded)
        persistent = sum(n for n in full if n <= setup.zero3_persistence_threshold)
        params, grads = low_bytes * (partition + persistent), low_bytes * partition
    else:
        partition, real = zero12_partition_numel(shapes, world), _zero_ranges(shapes, world, rank)
        params = low_bytes * sum(full)
        grads = low_bytes * (partition if setup.sharding == "zero2" else sum(full))
    per_element = [_state_per_element(setup.optimizer, shape) for shape in shapes]
    every_tensor = per_element[0][0] if shapes else 0
    state = every_tensor * partition + 1  # partition-shaped state, the partition-level step
    state += sum(only_this * n + _factored_numel(setup.optimizer, shape) + 1 for shape, (_, only_this), n in zip(shapes, per_element, real))
    master = 4 * partition if setup.precision != "bf16" else 0
    return {"params": params, "grads": grads, "master": master, "optimizer_state": 4 * state}


def estimate(model: ModelShapes, setup: Setup, rank: int = 0) -> Estimate:
    """Bytes ``rank`` holds for ``model`` under ``setup`` (rank 0 is the largest shard)."""
    if not isinstance(rank, int) or not 0 <= rank < setup.world_size:
        raise ValueError(f"rank must be in [0, {setup.world_size}), got {rank!r}")
    world, sharding = setup.world_size, setup.sharding
    shapes = model.shapes
    fsdp_mixed = sharding == "fsdp" and setup.precision == "bf16-mixed"
    low_bytes = 4 if setup.precision == "fp32" or fsdp_mixed else 2
    if sharding in ("zero1", "zero2", "zero3"):
        sizes = _zero_sizes(model, setup, rank, low_bytes)
    else:
        full = [math.prod(shape) for shape in shapes]
        if sharding == "fsdp":
            local, padded = zip(*(_fsdp_rows(shape, world, rank) for shape in shapes)) if shapes else ((), ())
            opt_local, grad_local, param_local = list(local), list(padded), list(padded)
        else:
            opt_local = grad_local = param_local = full
        sizes = {
            "params": low_bytes * sum(param_local),
            "grads": low_bytes * sum(grad_local),
            "master": 4 * sum(opt_local) if setup.precision == "bf16-mixed" and not fsdp_mixed else 0,
            # every rank steps every tensor (FSDP2: empty pieces too), so each keeps its factors and step
            "optimizer_state": 4 * sum(
                sum(_state_per_element(setup.optimizer, shape)) * n + _factored_numel(setup.optimizer, shape) + 1
                for shape, n in zip(shapes, opt_local)
            ),
        }
    result = Estimate(setup, rank)
    on_host = {"none": (), "optimizer": ("master", "optimizer_state"), "all": CATEGORIES}[setup.offload]
    for category, nbytes in sizes.items():
        (result.host if category in on_host else result.device)[category] = nbytes
    return result


def gib(nbytes: int) -> float:
    return nbytes / 2**30


#: the settings ``comparison_table`` puts side by side: (column title, sharding, world, offload)
COMPARISON = (
    ("DDP x8", "none", 8, "none"),
    ("ZeRO-1 x8", "zero1", 8, "none"),
    ("ZeRO-2 x8", "zero2", 8, "none"),
    ("ZeRO-2 x8 + offload (host)", "zero2", 8, "optimizer"),
    ("ZeRO-3 x8", "zero3", 8, "none"),
    ("FSDP2 x8", "fsdp", 8, "none"),
    ("FSDP2 x64", "fsdp", 64, "none"),
)


def comparison_table(model: ModelShapes, precision: str = "bf16-mixed", optimizers: tuple[str, ...] = OPTIMIZER_NAMES) -> str:
    """Markdown: rank-0 device GiB per optimizer (rows) and setting (columns); the offload
    column shows device GiB and, in parentheses, host GiB."""
    header = ["optimizer"] + [title for title, *_ in COMPARISON]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(COMPARISON)) + "|"]
    for optimizer in optimizers:
        cells = [optimizer]
        for _, sharding, world, offload in COMPARISON:
            e = estimate(model, Setup(optimizer, sharding, world, precision, offload))
            cells.append(f"{gib(e.device_total):.1f}" + (f" ({gib(e.host_total):.1f})" if offload != "none" else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
