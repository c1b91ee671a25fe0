"""The small model every sharding-invariance test trains: shapes chosen to break naive sharding.

- ``wide``   Linear(6 -> 5): 5 rows, not divisible by world sizes 2, 3, 4
- ``narrow`` Linear(5 -> 2): 2 rows, fewer than 3 or 4 ranks (some shards are empty)
- ``conv``   Conv2d(3 -> 2, 2x2): a 4-D weight CAME factors over its 2x2 kernel dims
- ``norm``   LayerNorm(5): 1-D weight and bias
- ``scale``  a one-element param (FSDP2 refuses 0-D params; 0-D is covered by the unit tests)
- ``frozen`` requires_grad=False: never stepped
- ``unused`` trainable but never in the graph: its grad stays None (torch.optim skips it;
  DeepSpeed gives it a zero grad instead, so decay and momentum still move it there)
The data is a fixed global batch of 12 (divisible by 1, 2, 3, 4), split evenly over the ranks,
with a mean loss, so that averaged sharded gradients equal the single-process gradient.
"""

from __future__ import annotations

import torch
from torch import nn

GLOBAL_BATCH = 12


class AwkwardModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=2)  # [2, 3, 2, 2] on a 3x3 image -> [2, 2, 2]
        self.wide = nn.Linear(8, 5)
        self.norm = nn.LayerNorm(5)
        self.narrow = nn.Linear(5, 2)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.frozen = nn.Parameter(torch.randn(3, 4), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(4, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv(images)).flatten(1)
        hidden = self.norm(torch.tanh(self.wide(hidden)))
        return self.narrow(hidden) * self.scale


def make_model(seed: int = 0) -> AwkwardModel:
    torch.manual_seed(seed)
    return AwkwardModel()


def batch(step: int, rank: int = 0, world_size: int = 1, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step`` (identical data for every world size)."""
    generator = torch.Generator().manual_seed(seed + step)
    images = torch.randn(GLOBAL_BATCH, 3, 3, 3, generator=generator)
    targets = torch.randn(GLOBAL_BATCH, 2, generator=generator)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return images[rows], targets[rows]


def loss_fn(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(images), targets)
