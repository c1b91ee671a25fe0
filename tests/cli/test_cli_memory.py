"""The memory estimator: hand-computed cases, published parameter counts, and agreement with
the bytes really held per rank after real steps (single process, and FSDP2 over 3 CPU ranks,
where row counts do not divide evenly), within 2% as the issue asks (it is exact here)."""

from __future__ import annotations

import pytest

from dist_cautious.bench.memory import OPTIMIZER_NAMES, Setup, estimate
from dist_cautious.bench.memory_measure import MEASURED, measure, measure_rank, relative_error
from dist_cautious.bench.model_shapes import PRESETS, ModelShapes

TINY = ModelShapes("tiny", ((4, 3), (5,)))  # 17 elements
MEASURE_MODEL = dict(context=32, width=48, layers=2, heads=4)


def test_published_parameter_counts() -> None:
    assert PRESETS["gpt2-124m"].numel == 124_439_808
    assert PRESETS["llama-7b"].numel == 6_738_415_616
    assert PRESETS["llama-13b"].numel == 13_015_864_320


def test_unsharded_adamw_by_hand() -> None:
    e = estimate(TINY, Setup("adamw", "none", 1, "fp32"))
    assert e.device == {"params": 68, "grads": 68, "master": 0, "optimizer_state": (2 * 17 + 2) * 4}


def test_zero1_splits_state_mid_tensor() -> None:
    # partitions of ceil(17 / 2) = 9 elements: rank 0 = 9 of tensor 0; rank 1 = 3 of tensor 0 + 5 of tensor 1
    rank0 = estimate(TINY, Setup("adamw", "zero1", 2, "bf16-mixed"), rank=0)
    rank1 = estimate(TINY, Setup("adamw", "zero1", 2, "bf16-mixed"), rank=1)
    assert rank0.device == {"params": 34, "grads": 34, "master": 36, "optimizer_state": (2 * 9 + 1) * 4}
    assert rank1.device == {"params": 34, "grads": 34, "master": 32, "optimizer_state": (2 * 8 + 2) * 4}


def test_fsdp_came_replicates_factors_on_an_empty_shard() -> None:
    # 3 ranks, chunks of 2 rows: rank 2 has no row of the (4, 3) tensor and 1 of the 5-vector
    e = estimate(TINY, Setup("came", "fsdp", 3, "fp32"), rank=2)
    assert e.device["params"] == (2 * 3 + 2) * 4  # padded chunks
    assert e.device["optimizer_state"] == ((0 + 2 * (4 + 3) + 1) + (2 * 1 + 1)) * 4


def test_cautious_variants_hold_the_same_state_and_offload_moves_it() -> None:
    model = PRESETS["gpt2-124m"]
    for base, cautious in (("adamw", "cautious-adamw"), ("came", "c-came"), ("lion", "cautious-lion")):
        assert estimate(model, Setup(base)).device == estimate(model, Setup(cautious)).device
    offloaded = estimate(model, Setup("adamw", "zero2", 8, "bf16-mixed", "optimizer"))
    assert offloaded.device["optimizer_state"] == offloaded.device["master"] == 0
    assert offloaded.host["optimizer_state"] == estimate(model, Setup("adamw", "zero2", 8, "bf16-mixed")).device["optimizer_state"]


def test_setup_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown sharding"):
        Setup(sharding="zero4")
    with pytest.raises(ValueError, match="world size"):
        Setup(world_size=0)
    with pytest.raises(ValueError, match="rank"):
        estimate(TINY, Setup(world_size=2), rank=2)


def _assert_within_two_percent(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        for category in MEASURED:
            assert row["measured"][category] > 0, row
            assert relative_error(row, category) <= 0.02, row


def test_estimate_matches_measured_single_process() -> None:
    rows = measure_rank(list(OPTIMIZER_NAMES), MEASURE_MODEL, steps=2, result_path=None)
    assert {row["optimizer"] for row in rows} == set(OPTIMIZER_NAMES)
    _assert_within_two_percent(rows)


def test_estimate_matches_measured_fsdp2_three_ranks() -> None:
    rows = measure(list(OPTIMIZER_NAMES), [3], MEASURE_MODEL, steps=2)
    assert sorted({row["rank"] for row in rows}) == [0, 1, 2]
    assert len(rows) == 3 * len(OPTIMIZER_NAMES)
    _assert_within_two_percent(rows)


def test_hf_config_gives_the_preset_shapes(tmp_path) -> None:
    """A LLaMA-2-7B and a GPT-2 config.json (the fields Hugging Face publishes) read as the presets."""
    import json

    from dist_cautious.bench.model_shapes import from_hf_config

    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}))
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}))
    assert from_hf_config(llama).shapes == PRESETS["llama-7b"].shapes
    assert from_hf_config(gpt2).shapes == PRESETS["gpt2-124m"].shapes
