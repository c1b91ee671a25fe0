"""CAME's factor update, batched over fragments with ``torch._foreach_*``, is bit for bit the
per-tensor statement (``_ema_`` then ``_normalised_rsqrt``) it replaces."""

from __future__ import annotations

from collections import defaultdict

import torch

from dist_cautious.optim.came import CAME, _ema_, _factor_shapes, _normalised_rsqrt
from dist_cautious.shard.adapters import default_fragments


def test_batched_factor_update_is_the_per_tensor_update_bitwise() -> None:
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((7, 5), (3, 4, 6), (1, 9))]
    for param in params:
        param.grad = torch.randn(param.shape, generator=gen)
    state: dict = defaultdict(dict)
    fragments = list(default_fragments(params, state))
    sums, expected = [], []
    for fragment in fragments:
        row_shape, col_shape = _factor_shapes(fragment.global_shape)
        rows = torch.rand(row_shape, generator=gen) + 0.1
        cols = torch.rand(col_shape, generator=gen) + 0.1
        fragment.state["exp_avg_sq_row"], fragment.state["exp_avg_sq_col"] = rows.clone(), cols.clone()
        row_sums = torch.rand(rows.numel(), generator=gen)
        col_sums = torch.rand(cols.numel(), generator=gen)
        sums.append((row_sums, col_sums))
        _ema_(rows.view(-1), 0.999, row_sums, fragment.global_shape[-1])
        _ema_(cols.view(-1), 0.999, col_sums, fragment.global_shape[-2])
        expected.append((rows, cols, *_normalised_rsqrt(rows.view(-1), cols.view(-1), fragment.global_shape[-2])))
    folded = [torch.ones(1), None, torch.ones(1)]
    factors = CAME._updated_factors(fragments, "exp_avg_sq", 0.999, sums, folded)
    for fragment, factor, (rows, cols, row_factor, col_factor, means), fold in zip(fragments, factors, expected, folded):
        assert torch.equal(fragment.state["exp_avg_sq_row"], rows) and torch.equal(fragment.state["exp_avg_sq_col"], cols)
        assert torch.equal(factor.row, row_factor) and torch.equal(factor.col, col_factor)
        assert factor.layout == fragment.layout()
        if fold is None:
            assert factor.folded is None and factor.row_means is None
        else:
            assert factor.folded is fold and torch.equal(factor.row_means, means)
