"""rho1-wmtp (Rho-1, Lin et al. 2024): train hardest on the tokens the model finds harder than a reference.

The excess loss Δ_k(t) = CE_k(t) − CE_ref(t+k) compares head k at t with the reference model's next-token
CE of the same target token (token t+k+1, which the reference predicts at position t+k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wmtp import contract
from wmtp.algorithms.base import Algorithm
from wmtp.algorithms.loss import IGNORE_INDEX, align_to_heads, normalize_weights

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.data import Batch

# Tokens per float32 slice of the reference logits: bounds the float32 copy to ~130 MB at a 32k vocabulary.
_CHUNK_TOKENS = 1024


def reference_ce(logits: Tensor, next_labels: Tensor) -> Tensor:
    """The reference's next-token CE [B,T] in float32 (0 where the label is ignored), slice by slice."""
    flat_logits, flat_labels = logits.flatten(0, 1), next_labels.flatten()
    ce = [
        F.cross_entropy(chunk.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
        for chunk, target in zip(flat_logits.split(_CHUNK_TOKENS), flat_labels.split(_CHUNK_TOKENS), strict=True)
    ]
    return torch.cat(ce).view_as(next_labels)


def excess_loss(ce: Tensor, ref_ce: Tensor, mask: Tensor) -> Tensor:
    """Δ [B,T,K] = CE_k(t) − CE_ref(t+k) from per-head CE [B,T,K] and reference CE [B,T]; 0 where masked."""
    delta = ce - align_to_heads(ref_ce, ce.shape[-1])
    return torch.where(mask, delta, torch.zeros_like(delta))


def topk_weights(delta: Tensor, mask: Tensor, k_percent: float) -> Tensor:
    """1 for the ceil(k_percent·#valid) valid targets with the largest Δ, 0 elsewhere.

    A stable sort breaks ties by flat position, so the same batch always selects the same set.
    """
    n_valid = int(mask.sum())
    # The tolerance keeps float products such as 0.7·10 = 7.000000000000001 from rounding up a whole target.
    n_keep = min(n_valid, max(1, math.ceil(k_percent * n_valid - 1e-6))) if n_valid else 0
    scores = torch.where(mask, delta, torch.full_like(delta, -math.inf)).flatten()
    order = torch.sort(scores, descending=True, stable=True).indices
    weights = torch.zeros_like(scores)
    weights[order[:n_keep]] = 1.0
    return weights.view_as(delta)


def softmax_weights(delta: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """softmax(Δ/T) over all valid targets of the batch; 0 where masked (all 0 if nothing is valid)."""
    if not mask.any():
        return torch.zeros_like(delta)
    scores = torch.where(mask, delta / temperature, torch.full_like(delta, -math.inf))
    return torch.softmax(scores.flatten(), dim=0).view_as(delta)


class Rho1WMTP(Algorithm):
    info: ClassVar[contract.AlgorithmInfo] = contract.RHO1_WMTP

    def __init__(
        self,
        ref_model: nn.Module,
        selection_mode: Literal["topk", "weighted"] = "topk",
        k_percent: float = 0.6,
        temperature: float = 1.0,
        epsilon: float = 0.05,
        max_weight: float = 3.0,
    ) -> None:
        self.ref_model = ref_model
        self.selection_mode = selection_mode
        self.k_percent = k_percent
        self.temperature = temperature
        self.epsilon = epsilon
        self.max_weight = max_weight

    @classmethod
    def build(cls, recipe: Recipe, frozen: Mapping[str, nn.Module], hidden_size: int) -> Rho1WMTP:
        return cls(
            frozen["ref"],
            selection_mode=recipe.rho1.selection_mode,
            k_percent=recipe.rho1.k_percent,
            temperature=recipe.loss.temperature,
            epsilon=recipe.loss.epsilon,
            max_weight=recipe.loss.max_weight,
        )

    def weights(
        self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        with torch.no_grad():
            ref_ce = reference_ce(self.ref_model(batch.input_ids).logits, batch.labels[..., 0])
            delta = excess_loss(ce.detach(), ref_ce, mask)
            if self.selection_mode == "topk":
                weights = topk_weights(delta, mask, self.k_percent)
            else:
                weights = normalize_weights(
                    softmax_weights(delta, mask, self.temperature), mask, self.epsilon, self.max_weight
                )
        valid = mask.sum().clamp_min(1)
        ref_mask = batch.labels[..., 0] != IGNORE_INDEX
        metrics = {
            "ref_ce": float(ref_ce.sum() / ref_mask.sum().clamp_min(1)),
            "excess_loss": float(delta.sum() / valid),
        }
        return weights, None, metrics
