"""Warnings a job filters out while it runs, and only then.

DeepSpeed's ZeRO-3 calls ``torch.distributed.all_gather_into_tensor`` / ``reduce_scatter_tensor``,
which torch deprecates: several FutureWarnings per step, through the progress bar, that the
user can do nothing about. The ``train`` job and the measured memory benchmark run inside
``job_warning_filters``; a program that imports dist_cautious keeps its own warning set-up.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

#: (category, message regex, module regex) of each warning a job drops
JOB_WARNING_FILTERS = (
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", r"torch\.distributed(\.|$)"),
)


@contextlib.contextmanager
def job_warning_filters() -> Iterator[None]:
    """Ignore ``JOB_WARNING_FILTERS`` inside the block; ``warnings.filters`` is restored after it,
    so a program that imports dist_cautious (or calls ``main``) keeps its own warning set-up."""
    with warnings.catch_warnings():
        for category, message, module in JOB_WARNING_FILTERS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield
