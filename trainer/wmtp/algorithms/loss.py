"""The weighted multi-token loss every algorithm shares (DESIGN.md §5).

    L = Σ_{t,k} w_k(t)·m_k(t)·CE_k(t) / Σ_{t,k} m_k(t)

Algorithms differ only in how they choose the weights w; everything here is algorithm-agnostic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from collections.abc import Callable

    from wmtp.models import MTPModel

IGNORE_INDEX = -100


def _unembed_cross_entropy(unembed: Callable[[Tensor], Tensor], hidden: Tensor, target: Tensor) -> Tensor:
    # float32 because bf16 log-softmax over a 32k+ vocabulary loses most of the signal in the small CEs.
    logits = unembed(hidden).float()
    ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view_as(target)


def head_cross_entropy(model: MTPModel, heads: list[Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head next-token CE: (ce [B,T,K] float32, 0 where masked; mask [B,T,K] bool).

    Each head's unembedding and CE run inside a non-reentrant checkpoint: autograd then keeps only the
    [B,T,D] hidden state and the [B,T] CE, and recomputes one head's [B,T,V] logits at a time in backward.
    Without it the saved log-softmax of all K heads, [B,T,K,V] in float32, dominates training memory.
    """
    if len(heads) != labels.shape[-1]:
        raise ValueError(f"model has {len(heads)} heads but labels have {labels.shape[-1]} targets per position")
    ce = torch.stack(
        [
            checkpoint(_unembed_cross_entropy, model.unembed, hidden, labels[..., k], use_reentrant=False)
            for k, hidden in enumerate(heads)
        ],
        dim=-1,
    )
    return ce, labels != IGNORE_INDEX


def weighted_mtp_loss(ce: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """Σ w·m·CE / Σ m. The weights are detached here so that no caller can train through them."""
    weighted = torch.where(mask, weights.detach() * ce, torch.zeros_like(ce))
    return weighted.sum() / mask.sum().clamp_min(1)


def normalize_weights(weights: Tensor, mask: Tensor, epsilon: float, max_weight: float) -> Tensor:
    """Scale to mean 1 over valid targets, clip to [epsilon, max_weight], rescale to mean 1; 0 where masked.

    The final rescale keeps the loss on the same scale as unweighted CE (so the learning rate transfers
    between algorithms), at the price of values slightly outside the clip range.
    """
    weights = weights.detach().float()
    valid = mask.sum().clamp_min(1)
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    weights = weights * valid / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)
    weights = torch.where(mask, weights.clamp(epsilon, max_weight), torch.zeros_like(weights))
    return weights * valid / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def align_to_heads(values: Tensor, n_heads: int, offset: int = 0) -> Tensor:
    """[B,T] per-position values → [B,T,K] with out[b,t,k] = values[b,t+k+offset], 0 past the end.

    Puts per-position quantities where head k at position t needs them, e.g. the reference CE at t+k (the
    same target token as head k) or the TD delta at t+k+1 (the token head k predicts).
    """
    batch, length = values.shape
    out = values.new_zeros(batch, length, n_heads)
    for k in range(n_heads):
        shift = k + offset
        if shift < length:
            out[:, : length - shift, k] = values[:, shift:]
    return out
