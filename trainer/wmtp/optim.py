"""The optimizer and its learning-rate schedule, built from the recipe's optim section."""

from __future__ import annotations

import math

import torch

from wmtp.config import OptimSection
from wmtp.conversion import Conversion


def build_optimizer(
    params: list[torch.nn.Parameter], optim: OptimSection, conversion: Conversion | None = None
) -> torch.optim.Optimizer:
    """AdamW with one group per (learning-rate scale, decayed or not); `conversion` gives pretrained
    parameters their scale of the learning rate."""
    # Decay matrices only: decaying norms and biases pulls them towards zero for no regularisation benefit.
    scale = conversion.lr_scale_of if conversion else (lambda _: 1.0)
    scales = sorted({scale(p) for p in params}, reverse=True) or [1.0]
    groups = [
        {"params": [p for p in params if p.requires_grad and (p.ndim >= 2) == decays and scale(p) == s],
         "weight_decay": optim.weight_decay if decays else 0.0, "lr": optim.lr * s}
        for s in scales for decays in (True, False)
    ]  # fmt: skip
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def build_scheduler(
    optimizer: torch.optim.Optimizer, optim: OptimSection, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
