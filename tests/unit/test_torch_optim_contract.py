"""Where PyTorch's own optimizer tests (test/test_optim.py, TestOptimRenewed) found us differing
from torch.optim: a Python-number ``step`` in a loaded state_dict, a tensor lr of several
elements (torch raises ValueError), 1-element tensor betas (torch accepts them)."""

from __future__ import annotations

import pytest
import torch

from dist_cautious import CAME, CautiousAdamW, CautiousLion
from dist_cautious.optim.base import step_count

FACTORIES = {
    "CautiousAdamW": lambda params, **kw: CautiousAdamW(params, **kw),
    "CAME": lambda params, **kw: CAME(params, lr=kw.pop("lr", 1e-3), **kw),
    "CautiousLion": lambda params, **kw: CautiousLion(params, **kw),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_a_state_dict_with_number_steps_resumes_as_tensor_steps(name: str) -> None:
    """torch.optim accepts ``step`` as a Python number (older checkpoints): the resumed run must
    continue exactly as one whose steps were tensors."""
    torch.manual_seed(0)
    shapes = [(5, 3), (4,)]
    runs = []
    for as_number in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        optimizer = FACTORIES[name](params)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            optimizer.step()
        saved = optimizer.state_dict()
        if as_number:
            for state in saved["state"].values():
                state["step"] = float(state["step"])
        resumed = FACTORIES[name](params)
        resumed.load_state_dict(saved)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
        resumed.step()
        runs.append([p.detach().clone() for p in params] + [float(resumed.state[params[0]]["step"])])
    assert runs[1][-1] == runs[0][-1] == 3.0
    for a, b in zip(runs[0][:-1], runs[1][:-1]):
        assert torch.equal(a, b)


def test_step_count_takes_a_number_step() -> None:
    """The path without a step plan (DeepSpeed's fragments) reads ``state["step"]`` itself."""
    state = {"step": 4.0}
    assert step_count(state) == 5 and isinstance(state["step"], torch.Tensor)
    assert step_count({}) == 1


@pytest.mark.parametrize("name", FACTORIES)
def test_a_tensor_lr_of_several_elements_is_a_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        FACTORIES[name]([torch.nn.Parameter(torch.randn(3))], lr=torch.tensor([1e-3, 1e-3]))


def test_one_element_tensor_betas_are_accepted_as_numbers() -> None:
    betas = (torch.tensor(0.9), torch.tensor(0.99))
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = CautiousAdamW([param], betas=betas)
    assert optimizer.param_groups[0]["betas"] == (pytest.approx(0.9), pytest.approx(0.99))
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        CautiousLion([param], betas=(torch.tensor(0.9), torch.tensor(1.5)))
