"""FactoredLayout: partial row/column sums and row x column products over arbitrary flat ranges.

ZeRO cuts tensors anywhere, mid-row and mid-matrix included; the pieces' partial sums must add up
to the whole tensor's and the pieces' outer products must tile the whole tensor's. Sums of a few
fp32 values in different order: rtol 1e-6. Products: bitwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from dist_cautious.kernels.layout import FactoredLayout

SHAPES = [(5, 3), (1, 7), (6, 1), (4, 3, 2, 2), (2, 3, 5)]


def random_cuts(numel: int, pieces: int, generator: torch.Generator) -> list[int]:
    inner = sorted(torch.randint(0, numel + 1, (pieces - 1,), generator=generator).tolist())
    return [0, *inner, numel]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 9])
def test_pieces_sum_and_tile_like_the_whole(shape: tuple[int, ...], pieces: int) -> None:
    generator = torch.Generator().manual_seed(pieces * 31 + len(shape))
    x = torch.rand(shape, generator=generator) + 0.5
    flat = x.reshape(-1)
    row_vec = torch.rand(math.prod(shape[:-1]), generator=generator)
    col_vec = torch.rand(math.prod(shape[:-2]) * shape[-1], generator=generator)
    rows, cols = torch.zeros_like(row_vec), torch.zeros_like(col_vec)
    tiles = []
    cuts = random_cuts(flat.numel(), pieces, generator)
    for start, end in zip(cuts[:-1], cuts[1:]):
        layout = FactoredLayout(shape, start, end)
        layout.add_row_col_sums(flat[start:end], rows, cols)
        tiles.append(layout.outer(row_vec, col_vec))
    torch.testing.assert_close(rows, x.sum(dim=-1).reshape(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(cols, x.sum(dim=-2).reshape(-1), rtol=1e-6, atol=0)
    expected = (row_vec.view(shape[:-1]).unsqueeze(-1) * col_vec.view(shape[:-2] + shape[-1:]).unsqueeze(-2)).reshape(-1)
    assert torch.equal(torch.cat(tiles), expected)


def test_a_range_inside_one_row() -> None:
    layout = FactoredLayout((3, 10), 12, 17)
    assert layout.full_rows[1] == 0
    assert [(p.row, p.col_start, p.col_end) for p in layout.partial_rows] == [(1, 2, 7)]


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="ndim >= 2"):
        FactoredLayout((5,), 0, 5)
    with pytest.raises(ValueError, match="outside"):
        FactoredLayout((2, 2), 1, 5)
