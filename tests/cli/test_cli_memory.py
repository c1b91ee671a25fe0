"""The memory estimator: hand-computed cases, published parameter counts, and agreement with
the bytes really held per rank after real steps (single process; DDP and FSDP2 over 3 CPU
ranks, where row counts do not divide evenly; DeepSpeed ZeRO-1/2/3 with and without offload in
fp32 and bf16 over 2), within 2% (exact here, but for a few bytes of DeepSpeed's norms)."""

from __future__ import annotations

import pytest

from dist_cautious.bench.memory import OPTIMIZER_NAMES, Setup, estimate
from dist_cautious.bench.memory_measure import MEASURED, measure, measure_rank, relative_error
from dist_cautious.bench.model_shapes import PRESETS, ModelShapes

TINY = ModelShapes("tiny", ((4, 3), (5,)))  # 17 elements
#: large 2-D weights (128 x 512 at most) and small 1-D params (LayerNorm, biases)
MEASURE_MODEL = dict(context=32, width=128, layers=2, heads=4)


def test_published_parameter_counts() -> None:
    assert PRESETS["gpt2-124m"].numel == 124_439_808
    assert PRESETS["llama-7b"].numel == 6_738_415_616
    assert PRESETS["llama-13b"].numel == 13_015_864_320


def test_unsharded_adamw_by_hand() -> None:
    e = estimate(TINY, Setup("adamw", "none", 1, "fp32"))
    assert e.device == {"params": 68, "grads": 68, "master": 0, "optimizer_state": (2 * 17 + 2) * 4}


def test_zero1_splits_state_mid_tensor() -> None:
    # DeepSpeed pads 17 elements to a multiple of 2 * world = 4: partitions of 10 elements, rank 0 =
    # 10 of tensor 0; rank 1 = 2 of tensor 0 + 5 of tensor 1 + 3 padding. Every rank keeps a step
    # per tensor of the group plus one for the partition.
    rank0 = estimate(TINY, Setup("adamw", "zero1", 2, "bf16-mixed"), rank=0)
    rank1 = estimate(TINY, Setup("adamw", "zero1", 2, "bf16-mixed"), rank=1)
    assert rank0.device == rank1.device == {"params": 34, "grads": 34, "master": 40, "optimizer_state": (2 * 10 + 1 + 2) * 4}


def test_zero_came_keeps_second_moments_of_vectors_only() -> None:
    # same partitions; CAME: exp_avg partition-shaped (10), factors 2 * (4 + 3) of tensor 0 and
    # the steps on every rank, exp_avg_sq only for the 5-vector's real elements on the rank
    rank0 = estimate(TINY, Setup("came", "zero2", 2, "fp32"), rank=0)
    rank1 = estimate(TINY, Setup("came", "zero2", 2, "fp32"), rank=1)
    assert rank0.device == {"params": 68, "grads": 40, "master": 40, "optimizer_state": (10 + 1 + 14 + 1 + 0 + 1) * 4}
    assert rank1.device == {"params": 68, "grads": 40, "master": 40, "optimizer_state": (10 + 1 + 14 + 1 + 5 + 1) * 4}


def test_zero3_pads_each_param_and_keeps_small_ones_whole() -> None:
    # ceil(12 / 2) = 6 and ceil(5 / 2) = 3 per rank (rank 1 holds 2 real elements of the vector)
    persistent = estimate(TINY, Setup("came", "zero3", 2, "bf16-mixed"), rank=1)
    partitioned = estimate(TINY, Setup("came", "zero3", 2, "bf16-mixed", zero3_persistence_threshold=5), rank=1)
    assert persistent.device == {"params": (9 + 17) * 2, "grads": 9 * 2, "master": 9 * 4, "optimizer_state": (9 + 1 + 14 + 1 + 2 + 1) * 4}
    assert partitioned.device["params"] == (9 + 5) * 2  # the 5-vector is kept whole, the matrix is not


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


#: categories compared per backend. DeepSpeed ZeRO-1/2 also hold their gradient reduction
#: buckets (sized by reduce_bucket_size and the model, not modelled): their grads are shown, not compared
def _compared(row: dict) -> tuple[str, ...]:
    if row["label"].startswith(("zero1", "zero2")):
        return ("params", "master", "optimizer_state")
    return MEASURED


def _assert_within_two_percent(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        for category in _compared(row):
            if category != "master" or row["backend"] == "deepspeed":
                assert row["measured"][category] > 0, row
            assert relative_error(row, category) <= 0.02, row


def test_estimate_matches_measured_single_process() -> None:
    from dist_cautious.bench.memory_measure import cases_for

    rows = measure_rank(cases_for(1, OPTIMIZER_NAMES), MEASURE_MODEL, steps=2, result_path=None)
    assert {row["optimizer"] for row in rows} == set(OPTIMIZER_NAMES)
    _assert_within_two_percent(rows)


def test_estimate_matches_measured_ddp_and_fsdp2_three_ranks() -> None:
    """3 ranks: FSDP2 row counts do not divide evenly; fp32 and bf16 mixed precision."""
    rows = measure([3], list(OPTIMIZER_NAMES), MEASURE_MODEL, steps=2, deepspeed=False)
    assert sorted({row["rank"] for row in rows}) == [0, 1, 2]
    assert {(row["label"], row["precision"]) for row in rows} == {("ddp", "fp32"), ("fsdp2", "fp32"), ("fsdp2", "bf16")}
    assert len(rows) == 3 * 3 * len(OPTIMIZER_NAMES)
    _assert_within_two_percent(rows)


def test_came_keeps_half_of_adamws_state_under_every_sharding() -> None:
    """DeepSpeed ZeRO-1/2/3, each with and without CPU offload, fp32 and bf16, and FSDP2, on 2
    ranks: CAME's measured optimizer state is within 2% of the estimate and at most 55% of
    CautiousAdamW's on the same model and setting (its exp_avg, about 50%, plus the factors and
    the 1-D second moments). A partition-sized second moment would put it at 100%."""
    rows = measure([2], ["came", "cautious-adamw"], MEASURE_MODEL, steps=2)
    _assert_within_two_percent(rows)
    state = {(r["optimizer"], r["label"], r["precision"], r["rank"]): r["measured"]["optimizer_state"] for r in rows}
    settings = {key[1:] for key in state}
    assert {label for label, _, _ in settings} >= {"zero1", "zero1+offload", "zero2", "zero2+offload", "zero3", "zero3+offload", "fsdp2"}
    assert {precision for _, precision, _ in settings} == {"fp32", "bf16"}
    for setting in settings:
        ratio = state[("came", *setting)] / state[("cautious-adamw", *setting)]
        assert ratio <= 0.55, (setting, ratio)


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
