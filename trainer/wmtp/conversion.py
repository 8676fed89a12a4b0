"""Converting a pretrained next-token model into a multi-token one without wrecking what it already knows.

Freshly built heads start far from useful, and their large early gradients flow into the trunk and the shared
unembedding: with a real 135M Llama as base, head 0's cross-entropy rose from 1.45 to 3.2 within 8 steps at lr
1e-4. Two recipe settings guard it. `train.head_warmup_steps` trains only the new parts (the extra heads and
the algorithm's own modules) for the first K optimizer steps; `optim.pretrained_lr_scale` gives the base
model's own parameters (embeddings, trunk, head 0, unembedding) that multiple of the learning rate throughout.

`train.train_only_extra_heads` holds the base for the whole run: the model's own predictions stay bit for bit
what they were, and the new heads learn to draft for it (self-speculative decoding). Its pretrained parameters
then require no gradient, so backward stops at the new heads: the trunk's backward and the unembedding's weight
gradient, most of a step, are never computed (SmolLM2-135M on a CPU: 1.8x the tokens/s, the same losses;
benchmarks/README.md). They stay in the optimizer either way, so a checkpoint of such a run resumes into full
training.
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

    def __init__(
        self,
        pretrained: Iterable[nn.Parameter],
        warmup_steps: int = 0,
        lr_scale: float = 1.0,
        whole_run: bool = False,
    ) -> None:
        self.pretrained = list(pretrained)
        self._ids = {id(p) for p in self.pretrained}
        self.warmup_steps, self.lr_scale, self.whole_run = warmup_steps, lr_scale, whole_run

    @classmethod
    def build(cls, model: MTPModel, recipe: Recipe) -> Conversion:
        """Call once the model is sharded: the parameters it holds then are the ones the optimizer sees."""
        train = recipe.train
        return cls(
            model.base.parameters(), train.head_warmup_steps, recipe.optim.pretrained_lr_scale,
            whole_run=train.train_only_extra_heads,
        )  # fmt: skip

    def lr_scale_of(self, param: nn.Parameter) -> float:
        return self.lr_scale if id(param) in self._ids else 1.0

    def maybe_freeze(self) -> None:
        """A heads-only run: the pretrained parameters stop requiring gradients. Call once the optimizer holds them
        (it leaves out parameters that require none, and a later full run resumes their state from it)."""
        if self.whole_run:
            for param in self.pretrained:
                param.requires_grad_(False)

    def hold(self, step: int) -> None:
        """Between backward and optimizer step `step` (0-based): during the warm-up (or the whole run), drop the
        pretrained parameters' gradients, so that neither clipping nor the optimizer sees them (AdamW leaves a
        parameter without a gradient, and its moments and weight decay, alone)."""
        if self.whole_run or step < self.warmup_steps:
            for param in self.pretrained:
                param.grad = None
