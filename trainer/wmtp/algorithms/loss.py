"""The weighted multi-token loss every algorithm shares (DESIGN.md §5).

    L = Σ_{t,k} w_k(t)·m_k(t)·CE_k(t) / Σ_{t,k} m_k(t)

Algorithms differ only in how they choose the weights w; everything here is algorithm-agnostic.
"""

from __future__ import annotations

import math
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


_BISECTIONS = 64  # halvings of the log-scale bracket (at most 700 wide): float64 has nothing more to give
_MAX_LOG_SCALE = 700.0  # exp() of it stays finite in float64
_NEGLIGIBLE = 1e-300  # of the largest weight: 1/_NEGLIGIBLE times max_weight is still below exp(_MAX_LOG_SCALE)


def normalize_weights(weights: Tensor, mask: Tensor, epsilon: float, max_weight: float) -> Tensor:
    """Weights proportional to `weights` as far as the bounds allow, with mean exactly 1 over valid targets.

    w = clip(c·x, epsilon, max_weight) on valid targets (0 where masked), with the one scale c > 0 that makes
    their mean 1: every valid weight lies in [epsilon, max_weight], their order is that of x, and the loss stays
    on the scale of unweighted CE (so the learning rate transfers between algorithms). The mean falls short of 1
    only when no c can reach it (too few positive x for max_weight): then every positive x weighs max_weight.
    An x below 1e-300 of the largest counts as 0, since no float64 scale lifts it.
    Inputs all 0 have no preference: every valid target weighs 1. Needs epsilon ≤ 1 ≤ max_weight.
    """
    if not 0 <= epsilon <= 1 <= max_weight:
        raise ValueError(f"weights of mean 1 need 0 ≤ epsilon ≤ 1 ≤ max_weight; got {epsilon} and {max_weight}")
    x = torch.where(mask, weights.detach().double().clamp_min(0), 0.0)
    n = mask.sum().clamp_min(1).double()
    # Scale-free, so divide by the largest first: a subnormal largest weight would otherwise need a scale past
    # float64's range. What is then below _NEGLIGIBLE no float64 scale could lift to a weight: it counts as 0.
    x = x / x.amax().clamp_min(torch.finfo(torch.float64).tiny)
    x = torch.where(x < _NEGLIGIBLE, 0.0, x)
    positive = mask & (x > 0)

    def mean_at(log_scale: Tensor) -> Tensor:
        return torch.where(mask, (x * log_scale.exp()).clamp(epsilon, max_weight), 0.0).sum() / n

    # The mean is continuous and non-decreasing in c. At c = 1 no weight exceeds 1, so the mean is at most 1;
    # at c = max_weight/min(positive x) it is the largest reachable. Bisect log c between the two, on the
    # device (no host synchronisation), since softmax weights span many orders of magnitude.
    log_x = torch.where(positive, x, 1.0).log()
    low = torch.zeros((), dtype=torch.float64, device=x.device)
    high = (math.log(max_weight) - torch.where(positive, log_x, torch.inf).amin()).clamp(low, _MAX_LOG_SCALE)
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        short = mean_at(middle) < 1
        low, high = torch.where(short, middle, low), torch.where(short, high, middle)
    # Exact on the final piece, where each target is clipped low, clipped high or free: mean 1 to rounding.
    scaled = x * high.exp()
    clipped_low, clipped_high = mask & (scaled <= epsilon), mask & (scaled >= max_weight)
    free_sum = torch.where(mask & ~clipped_low & ~clipped_high, x, 0.0).sum()
    exact = (n - clipped_high.sum() * max_weight - clipped_low.sum() * epsilon) / free_sum
    # Rounding can put `exact` outside the bracket (0 when the clipped-high targets alone reach mean 1, inf when
    # the free sum underflows); the bracket's ends are adjacent floats by now, so either is as good.
    scale = torch.where(free_sum > 0, exact.clamp(low.exp(), high.exp()), high.exp())
    out = torch.where(mask, (x * scale).clamp(epsilon, max_weight), 0.0)
    return torch.where(positive.any(), out, mask.double()).float()


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
