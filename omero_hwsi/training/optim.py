"""AdamW and the learning-rate schedule of a run.

Weight decay is not applied to biases, norm scales or the temperature: shrinking them toward
zero regularises nothing and biases the model. The schedule is a pure function of the step,
so a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["build_optimizer", "schedule_factor"]


def build_optimizer(
    params: Sequence[tuple[str, nn.Parameter]], *, lr: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the named trainable parameters, in two groups (decayed and not).

    A parameter is decayed when it has at least two axes (weight matrices, embeddings);
    one-axis parameters (biases, LayerNorm scales) and scalars are not.

    Raises:
        ValueError: no parameter to train.
    """
    decay = [p for _, p in params if p.ndim >= 2]
    plain = [p for _, p in params if p.ndim < 2]
    if not decay and not plain:
        raise ValueError("nothing to train: no parameter requires a gradient")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def schedule_factor(
    *, total_steps: int, warmup_steps: int, schedule: str
) -> Callable[[int], float]:
    """The learning-rate multiplier of 0-based optimiser step ``k`` (for ``LambdaLR``).

    Warm-up rises linearly to 1 over ``warmup_steps`` (``(k + 1) / warmup_steps``, so the
    first step already moves); then ``cosine`` decays as ``(1 + cos(pi * p)) / 2``,
    ``linear`` as ``1 - p`` and ``constant`` stays at 1, with ``p`` the share of the
    post-warm-up steps done.
    """

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        progress = (k - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor
