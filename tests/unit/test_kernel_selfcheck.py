"""Native kernels are used only after they agree with the reference path on a small case."""

from __future__ import annotations

import types

import pytest
import torch

import dist_cautious.kernels as kernels
from dist_cautious.kernels import reference, selfcheck

APPLY_KERNELS = ["adamw_apply", "lion_apply", "came_apply"]


def namespace_with_broken(name: str) -> types.SimpleNamespace:
    """The reference functions, with ``name`` nudging its first param by 1e-3 (10x the tolerance)."""
    ops = types.SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("_")})
    correct = getattr(reference, name)

    def broken(params, *args, **kwargs):
        correct(params, *args, **kwargs)
        params[0].view(-1)[0] += 1e-3

    setattr(ops, name, broken)
    return ops


def test_reference_passes_its_own_check() -> None:
    selfcheck.verify(reference, torch.device("cpu"))


@pytest.mark.parametrize("name", APPLY_KERNELS)
def test_a_wrong_kernel_is_caught(name: str) -> None:
    with pytest.raises(RuntimeError, match=name):
        selfcheck.verify(namespace_with_broken(name), torch.device("cpu"))


def test_auto_mode_falls_back_to_reference_when_the_check_fails(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake_module = types.SimpleNamespace(load=lambda: namespace_with_broken("adamw_apply"))
    monkeypatch.setattr(kernels.importlib, "import_module", lambda name: fake_module)
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "auto")
    with caplog.at_level("WARNING", logger="dist_cautious"):
        assert kernels.ops_for(torch.device("cpu")) is reference
    assert "self-check failed in adamw_apply" in caplog.text
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("DIST_CAUTIOUS_KERNELS", "native")
    with pytest.raises(RuntimeError, match="native cpu kernels unavailable"):
        kernels.ops_for(torch.device("cpu"))


@pytest.mark.parametrize("name", ["lion_cautious_finish", "came_cautious_finish"])
def test_a_wrong_second_phase_is_caught(name: str) -> None:
    """The split phases take what the first phase left as their first argument, then the params."""
    ops = types.SimpleNamespace(**{k: getattr(reference, k) for k in dir(reference) if not k.startswith("_")})
    correct = getattr(reference, name)

    def broken(pending, params, *args, **kwargs):
        correct(pending, params, *args, **kwargs)
        params[0].view(-1)[0] += 1e-3

    setattr(ops, name, broken)
    with pytest.raises(RuntimeError, match=name):
        selfcheck.verify(ops, torch.device("cpu"))
