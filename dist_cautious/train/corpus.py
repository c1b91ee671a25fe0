"""The embedded corpus: the source text of Python's own standard library, as bytes.

Every Python install ships it, so the job needs no download. Files are the top-level ``*.py``
modules of the stdlib directory in sorted order, concatenated until ``max_bytes``; tokens are
bytes (vocabulary 256). The last ``val_fraction`` of the text is held out for validation.

Batches are drawn for the GLOBAL batch from a generator seeded by ``(seed, step)`` and each rank
takes its contiguous slice, so the data a step sees is the same for every world size: a sharded
run and a single-process run of the same global batch see identical tokens.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB_SIZE = 256
VAL_FRACTION = 0.05


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_stdlib_bytes(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of stdlib source, deterministic for a given Python install."""
    if not isinstance(max_bytes, int) or max_bytes < 1024:
        raise ValueError(f"corpus size must be an integer >= 1024 bytes, got {max_bytes!r}")
    root = stdlib_dir()
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in the standard library directory {root}")
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return b"".join(chunks)


@dataclass
class Corpus:
    """Train / validation token tensors (uint8 bytes stored as int64 for embedding lookups)."""

    train: Tensor
    val: Tensor
    files_bytes: int

    @classmethod
    def from_stdlib(cls, max_bytes: int, val_fraction: float = VAL_FRACTION) -> "Corpus":
        if not 0.0 < val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
        data = torch.frombuffer(bytearray(load_stdlib_bytes(max_bytes)), dtype=torch.uint8).long()
        cut = int(len(data) * (1.0 - val_fraction))
        return cls(train=data[:cut], val=data[cut:], files_bytes=len(data))

    def batch(self, split: str, step: int, global_batch: int, context: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> tuple[Tensor, Tensor]:
        """This rank's rows of the global batch of ``step``: inputs and next-byte targets."""
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        tokens = self.train if split == "train" else self.val
        if len(tokens) <= context + 1:
            raise ValueError(f"the {split} split ({len(tokens)} bytes) is shorter than context {context} + 1")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 2 + (split != "train"))
        starts = torch.randint(0, len(tokens) - context - 1, (global_batch,), generator=generator)
        per_rank = global_batch // world_size
        starts = starts[rank * per_rank : (rank + 1) * per_rank]
        offsets = torch.arange(context + 1)
        windows = tokens[starts[:, None] + offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]
