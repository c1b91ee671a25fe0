"""Host cost of one optimizer step on many small tensors, where the arithmetic is nearly free.

Not a test: a benchmark to run by hand (issue 12)::

    python -m dist_cautious.bench.host_overhead                  # single process, FSDP2 and ZeRO-2 on 2 ranks
    python -m dist_cautious.bench.host_overhead --no-fsdp --rounds 50
    dist-cautious bench overhead -- --rounds 20

Single process: 300 small tensors (150 of 64x64 and 150 of 64), one thread. FSDP2: a 50-block
MLP of width 64 (three ``Linear(64, 64)`` per block: the same 300 tensors) sharded with
``fully_shard`` over 2 gloo ranks. ZeRO-2: the same MLP under ``deepspeed.initialize`` on 2
gloo ranks, each optimizer named in the config; only the optimizer's ``step`` is timed, against
DeepSpeed's own AdamW on the same flat partitions (one tensor per rank to it: our optimizers
need the pieces of every tensor, for the whole-tensor statistics). On tensors this small a step is almost all Python and op
dispatch, which is what a GPU step pays on the host too (pytorch issue 134191).

Every contender gets its own copy of the same params and grads; steps are timed round-robin
(one step of each contender per round, after two warm-up rounds), so that a noisy neighbour
slows all of them alike; the table shows each one's median. Contenders: CautiousAdamW,
CautiousLion and CAME with the mask on and off, ``torch.optim.AdamW`` fused and foreach, and
``DeepSpeedCPUAdam`` (single process; skipped with the reason if it does not build).
"host us/tensor" is the median step time divided by the number of tensors: on these sizes the
memory traffic is a few microseconds per step, so nearly all of it is per-tensor host work.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

WIDTH = 64
BLOCKS = 50  # FSDP2 model: 3 Linear(64, 64) per block, 6 tensors each
SMALL = 150  # single process: SMALL matrices of WIDTH x WIDTH and SMALL vectors of WIDTH

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def contenders(with_deepspeed: bool) -> list[tuple[str, Optional[Factory], str]]:
    """``(name, factory or None, why skipped)`` for every optimizer in the table, the
    reference ``torch AdamW fused`` first."""
    import dist_cautious.optim as optim

    rows: list[tuple[str, Optional[Factory], str]] = [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), ""),
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), ""),
    ]
    if with_deepspeed:
        rows.append(("DeepSpeedCPUAdam", *_deepspeed_adam()))
    for cautious in (True, False):
        suffix = "" if cautious else ", cautious=False"
        rows += [
            (f"CautiousAdamW{suffix}", lambda ps, c=cautious: optim.CautiousAdamW(ps, lr=1e-3, cautious=c), ""),
            (f"CautiousLion{suffix}", lambda ps, c=cautious: optim.CautiousLion(ps, lr=1e-4, cautious=c), ""),
            ("CAME, cautious=True" if cautious else "CAME", lambda ps, c=cautious: optim.CAME(ps, lr=2e-4, cautious=c), ""),
        ]
    return rows


def _deepspeed_adam() -> tuple[Optional[Factory], str]:
    """DeepSpeed's CPU Adam (needs ``DS_ACCELERATOR=cpu`` on a machine without a GPU); a probe
    step builds its extension now, so that a failure is a skipped row, not a crash mid-table."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        probe = [torch.nn.Parameter(torch.zeros(4))]
        probe[0].grad = torch.ones(4)
        DeepSpeedCPUAdam(probe, lr=1e-3).step()
    except Exception as error:  # deepspeed missing, or its op does not build here
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return (lambda ps: DeepSpeedCPUAdam(ps, lr=1e-3, weight_decay=1e-2, adamw_mode=True)), ""


def small_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """The single-process set: SMALL matrices then SMALL vectors, interleaved, with grads."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(SMALL):
        for shape in ((WIDTH, WIDTH), (WIDTH,)):
            param = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            param.grad = torch.randn(shape, generator=gen) * 1e-3
            params.append(param)
    return params


def round_robin(
    steps: dict[str, Callable[[], Any]],
    rounds: int,
    clock: Callable[[], float],
    barrier: Callable[[], None] = lambda: None,
    prepare: Optional[dict[str, Callable[[int], Any]]] = None,
) -> dict[str, float]:
    """Median seconds per call of each step, one call of each per round, two warm-up rounds;
    ``prepare[name](round)``, untimed, before each call (new gradients)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(rounds + 2):
        for name, step in steps.items():
            if prepare is not None:
                prepare[name](index)
            barrier()
            start = clock()
            step()
            elapsed = clock() - start
            if index >= 2:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


