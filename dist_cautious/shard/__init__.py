"""Fragments of sharded tensors, the adapters that make them, and the batched reducer."""

from dist_cautious.shard.fragment import Fragment
from dist_cautious.shard.reducer import BatchedReducer

__all__ = ["Fragment", "BatchedReducer"]
