"""Sparse-Dynamic Training in any training loop: the schedule and topology updates of both modes.

`SDTController(model, config, total_steps)` gives the controller of `config.mode`: a `WeightsController` (density
schedule, pruning, drop/grow of block-sparse weights, `weights.py`) or an `UpdatesController` (gradient selection and
drop/grow of the trainable update blocks, `updates.py`); what they share is in `base.py`. Both hold the training-time
state (schedule position, score accumulators, RNG) and collect their statistics with forward hooks they attach and
remove; they never import `Trainer`.
"""

from .base import SDTController, reset_optimizer_state
from .updates import UpdatesController
from .weights import WeightsController

__all__ = ["SDTController", "UpdatesController", "WeightsController", "reset_optimizer_state"]
