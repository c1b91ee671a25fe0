"""End-to-end ZeRO-2 + CPU offload: our optimizer step against DeepSpeed's own, in one run.

Two local CPU ranks (gloo, ``DS_ACCELERATOR=cpu``) train the same stack of linear layers through
a plain ``deepspeed.initialize`` with ZeRO stage 2 and ``offload_optimizer: cpu``, once per
optimizer named in the config. DeepSpeed's ``AdamW`` there is ``DeepSpeedCPUAdam`` (its fused
SIMD Adam, the peer); ours are named by string. ``engine.step()`` is timed: the optimizer step
on each rank's fp32 partition plus DeepSpeed's own bookkeeping around it, identical for all;
and the basic optimizer's ``step`` alone (Gparam/s over the rank's partition of
``params / world_size`` elements). Ratios are against DeepSpeedCPUAdam, measured in the same run.

    python -m dist_cautious.bench.zero_offload_step [--params-millions 16] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from dist_cautious.local_ranks import run_ranks

OPTIMIZERS = {
    "DeepSpeed AdamW": ("AdamW", {}),
    "CautiousAdamW": ("CautiousAdamW", {"cautious": True}),
    "CautiousAdamW cautious=False": ("CautiousAdamW", {"cautious": False}),
    "CautiousLion": ("CautiousLion", {"cautious": True}),
    "CAME": ("CAME", {}),
}
WIDTH = 1024


def _config(optimizer: str, extra: dict[str, Any], world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": optimizer, "params": {"lr": 1e-4, "weight_decay": 0.01, **extra}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}},
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def _timed(optimizer: Any, samples: list[float]) -> None:
    """Record the wall time of each ``optimizer.step`` call (the basic optimizer DeepSpeed drives)."""
    step = optimizer.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            samples.append(time.perf_counter() - start)

    optimizer.step = timed_step


def _time_steps(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    os.environ["DS_ACCELERATOR"] = "cpu"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    import deepspeed

    import dist_cautious  # noqa: F401  (registers the config names)

    times: dict[str, dict[str, Any]] = {}
    for label, (name, extra) in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=True) for _ in range(payload["layers"])])
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(name, extra, world_size))
        basic = engine.optimizer.optimizer
        inner: list[float] = []
        _timed(basic, inner)
        inputs = torch.randn(4, WIDTH)
        outer = []
        for _ in range(payload["steps"] + 1):
            loss = engine(inputs).square().mean()
            engine.backward(loss)
            start = time.perf_counter()
            engine.step()
            outer.append(time.perf_counter() - start)
        # the first step allocates state: dropped
        times[label] = {"engine": outer[1:], "optimizer": inner[1:], "class": type(basic).__name__}
        del engine
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-millions", type=float, default=16.0, help="model size (default 16M fp32 params)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per optimizer (default 6)")
    parser.add_argument("--world-size", type=int, default=2, help="local CPU ranks (default 2)")
    args = parser.parse_args(argv)
    layers = max(1, round(args.params_millions * 1e6 / (WIDTH * WIDTH + WIDTH)))
    params = layers * (WIDTH * WIDTH + WIDTH)
    print(f"ZeRO-2 + CPU offload, {args.world_size} CPU ranks, {params / 1e6:.1f}M fp32 params, median of {args.steps} steps")
    per_rank = run_ranks(_time_steps, args.world_size, {"layers": layers, "steps": args.steps}, timeout=1800)
    baselines: dict[str, float] = {}
    print(f"{'optimizer (class DeepSpeed drives)':52s} {'engine.step s':>13s} {'ratio':>6s} {'optimizer.step s':>16s} {'Gparam/s':>9s} {'ratio':>6s}")
    for label in OPTIMIZERS:
        row = [f"{label + ' (' + per_rank[0][label]['class'] + ')':52s}"]
        for part, width in (("engine", 13), ("optimizer", 16)):
            # a step ends when the slowest rank ends
            median = statistics.median(max(samples) for samples in zip(*(rank[label][part] for rank in per_rank)))
            baselines.setdefault(part, median)
            if part == "optimizer":
                row.append(f"{median:{width}.4f} {params / world(args) / median / 1e9:9.2f} {baselines[part] / median:5.2f}x")
            else:
                row.append(f"{median:{width}.4f} {baselines[part] / median:5.2f}x")
        print(" ".join(row))


def world(args: argparse.Namespace) -> int:
    return args.world_size


if __name__ == "__main__":
    main()
