"""FSDP1 is refused: its flat parameters (and, with ``use_orig_params=True``, the views into this
rank's slice of one) are not whole tensors, so whole-tensor statistics of them would be per shard.

FSDP1 needs an accelerator (it refuses to build on a CPU-only machine), so the params are marked
the way FSDP1 marks them, with torch's own helpers: a ``FlatParameter``, and
``_set_fsdp_flattened`` on a param it has flattened. Before the refusal both stepped silently.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp._common_utils import _set_fsdp_flattened
from torch.distributed.fsdp._flat_param import FlatParameter

from dist_cautious import CAME, CautiousAdamW, CautiousLion

OPTIMIZERS = [lambda p: CautiousAdamW(p), lambda p: CAME(p, lr=1e-3), lambda p: CautiousLion(p)]


def _flattened_view() -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.randn(3, 4))
    _set_fsdp_flattened(param)
    return param


@pytest.mark.parametrize("make", OPTIMIZERS)
@pytest.mark.parametrize("marked", [lambda: FlatParameter(torch.randn(12), requires_grad=True), _flattened_view])
def test_fsdp1_params_are_refused_and_nothing_changes(make, marked) -> None:
    whole = torch.nn.Parameter(torch.randn(5))
    flat = marked()
    optimizer = make([whole, flat])
    for p in (whole, flat):
        p.grad = torch.randn_like(p)
    before = [whole.detach().clone(), flat.detach().clone()]
    with pytest.raises(ValueError, match="FSDP1"):
        optimizer.step()
    assert torch.equal(whole, before[0]) and torch.equal(flat, before[1])
    assert not optimizer.state or all(not state for state in optimizer.state.values())
