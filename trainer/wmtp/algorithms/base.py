"""The one interface an algorithm implements: per-target weights for a batch (plus optional extras)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.data import Batch
    from wmtp.models import MTPModel


class Algorithm(ABC):
    """A weighting scheme for the shared weighted MTP loss; registered by `name` in `wmtp.algorithms`."""

    name: ClassVar[str]

    @classmethod
    def build(
        cls,
        recipe: Recipe,
        *,
        ref_model: nn.Module | None = None,
        reward_model: nn.Module | None = None,
        hidden_size: int | None = None,
    ) -> Algorithm:
        """Construct from a recipe; raise `ConfigError` naming whatever the algorithm needs but lacks."""
        return cls()

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts the trainer must optimise and checkpoint besides the model, under these constant keys."""
        return {}

    def pretrain(  # noqa: B027 - a deliberate no-op default: only some algorithms have a first stage
        self,
        model: MTPModel,
        batches: Iterator[Batch],
        steps: int,
        log: Callable[[int, dict[str, float]], None],
    ) -> None:
        """Stage 1, run once before MTP training starts (not again on resume)."""

    @abstractmethod
    def weights(
        self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        """(w [B,T,K] detached, 0 where masked; an extra loss term or None; metrics) for one micro-batch.

        `ce` arrives detached: weights are a function of the batch, never a path for gradients.
        """
