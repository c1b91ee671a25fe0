"""The tests launch ranks with the package's own local launcher."""

from dist_cautious.local_ranks import free_port, run_ranks

__all__ = ["free_port", "run_ranks"]
