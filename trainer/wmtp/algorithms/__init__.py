"""Weighting algorithms for multi-token prediction, behind one interface and one registry.

Adding an algorithm is one module and one line: subclass `Algorithm` with an `info` (its name, the frozen models
it needs by role, whether it pretrains) and `weights`, then `register(MyAlgorithm)`. The trainer loads what
`info` asks for and calls the interface; it never names an algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from wmtp import contract
from wmtp.algorithms.base import Algorithm
from wmtp.algorithms.baseline_mtp import BaselineMTP
from wmtp.algorithms.critic import CriticWMTP
from wmtp.algorithms.loss import head_cross_entropy, normalize_weights, weighted_mtp_loss
from wmtp.algorithms.rho1 import Rho1WMTP

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.data import Batch
    from wmtp.models import MTPModel

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "BaselineMTP",
    "CriticWMTP",
    "Rho1WMTP",
    "build_algorithm",
    "compute_loss",
    "head_cross_entropy",
    "normalize_weights",
    "register",
    "weighted_mtp_loss",
]

ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Make `cls` the algorithm called `cls.info.name`, for the trainer and for config validation."""
    contract.register_algorithm(cls.info)
    ALGORITHMS[cls.info.name] = cls
    return cls


register(BaselineMTP)
register(CriticWMTP)
register(Rho1WMTP)


def build_algorithm(recipe: Recipe, frozen: Mapping[str, nn.Module], hidden_size: int) -> Algorithm:
    """The algorithm named by `recipe.train.algo`, given the frozen models its `info` asks for by role."""
    cls = ALGORITHMS[recipe.train.algo]
    missing = [role for role in cls.info.frozen if role not in frozen]
    if missing:
        raise ValueError(f"{cls.info.name} needs the frozen model(s) {', '.join(missing)}; got {', '.join(frozen)}")
    return cls.build(recipe, frozen, hidden_size)


def compute_loss(model: MTPModel, algorithm: Algorithm, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """One micro-batch's training loss (weighted MTP loss + the algorithm's extra term) and its metrics."""
    heads = model(batch.input_ids)
    ce, mask = head_cross_entropy(model, heads, batch.labels)
    weights, extra, algorithm_metrics = algorithm.weights(batch, ce.detach(), mask, heads)
    mtp_loss = weighted_mtp_loss(ce, mask, weights)
    loss = mtp_loss if extra is None else mtp_loss + extra

    with torch.no_grad():
        head_tokens = mask.sum(dim=(0, 1)).clamp_min(1)
        head_ce = ce.sum(dim=(0, 1)) / head_tokens
        valid_weights = weights[mask].float()
        if valid_weights.numel() == 0:
            valid_weights = weights.new_zeros(1, dtype=torch.float32)
        stats = {
            "loss": loss.detach().float(),
            "mtp_loss": mtp_loss.detach().float(),
            **{f"ce_head{k}": value for k, value in enumerate(head_ce)},
            "weight_mean": valid_weights.mean(),
            "weight_std": valid_weights.std(correction=0),
            "weight_min": valid_weights.min(),
            "weight_max": valid_weights.max(),
        }
        # One device-to-host copy for all of them instead of a sync per metric.
        values = torch.stack(list(stats.values())).tolist()
    return loss, {**dict(zip(stats, values, strict=True)), **algorithm_metrics}