#: how the gradients of successive steps arrive: the same tensors every step (``same``, the
#: cheapest case for a step plan), or new tensors every step (``new``: what a training loop
#: with ``zero_grad(set_to_none=True)``, torch's default, or FSDP2's reduce-scatter hands over)
GRAD_MODES = ("same", "new")


def new_grads(params: list[torch.Tensor]) -> Callable[[int], None]:
    """``prepare`` for ``round_robin``: each round gives every param a gradient tensor other
    than last round's (two sets of copies of its current gradient, alternating)."""
    pools = [[p.grad.clone() for p in params] for _ in range(2)]

    def assign(index: int) -> None:
        for param, grad in zip(params, pools[index % 2]):
            param.grad = grad

    return assign


def single_process(rounds: int, with_deepspeed: bool, clock_name: str, grads: str) -> tuple[dict[str, float], dict[str, str], int]:
    """Median step seconds of every contender on the single-process set; skipped ones' reasons."""
    torch.set_num_threads(1)
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    steps, prepare, skipped = {}, {}, {}
    for name, factory, why in contenders(with_deepspeed):
        if factory is None:
            skipped[name] = why
            continue
        params = small_params()
        steps[name] = factory(params).step
        prepare[name] = new_grads(params) if grads == "new" else (lambda index: None)
    return round_robin(steps, rounds, clock, prepare=prepare), skipped, 2 * SMALL


def _mlp() -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(BLOCKS):
        layers.append(torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH)))
    return torch.nn.Sequential(*layers)


def _fsdp_rank(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, float]:
    """One rank of the FSDP2 table: every contender on its own sharded copy of the MLP, with
    the grads of one backward pass, stepped round-robin (wall clock, a barrier before each step)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    steps, prepare = {}, {}
    for name, factory, _ in contenders(with_deepspeed=False):
        assert factory is not None
        torch.manual_seed(0)
        model = _mlp()
        for block in model:
            fully_shard(block)
        fully_shard(model)
        gen = torch.Generator().manual_seed(1 + rank)
        model(torch.randn(8, WIDTH, generator=gen)).square().mean().backward()
        params = list(model.parameters())
        steps[name] = factory(params).step
        prepare[name] = new_grads(params) if payload["grads"] == "new" else (lambda index: None)
    return round_robin(steps, payload["rounds"], time.perf_counter, barrier=dist.barrier, prepare=prepare)


def fsdp(rounds: int, grads: str, world_size: int = 2) -> dict[str, float]:
    """Median step seconds per contender under FSDP2, the slower rank's median for each."""
    from dist_cautious.local_ranks import run_ranks

    results = run_ranks(_fsdp_rank, world_size, {"rounds": rounds, "grads": grads}, timeout=900.0)
    return {name: max(result[name] for result in results) for name in results[0]}


#: the ZeRO-2 table's contenders: DeepSpeed config ``optimizer`` entries (type, params)
ZERO_CONTENDERS = {
    "DeepSpeed AdamW": ("AdamW", {"lr": 1e-3}),
    **{
        name: (kind, {"lr": lr, "cautious": cautious})
        for cautious in (True, False)
        for name, kind, lr in (
            ("CautiousAdamW" if cautious else "CautiousAdamW, cautious=False", "CautiousAdamW", 1e-3),
            ("CautiousLion" if cautious else "CautiousLion, cautious=False", "CautiousLion", 1e-4),
            ("CAME, cautious=True" if cautious else "CAME", "CAME", 2e-4),
        )
    },
}


