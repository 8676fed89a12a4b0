"""The one interface an algorithm implements: per-target weights for a batch (plus optional extras)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor, nn

from wmtp.contract import AlgorithmInfo

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.data import Batch
    from wmtp.models import MTPModel


class Algorithm(ABC):
    """A weighting scheme for the shared weighted MTP loss, registered in `wmtp.algorithms`.

    `info` declares what the trainer must provide: the frozen models it needs, by role, which arrive in `build`
    already loaded, frozen and on the device, and whether `pretrain` has work to do before training.
    """

    info: ClassVar[AlgorithmInfo]

    @classmethod
    def build(cls, recipe: Recipe, frozen: Mapping[str, nn.Module], hidden_size: int) -> Algorithm:
        """Construct from the recipe, the frozen models of `info.frozen` by role and the trunk's hidden size."""
        return cls()

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parts the trainer must optimise and checkpoint besides the model, under these constant keys."""
        return {}

    def pretrain(  # noqa: B027 - a deliberate no-op default: only some algorithms have a first stage
        self, model: MTPModel, batches: Iterator[Batch], log: Callable[[int, dict[str, float]], None]
    ) -> None:
        """The stage before multi-token training (`info.pretrain`), run once and not again on resume."""

    @abstractmethod
    def weights(
        self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        """(w [B,T,K] detached, 0 where masked; an extra loss term or None; metrics) for one micro-batch.

        `ce` arrives detached: weights are a function of the batch, never a path for gradients.
        """
