"""baseline-mtp: every valid target counts the same (w = 1), i.e. plain multi-token prediction."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from wmtp import contract
from wmtp.algorithms.base import Algorithm

if TYPE_CHECKING:
    from wmtp.data import Batch


class BaselineMTP(Algorithm):
    info: ClassVar[contract.AlgorithmInfo] = contract.BASELINE_MTP

    def weights(
        self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        return mask.to(ce.dtype), None, {}
