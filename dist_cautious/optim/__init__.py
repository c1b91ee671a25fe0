"""The three optimizers, each a ``torch.optim.Optimizer`` written against fragments."""

from dist_cautious.optim.adamw import CautiousAdamW
from dist_cautious.optim.came import CAME
from dist_cautious.optim.lion import CautiousLion

__all__ = ["CautiousAdamW", "CAME", "CautiousLion"]
