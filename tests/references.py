"""The peer implementations the tests compare against (see ``dist_cautious.bench.peer_optimizers``)."""

from dist_cautious.bench.peer_optimizers import timm_optim

__all__ = ["timm_optim"]
