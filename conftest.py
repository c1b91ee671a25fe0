"""Lets tests import the ``tests`` helpers (``tests.references``, ``tests.dist.awkward_model``)."""
