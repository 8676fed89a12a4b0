"""Converting a pretrained next-token model into a multi-token one without wrecking what it already knows.

Freshly built heads start far from useful, and their large early gradients flow into the trunk and the shared
unembedding: with a real 135M Llama as base, head 0's cross-entropy rose from 1.45 to 3.2 within 8 steps at lr
1e-4. Two recipe settings guard it. `train.head_warmup_steps` trains only the new parts (the extra heads and
the algorithm's own modules) for the first K optimizer steps; `optim.pretrained_lr_scale` gives the base
model's own parameters (embeddings, trunk, head 0, unembedding) that multiple of the learning rate throughout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.models import MTPModel


class Conversion:
    """Which parameters are pretrained, the learning-rate multiplier they take, and the steps they sit out."""

    def __init__(self, pretrained: Iterable[nn.Parameter], warmup_steps: int = 0, lr_scale: float = 1.0) -> None:
        self.pretrained = list(pretrained)
        self._ids = {id(p) for p in self.pretrained}
        self.warmup_steps, self.lr_scale = warmup_steps, lr_scale

    @classmethod
    def build(cls, model: MTPModel, recipe: Recipe) -> Conversion:
        """Call once the model is sharded: the parameters it holds then are the ones the optimizer sees."""
        return cls(model.base.parameters(), recipe.train.head_warmup_steps, recipe.optim.pretrained_lr_scale)

    def lr_scale_of(self, param: nn.Parameter) -> float:
        return self.lr_scale if id(param) in self._ids else 1.0

    def hold(self, step: int) -> None:
        """Between backward and optimizer step `step` (0-based): during the warm-up, drop the pretrained
        parameters' gradients, so that neither clipping nor the optimizer sees them (AdamW leaves a parameter
        without a gradient, and its moments and weight decay, alone)."""
        if step < self.warmup_steps:
            for param in self.pretrained:
                param.grad = None
