"""How the peer implementations fare under sharding, next to dist_cautious: a script, not a claim.

``python -m dist_cautious.bench.peers`` trains a small model whose shapes break naive sharding
(rows not divisible by the world size, fewer rows than ranks, a conv weight, 1-D params) for a
few steps with each optimizer under FSDP2 and under DeepSpeed ZeRO-2, on local CPU ranks
(gloo), and compares the full weights with the SAME optimizer's single-process run on the same
global batch. It prints, per optimizer and backend, the share of weight elements out of
tolerance (rtol 1e-4, atol 1e-6: fp32 rounding of a sharded sum stays orders of magnitude
below it), or the error a run died with.

The peers: timm's ``AdamWLegacy(caution=True)`` and ``Lion(caution=True)``, and came-pytorch's
``CAME``. Each computes its whole-tensor statistics (mask mean, RMS, row/column means) on
whatever it is handed: under ZeRO a flat partition, so its results silently differ from its
own single-process run; under FSDP2 a DTensor, on which their in-place updates fail. The
dist_cautious optimizers run through the same harness.
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

Factory = Callable[[Any], torch.optim.Optimizer]
GLOBAL_BATCH = 12
RTOL, ATOL = 1e-4, 1e-6


def _ours(name: str) -> Factory:
    from dist_cautious import CAME, CautiousAdamW, CautiousLion

    return {
        "CautiousAdamW": lambda params: CautiousAdamW(params, lr=1e-2, weight_decay=0.1, cautious=True),
        "CautiousLion": lambda params: CautiousLion(params, lr=1e-3, weight_decay=0.1, cautious=True),
        "CAME": lambda params: CAME(params, lr=1e-3, weight_decay=0.1),
    }[name]


def _peer(name: str) -> Factory:
    from dist_cautious.bench.peer_optimizers import timm_optim

    if name == "timm AdamWLegacy(caution=True)":
        return lambda params: timm_optim("adamw").AdamWLegacy(params, lr=1e-2, weight_decay=0.1, caution=True)
    if name == "timm Lion(caution=True)":
        return lambda params: timm_optim("lion").Lion(params, lr=1e-3, weight_decay=0.1, caution=True)
    from came_pytorch import CAME as PeerCAME

    return lambda params: PeerCAME(params, lr=1e-3, weight_decay=0.1)


#: (label, factory name, ours?) in the order printed: each peer next to its dist_cautious counterpart
OPTIMIZERS = (
    ("timm AdamWLegacy(caution=True)", False),
    ("CautiousAdamW", True),
    ("timm Lion(caution=True)", False),
    ("CautiousLion", True),
    ("came-pytorch CAME", False),
    ("CAME", True),
)


def factory(name: str, ours: bool) -> Factory:
    return _ours(name) if ours else _peer(name)


class Model(nn.Module):
    """Rows not divisible by 2, 3 or 4 (``wide``: 5), fewer rows than ranks (``narrow``: 2), a conv
    weight, LayerNorm's 1-D params and a one-element param."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=2)
        self.wide = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)
        self.narrow = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(images)).flatten(1)
        return self.narrow(self.norm(torch.tanh(self.wide(hidden)))) * self.scale


def make_model() -> Model:
    torch.manual_seed(0)
    return Model()


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the fixed global batch of ``step`` (mean loss: the sharded gradient
    equals the single-process one)."""
    generator = torch.Generator().manual_seed(1234 + step)
    images, targets = torch.randn(GLOBAL_BATCH, 3, 3, 3, generator=generator), torch.randn(GLOBAL_BATCH, 2, generator=generator)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    return images[rows], targets[rows]


def single_process(name: str, ours: bool, steps: int) -> dict[str, torch.Tensor]:
    model = make_model()
    optimizer = factory(name, ours)(model.parameters())
    for step in range(steps):
        optimizer.zero_grad()
        images, targets = batch(step, 0, 1)
        nn.functional.mse_loss(model(images), targets).backward()
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def fsdp2_rank(rank: int, world: int, steps: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    for name, ours in OPTIMIZERS:
        model = make_model()
        fully_shard(model, mesh=mesh)
        optimizer = factory(name, ours)(model.parameters())
        try:
            for step in range(steps):
                optimizer.zero_grad()
                images, targets = batch(step, rank, world)
                nn.functional.mse_loss(model(images), targets).backward()
                optimizer.step()
            results[name] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        except Exception as error:  # the finding is the error itself
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return results


def zero2_rank(rank: int, world: int, steps: int) -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    results: dict[str, Any] = {}
    for name, ours in OPTIMIZERS:
        model = make_model()
        optimizer = factory(name, ours)(model.parameters())
        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0, "steps_per_print": 10**9,
        }  # fmt: skip
        try:
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            for step in range(steps):
                images, targets = batch(step, rank, world)
                engine.backward(nn.functional.mse_loss(engine(images), targets))
                engine.step()
            results[name] = {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in engine.module.named_parameters()}
        except Exception as error:
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return results


def _init_deepspeed(rank: int, world: int) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import logging

    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=60))


def out_of_tolerance(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(elements outside rtol/atol, elements) over all params."""
    bad = total = 0
    for name, expected in reference.items():
        close = torch.isclose(weights[name], expected, rtol=RTOL, atol=ATOL)
        bad += int((~close).sum())
        total += close.numel()
    return bad, total


def run(world: int = 3, steps: int = 6) -> list[tuple[str, str, str]]:
    """(optimizer, backend, finding) rows."""
    from dist_cautious.local_ranks import run_ranks
    from dist_cautious.train.job_warnings import job_warning_filters

    with job_warning_filters():
        references = {name: single_process(name, ours, steps) for name, ours in OPTIMIZERS}
        jobs = {
            "FSDP2": run_ranks(fsdp2_rank, world, steps)[0],
            "ZeRO-2": run_ranks(zero2_rank, world, steps, init=_init_deepspeed)[0],
        }
    rows = []
    for name, _ in OPTIMIZERS:
        for backend, results in jobs.items():
            outcome = results[name]
            if isinstance(outcome, str):
                rows.append((name, backend, f"crashed: {outcome}"))
                continue
            bad, total = out_of_tolerance(outcome, references[name])
            rows.append((name, backend, f"{bad} of {total} weights out of tolerance ({100 * bad / total:.0f}%)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    rows = run(args.world_size, args.steps)
    print(f"{args.steps} steps at world size {args.world_size}, each run against the same optimizer's single-process run (rtol {RTOL:g}, atol {ATOL:g})")
    print("| optimizer | backend | result |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
