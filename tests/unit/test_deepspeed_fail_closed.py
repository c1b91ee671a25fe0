"""The DeepSpeed integration fails closed: what it does not recognise raises, naming it.

Each case below used to pass silently into wrong math: an unknown optimizer wrapper left the
basic optimizer stepping DeepSpeed's flat tensors as if they were whole params (one mask mean,
one CAME factorisation over a concatenation); a param without ``_hp_mapping`` read as "this
rank holds nothing" (the weight frozen); a mapping that does not tile its partition mixed
tensors; an engine whose ``basic_optimizer`` is not ours was never given the partition layout.
These run on hand-built stand-ins for DeepSpeed's objects, no process group.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")

from dist_cautious.integrations import deepspeed as integration  # noqa: E402
from dist_cautious.optim import CAME, CautiousAdamW  # noqa: E402
from dist_cautious.shard.zero import Piece  # noqa: E402


def _engine(wrapper: Any, optimizer: Any, module: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(basic_optimizer=optimizer, optimizer=wrapper, module=module, param_names={})


def test_an_unknown_wrapper_is_refused() -> None:
    module = torch.nn.Linear(4, 3)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
    optimizer = CautiousAdamW([flat])

    class FlatteningWrapper:  # a wrapper the integration has never seen, stepping one flat tensor
        pass

    with pytest.raises(ValueError, match="FlatteningWrapper is not one the integration knows"):
        integration.install(_engine(FlatteningWrapper(), optimizer, module))


def test_whole_params_without_a_wrapper_are_accepted() -> None:
    module = torch.nn.Linear(4, 3)
    optimizer = CautiousAdamW(module.parameters())
    assert integration.install(_engine(optimizer, optimizer, module)) is None


def test_a_flat_tensor_handed_as_the_only_param_is_refused_even_without_a_wrapper() -> None:
    module = torch.nn.Linear(4, 3)
    flat = torch.nn.Parameter(torch.zeros(15))
    optimizer = CAME([flat], lr=1e-3)
    with pytest.raises(ValueError, match="not one the integration knows"):
        integration.install(_engine(optimizer, optimizer, module))


def test_a_param_without_hp_mapping_is_refused() -> None:
    module = torch.nn.Linear(4, 3)
    params = list(module.parameters())
    params[0]._hp_mapping = None  # DeepSpeed's way of saying "no element on this rank"
    flat = torch.nn.Parameter(torch.zeros(16))
    wrapper = SimpleNamespace(single_partition_of_fp32_groups=[flat], bit16_groups=[params], real_dp_process_group=[None])
    with pytest.raises(ValueError, match=r"param 1 of DeepSpeed group 0 \(shape \(3,\)\) has no _hp_mapping"):
        integration.install(_engine(wrapper, CautiousAdamW([flat]), module))


def _piece(index: int, shape: tuple[int, ...], flat_offset: int, start: int, numel: int) -> Piece:
    return Piece(index, f"p{index}", torch.zeros(shape), torch.Size(shape), flat_offset, start, numel, None)


def test_pieces_must_tile_the_partition() -> None:
    flat = torch.zeros(10)
    wrapper = SimpleNamespace()  # ZeRO-1/2: no fp32_partitioned_groups_flat
    tiled = [_piece(0, (4, 3), 0, 4, 8), _piece(1, (5,), 8, 0, 2), _piece(2, (7,), 0, 0, 0)]
    assert integration.checked_layout({id(flat): (flat, tiled)}, wrapper)
    gap = [_piece(0, (4, 3), 0, 4, 7), _piece(1, (5,), 8, 0, 2)]
    overlap = [_piece(0, (4, 3), 0, 4, 8), _piece(1, (5,), 7, 0, 2)]
    outside_tensor = [_piece(0, (4, 3), 0, 6, 8)]
    past_partition = [_piece(0, (4, 3), 0, 0, 12)]
    for pieces, message in ((gap, "offset 8, where 7"), (overlap, "offset 7, where 8"), (outside_tensor, r"\[6, 14\) of a 12-element"), (past_partition, "span 12 elements of a 10-element")):
        with pytest.raises(ValueError, match=message):
            integration.checked_layout({id(flat): (flat, pieces)}, wrapper)


def test_an_engine_without_our_basic_optimizer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DeepSpeed whose engine stops exposing ``basic_optimizer`` (renamed) must not leave our
    optimizer stepping partitions with no layout installed."""
    monkeypatch.setattr(integration, "check_config", lambda engine: None)  # the stand-in has no config

    class Engine:
        def _do_sanity_check(self) -> None:  # patched too: the config's optimizer name is resolved there
            pass

        def _configure_optimizer(self, client_optimizer: Any, model_parameters: Any) -> None:
            self.renamed_basic_optimizer = client_optimizer

    integration._patch_engine(SimpleNamespace(DeepSpeedEngine=Engine))
    client = CautiousAdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="no basic_optimizer of ours"):
        Engine()._configure_optimizer(client, None)
