"""Optimizer names: timm's aliases, any case, hyphens or underscores; unknown names refused.

The factory (``dist_cautious.create_optimizer``, ``train.optimizers``) and a DeepSpeed config's
``optimizer.type`` share one table (``dist_cautious.integrations.names``). What would slip
through without these tests: an alias that builds the right class with the wrong ``cautious``
(``c-came`` silently unmasked, ``adamw`` silently masked), a DeepSpeed config whose alias falls
through to DeepSpeed's own optimizer or to an AssertionError, timm's "corrected weight decay"
names run as plain cautious optimizers, or a ``caution=`` keyword (timm's spelling) ignored.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dist_cautious
from dist_cautious import CAME, CautiousAdamW, CautiousLion
from dist_cautious.integrations.names import accepted_names, lookup
from dist_cautious.train.optimizers import canonical_name, optimizer_spec

#: spelling -> (class, cautious) it must build
SPELLINGS: dict[str, tuple[type, bool]] = {
    "cadamw": (CautiousAdamW, True),
    "CAdamW": (CautiousAdamW, True),
    "CautiousAdamW": (CautiousAdamW, True),
    "cautious-adamw": (CautiousAdamW, True),
    "cautious_adamw": (CautiousAdamW, True),
    "adamw": (CautiousAdamW, False),
    "AdamW": (CautiousAdamW, False),
    "came": (CAME, False),
    "CAME": (CAME, False),
    "c-came": (CAME, True),
    "C_CAME": (CAME, True),
    "cautious-came": (CAME, True),
    "clion": (CautiousLion, True),
    "CLION": (CautiousLion, True),
    "Cautious-Lion": (CautiousLion, True),
    "lion": (CautiousLion, False),
}


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_create_optimizer_builds_the_named_optimizer(spelling: str) -> None:
    cls, cautious = SPELLINGS[spelling]
    optimizer = dist_cautious.create_optimizer(spelling, _params(), lr=1e-3)
    assert type(optimizer) is cls
    assert optimizer.defaults["cautious"] is cautious
    assert optimizer.defaults["lr"] == 1e-3


def test_keywords_win_over_what_the_name_implies_and_class_defaults_are_kept() -> None:
    optimizer = dist_cautious.create_optimizer("cadamw", _params(), cautious=False, weight_decay=0.5)
    assert optimizer.defaults["cautious"] is False and optimizer.defaults["weight_decay"] == 0.5
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["lr"] == 1e-3  # the class's own
    lion = dist_cautious.create_optimizer("clion", _params())
    assert lion.defaults["lr"] == 1e-4  # CautiousLion's default, not the demo's 1e-3


def test_timm_caution_keyword_and_a_module_are_accepted() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = dist_cautious.create_optimizer("lion", model, caution=True)
    assert optimizer.defaults["cautious"] is True
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.parameters())
    with pytest.raises(ValueError, match="contradicts"):
        dist_cautious.create_optimizer("lion", model, caution=True, cautious=False)


def test_param_groups_pass_through() -> None:
    a, b = _params()
    optimizer = dist_cautious.create_optimizer("c-came", [{"params": [a]}, {"params": [b], "lr": 5e-4}], lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4]


@pytest.mark.parametrize("name", ["sgd", "adam", "cadam", "came2", ""])
def test_unknown_names_list_the_accepted_ones(name: str) -> None:
    with pytest.raises(ValueError, match="unknown optimizer") as error:
        dist_cautious.create_optimizer(name, _params())
    for accepted in ("cadamw", "clion", "c-came", "cautious-adamw"):
        assert accepted in str(error.value)


@pytest.mark.parametrize("name", ["cadamc", "clionc", "CLION-C"])
def test_timm_corrected_weight_decay_variants_are_refused_not_approximated(name: str) -> None:
    with pytest.raises(ValueError, match="corrected weight decay"):
        dist_cautious.create_optimizer(name, _params())


def test_the_demo_job_resolves_aliases_to_its_own_names() -> None:
    assert canonical_name("cadamw") == "cautious-adamw"
    assert canonical_name("CLion") == "cautious-lion"
    assert canonical_name("C_CAME") == "c-came"
    assert canonical_name("AdamW") == "adamw"
    assert optimizer_spec("clion").label == "CautiousLion"
    with pytest.raises(ValueError, match="unknown optimizer"):
        canonical_name("sgd")


def test_baselines_can_be_left_out_for_deepspeed() -> None:
    assert "adamw" not in accepted_names(include_baselines=False)
    with pytest.raises(ValueError):
        lookup("lion", include_baselines=False)


def _timm_registry() -> dict[str, tuple[str, dict[str, Any]]]:
    """timm's registry, ``name -> (optimizer class name, defaults)``, read from the source of
    ``timm/optim/_optim_factory.py`` (importing it needs torchvision, which has no CPU build
    here): every ``OptimInfo(name=..., opt_class=..., defaults=...)`` call with literal values."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        message = "timm is not installed (make install-test: pip install --no-deps timm==1.0.31)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    source = Path(list(spec.submodule_search_locations)[0], "optim", "_optim_factory.py").read_text()
    registry: dict[str, tuple[str, dict[str, Any]]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "OptimInfo":
            kwargs = {k.arg: k.value for k in node.keywords}
            if isinstance(kwargs.get("name"), ast.Constant):
                defaults = ast.literal_eval(kwargs["defaults"]) if "defaults" in kwargs else {}
                registry[kwargs["name"].value] = (ast.unparse(kwargs["opt_class"]), defaults)
    return registry


def test_timm_registry_names_mean_the_same_optimizers() -> None:
    """timm 1.0.31's ``cadamw`` / ``clion`` are ``caution=True`` AdamW / Lion and its ``adamw``
    / ``lion`` are unmasked; ours mean the same. timm has no CAME (if it gains one, its name
    must be added here); its ``*c`` names (corrected weight decay) are refused by ours."""
    registry = _timm_registry()
    assert len(registry) > 50, "the registry parse found too few entries: timm's file changed shape"
    for name in ("cadamw", "clion", "adamw", "lion"):
        opt_class, defaults = registry[name]
        ours = lookup(name)
        assert bool(defaults.get("caution")) is ours.implied["cautious"], name
        assert ("Lion" in opt_class) is (ours.cls is CautiousLion) and ("AdamW" in opt_class) is (ours.cls is CautiousAdamW), name
    assert not [name for name in registry if "came" in name.lower()], "timm now has a CAME: add its name"
    for name in ("cadamc", "clionc"):
        assert registry[name][1].get("corrected_weight_decay") is True
        with pytest.raises(ValueError, match="corrected"):
            lookup(name)


# ---------------------------------------------------------------------------------------------
# DeepSpeed config names
# ---------------------------------------------------------------------------------------------

deepspeed_integration = pytest.importorskip("dist_cautious.integrations.deepspeed")


def _config(name: str, params: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(optimizer_name=name, optimizer_params=params)


@pytest.mark.parametrize("name", ["adamw", "lion", "Adam", "SGD", "CAME", "CautiousAdamW", None])
def test_deepspeed_and_torch_names_are_left_alone(name: str | None) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    config = _config(name, {"lr": 0.1})
    deepspeed_integration.resolve_config_name(config)
    assert config.optimizer_name == name and config.optimizer_params == {"lr": 0.1}


def test_deepspeed_aliases_become_class_names_with_implied_keywords() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    config = _config("c-came", {"lr": 0.1})
    deepspeed_integration.resolve_config_name(config)
    assert config.optimizer_name == "CAME" and config.optimizer_params == {"cautious": True, "lr": 0.1}
    config = _config("cadamw", {"cautious": False})  # the config's own params win
    deepspeed_integration.resolve_config_name(config)
    assert config.optimizer_name == "CautiousAdamW" and config.optimizer_params == {"cautious": False}
    with pytest.raises(ValueError, match="none of DeepSpeed's optimizers") as error:
        deepspeed_integration.resolve_config_name(_config("cadam"))
    assert "cadamw" in str(error.value) and "clion" in str(error.value)
    # a real deepspeed.initialize with aliases in the config: tests/integrations/test_hugging_face.py
    # (Trainer + DeepSpeed, "type": "c-came" / "cadamw", ZeRO-2 / ZeRO-3)
