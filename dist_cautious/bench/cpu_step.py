"""Throughput of one optimizer step on CPU: our native kernels vs DeepSpeed, torch and came-pytorch.

Not a test: a benchmark to run by hand on an otherwise idle machine::

    DS_ACCELERATOR=cpu python -m dist_cautious.bench.cpu_step            # ~50M fp32 params
    python -m dist_cautious.bench.cpu_step --matrices 4 --steps 3         # smaller, quicker
    python -m dist_cautious.bench.cpu_step --isa avx2                     # AVX2 figures on an AVX-512 CPU

It builds every optimizer on the same params and grads, then times ``step()`` round-robin: one
step of each in turn, ``--steps`` rounds after a warm-up step, so that a noisy neighbour slows
all of them alike rather than one; it reports each one's median step. The contenders:
CautiousAdamW, CautiousLion and CAME (cautious and not; native kernels, checked to be the
ones in use), ``DeepSpeedCPUAdam``, ``DeepSpeedCPULion``, ``torch.optim.AdamW(fused=True)``
(``foreach`` where fused does not run on CPU), ``came_pytorch.CAME`` (timed in the first
``--reference-steps`` rounds only: it is slow), and a plain memory copy of one fp32 tensor (the
bandwidth limit: 8 bytes per element moved). It prints Gparam/s, the
bandwidth each step implies from its minimal traffic, and the ratios the project targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Optional

import torch

# minimal bytes per element of one step (fp32 params, grads and state); see csrc/cpu/kernels.h
TRAFFIC = {
    "copy": 8,
    "adam": 28,  # read p g m v, write p m v
    "cautious_adam": 36,  # + mask-count pass: read g m
    "lion": 20,  # read p g m, write p m
    "cautious_lion": 20.5,  # encode pass (read g m, write m, 2-bit code) + decode pass (read p code, write p)
    "came": 28,  # factored: sq sums + folded sumsq 4 (g), momentum 12 (g m / m), apply 12 (p m / p)
    "cautious_came": 28.25,  # the momentum pass writes the mask as bits (1/8 B), apply reads them (1/8 B), not g
}


CLOCK = time.perf_counter  # --clock thread: time.thread_time with one thread (see main)


def _timed(step: Callable[[], None]) -> float:
    start = CLOCK()
    step()
    return CLOCK() - start


def _make_params(matrices: int, rows: int, cols: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(rows, cols, generator=gen) * 0.02) for _ in range(matrices)]
    for param in params:
        param.grad = torch.randn(rows, cols, generator=gen) * 1e-3
    return params


def _copier(numel: int) -> Callable[[], None]:
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _ours(name: str, cautious: bool) -> Callable:
    import dist_cautious.optim as optim

    if name == "CAME":
        return lambda params: optim.CAME(params, lr=2e-4, cautious=cautious)
    if name == "CautiousLion":
        return lambda params: optim.CautiousLion(params, lr=1e-4, cautious=cautious)
    return lambda params: optim.CautiousAdamW(params, lr=1e-3, cautious=cautious)


def _deepspeed(kind: str) -> Optional[Callable]:
    try:
        if kind == "adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return lambda params: DeepSpeedCPUAdam(params, lr=1e-3, weight_decay=1e-2, adamw_mode=True)
        from deepspeed.ops.lion import DeepSpeedCPULion

        return lambda params: DeepSpeedCPULion(params, lr=1e-4)
    except Exception as error:  # deepspeed missing or its op cannot build
        print(f"# DeepSpeed CPU {kind} unavailable: {error}")
        return None


def _torch_adamw(params) -> tuple[str, Callable]:
    try:
        probe = [torch.nn.Parameter(torch.zeros(4))]
        probe[0].grad = torch.ones(4)
        torch.optim.AdamW(probe, fused=True).step()
        return "torch AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
    except Exception as error:
        print(f"# torch AdamW(fused=True) does not run on CPU here ({type(error).__name__}); using foreach=True")
        return "torch AdamW(foreach=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)


def _came_pytorch() -> Optional[Callable]:
    try:
        from came_pytorch import CAME

        return lambda params: CAME(params, lr=2e-4, weight_decay=0.0)
    except Exception as error:
        print(f"# came-pytorch unavailable: {error}")
        return None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=12, help="number of (rows x cols) params (12 x 2048^2 = 50.3M)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=9, help="timed rounds: one step of every optimizer per round (median reported)")
    parser.add_argument("--reference-steps", type=int, default=2, help="rounds that also time came-pytorch (slow)")
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: elapsed time with all threads; thread: CPU time of one thread (torch, OpenMP and DeepSpeed "
        "limited to 1 thread), which a busy shared machine distorts much less",
    )
    parser.add_argument(
        "--isa",
        choices=("auto", "avx512", "avx2", "scalar"),
        default="auto",
        help="instruction set of our kernels (auto: the best this CPU has); e.g. avx2 on an AVX-512 machine for its AVX2 figures",
    )
    args = parser.parse_args(argv)
    if args.clock == "thread":
        global CLOCK
        CLOCK = time.thread_time
        torch.set_num_threads(1)  # also the OpenMP team size of our kernels and DeepSpeed's

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["DIST_CAUTIOUS_KERNELS"] = "native"
    from dist_cautious.kernels import ops_for

    ops = ops_for(torch.device("cpu"))
    ops.module.set_isa(args.isa)
    isa = ops.isa
    numel = args.matrices * args.rows * args.cols
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, kernels: {isa}, clock: {args.clock}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"# {args.matrices} x ({args.rows} x {args.cols}) fp32 params = {numel / 1e6:.1f}M, median of {args.steps} round-robin steps")

    params = _make_params(args.matrices, args.rows, args.cols)
    torch_name, torch_factory = _torch_adamw(params)
    suite = [
        ("memory copy (fp32)", lambda _: _copier(numel), "copy"),
        ("DeepSpeedCPUAdam", _deepspeed("adam"), "adam"),
        ("DeepSpeedCPULion", _deepspeed("lion"), "lion"),
        (torch_name, torch_factory, "adam"),
        ("came-pytorch CAME", _came_pytorch(), "came"),
        ("CautiousAdamW (cautious)", _ours("CautiousAdamW", True), "cautious_adam"),
        ("CautiousAdamW (cautious=False)", _ours("CautiousAdamW", False), "adam"),
        ("CautiousLion (cautious)", _ours("CautiousLion", True), "cautious_lion"),
        ("CautiousLion (cautious=False)", _ours("CautiousLion", False), "lion"),
        ("CAME (cautious)", _ours("CAME", True), "cautious_came"),
        ("CAME (cautious=False)", _ours("CAME", False), "came"),
    ]
    steps: dict[str, Callable[[], None]] = {}
    for name, factory, _ in suite:
        if factory is not None:
            made = factory(params)
            steps[name] = made.step if isinstance(made, torch.optim.Optimizer) else made
            steps[name]()  # warm-up: state allocation, JIT builds, first-touch page faults
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.steps):
        for name, step in steps.items():
            if name != "came-pytorch CAME" or round_index < args.reference_steps:
                times[name].append(_timed(step))
        print(f"# round {round_index + 1} of {args.steps}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f}" for n, t in times.items()), flush=True)
    traffic_of = {name: traffic for name, _, traffic in suite}
    rows = [(name, statistics.median(t), traffic_of[name]) for name, t in times.items()]

    rate = {name: numel / seconds / 1e9 for name, seconds, _ in rows}
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("| step | ms | Gparam/s | GB/s (min. traffic) |")
    print("|---|---:|---:|---:|")
    for name, seconds, traffic in rows:
        bandwidth = f"{rate[name] * TRAFFIC[traffic]:.1f} ({TRAFFIC[traffic]} B/param)" if traffic else "-"
        print(f"| {name} | {seconds * 1e3:.1f} | {rate[name]:.3f} | {bandwidth} |")

    def ratio(a: str, b: str, target: str) -> None:
        if a in rate and b in rate:
            print(f"| {a} / {b} | {rate[a] / rate[b]:.2f}x | {target} |")

    print()
    print("| ratio | measured | target |")
    print("|---|---:|---:|")
    ratio("CautiousAdamW (cautious)", "DeepSpeedCPUAdam", ">= 0.7x")
    ratio("CautiousAdamW (cautious=False)", "DeepSpeedCPUAdam", "-")
    ratio("CautiousLion (cautious)", "DeepSpeedCPULion", ">= 0.95x")
    ratio("CautiousLion (cautious=False)", "DeepSpeedCPULion", "-")
    ratio("CAME (cautious)", "DeepSpeedCPUAdam", ">= 0.8x")
    ratio("CAME (cautious=False)", "came-pytorch CAME", ">= 5x")
    ratio("CAME (cautious)", "came-pytorch CAME", ">= 5x")
    ratio("CautiousAdamW (cautious=False)", torch_name, "-")


if __name__ == "__main__":
    main()