def _zero_rank(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any]:
    """One rank of the ZeRO-2 table: every contender in its own ``deepspeed.initialize`` of the
    MLP (each rank's fp32 partition cuts the 300 tensors into pieces), stepped round-robin; only
    the basic optimizer's ``step`` is timed (wall clock, a barrier before each engine step), not
    DeepSpeed's own bookkeeping around it."""
    import deepspeed
    import torch.distributed as dist

    import dist_cautious  # noqa: F401  (names our optimizers for DeepSpeed's config)

    steps, timed, classes = {}, {}, {}
    for name, (kind, params) in ZERO_CONTENDERS.items():
        torch.manual_seed(0)
        model = _mlp()
        config = {
            "train_micro_batch_size_per_gpu": 8, "optimizer": {"type": kind, "params": params}, "zero_optimization": {"stage": 2},
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
        }  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        basic = engine.basic_optimizer
        classes[name] = type(basic).__name__
        record: list[float] = []
        timed[name] = record

        def timed_step(*args: Any, _step: Any = basic.step, _record: list[float] = record, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _step(*args, **kwargs)
            finally:
                _record.append(time.perf_counter() - start)

        basic.step = timed_step
        inputs = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1 + rank))

        def engine_step(_engine: Any = engine) -> None:
            _engine.backward(_engine(inputs).square().mean() * 1e-3)
            dist.barrier()
            _engine.step()

        steps[name] = engine_step
    round_robin(steps, payload["rounds"], time.perf_counter)
    return {"medians": {name: statistics.median(record[2:]) for name, record in timed.items()}, "classes": classes}


def zero(rounds: int, world_size: int = 2) -> tuple[dict[str, float], dict[str, str]]:
    """Median optimizer-step seconds per contender under ZeRO-2 (the slower rank's), and the
    basic optimizer class DeepSpeed built for each."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_cautious.local_ranks import run_ranks

    results = run_ranks(_zero_rank, world_size, {"rounds": rounds}, timeout=900.0)
    medians = {name: max(result["medians"][name] for result in results) for name in results[0]["medians"]}
    return medians, results[0]["classes"]


def print_table(title: str, medians: dict[str, float], tensors: int, skipped: dict[str, str]) -> None:
    """Markdown table: ms/step, ratio to torch fused AdamW, host microseconds per tensor."""
    base_name = "torch AdamW fused" if "torch AdamW fused" in medians else next(iter(medians))
    base = medians[base_name]
    print(f"\n### {title}\n")
    print(f"| optimizer | ms/step | vs {base_name} | host us/tensor |")
    print("|---|---:|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f}x | {seconds * 1e6 / tensors:.1f} |")
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} | | |")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (median taken), after 2 warm-up rounds")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP2 table (2 spawned ranks)")
    parser.add_argument("--no-single", action="store_true", help="skip the single-process table")
    parser.add_argument("--no-zero", action="store_true", help="skip the DeepSpeed ZeRO-2 table (2 spawned ranks)")
    parser.add_argument("--no-deepspeed", action="store_true", help="leave DeepSpeedCPUAdam out")
    parser.add_argument(
        "--grads", choices=(*GRAD_MODES, "both"), default="both",
        help="single process and FSDP2: the same grad tensors every step, new ones every step (what training does), or a table of each",
    )  # fmt: skip
    parser.add_argument(
        "--clock", choices=("thread", "wall"), default="thread",
        help="single process: this thread's CPU time (default; robust to a loaded machine) or wall time",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from dist_cautious.kernels import ops_for

    ops = ops_for(torch.device("cpu"))
    kernels = getattr(ops, "isa", "torch reference")
    print(f"# torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, kernels: {kernels}")
    described = {"same": "the same grad tensors every step", "new": "new grad tensors every step (zero_grad(set_to_none=True))"}
    modes = GRAD_MODES if args.grads == "both" else (args.grads,)
    if not args.no_single:
        for grads in modes:
            medians, skipped, tensors = single_process(args.rounds, not args.no_deepspeed, args.clock, grads)
            title = f"single process, {tensors} tensors ({SMALL} of {WIDTH}x{WIDTH}, {SMALL} of {WIDTH}), {described[grads]}, 1 thread, {args.clock} clock, median of {args.rounds}"
            print_table(title, medians, tensors, skipped)
    if not args.no_fsdp:
        for grads in modes:
            medians = fsdp(args.rounds, grads)
            title = f"FSDP2, 2 gloo ranks, {BLOCKS}-block MLP of width {WIDTH} ({6 * BLOCKS} tensors), {described[grads]}, wall clock, median of {args.rounds}"
            print_table(title, medians, 6 * BLOCKS, {})
    if not args.no_zero:
        medians, classes = zero(args.rounds)
        print_table(
            f"DeepSpeed ZeRO-2, 2 gloo ranks, the same MLP ({6 * BLOCKS} tensors), optimizer step only, wall clock, median of {args.rounds}; "
            f"DeepSpeed AdamW is its {classes['DeepSpeed AdamW']} on the flat partition (one tensor)",
            medians, 6 * BLOCKS, {},
        )  # fmt: skip
    print(f"\n# load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
