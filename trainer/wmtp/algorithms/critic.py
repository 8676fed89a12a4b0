"""critic-wmtp: a value head on the trunk scores how much each token moves the sequence's expected reward.

Stage 1 fits V(h_t) to GAE returns of the reward model's sequence reward; stage 2 weights head k at t by
the TD delta of the token it predicts, δ_{t+k+1} = V_{t+k+1} − λ_d·V_{t+k}, softmaxed over the heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from wmtp import contract
from wmtp.algorithms.base import Algorithm
from wmtp.algorithms.loss import IGNORE_INDEX, align_to_heads, normalize_weights
from wmtp.config import CriticSection, LossSection

if TYPE_CHECKING:
    from wmtp.config import Recipe
    from wmtp.data import Batch
    from wmtp.models import MTPModel


def valid_positions(labels: Tensor) -> Tensor:
    """[B,T] bool: the sequence's tokens, i.e. up to one past the last position with a next-token label.

    Padded rows end where their labels end; packed rows are valid everywhere.
    """
    length = labels.shape[1]
    index = torch.arange(length, device=labels.device)
    last_labelled = torch.where(labels[..., 0] != IGNORE_INDEX, index, -1).amax(dim=1)
    ends = (last_labelled + 2).clamp(1, length)
    return index < ends[:, None]


def place_rewards(sequence_rewards: Tensor, positions: Tensor) -> Tensor:
    """[B] sequence rewards → [B,T] with the reward on each row's last valid token and 0 elsewhere."""
    last = positions.sum(dim=1, keepdim=True) - 1
    rewards = torch.zeros(positions.shape, dtype=torch.float32, device=positions.device)
    return rewards.scatter(1, last, sequence_rewards.float().view(-1, 1))


def gae_returns(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over each row's valid prefix, with V = 0 after the last valid token: (advantages, returns) [B,T].

    A_t = Σ_{s≥t} (γλ)^{s−t} δ_s with δ_s = r_s + γ·V_{s+1} − V_s, written as one [T,T] matrix product instead
    of a T-step Python loop (thousands of tiny kernels per step at long sequence lengths).
    """
    values = torch.where(mask, values.float(), torch.zeros_like(values, dtype=torch.float32))
    next_values = torch.cat([values[:, 1:], values.new_zeros(values.shape[0], 1)], dim=1)
    deltas = torch.where(mask, rewards.float() + gamma * next_values - values, torch.zeros_like(values))
    index = torch.arange(values.shape[1], device=values.device)
    lag = index[None, :] - index[:, None]  # lag[t, s] = s − t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp_min(0).float(), 0.0)
    advantages = deltas @ discount.T
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def td_deltas(values: Tensor, mask: Tensor, discount_lambda: float) -> Tensor:
    """δ_t = V_t − λ_d·V_{t−1} with V_{−1} = 0; 0 at invalid positions."""
    previous = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
    deltas = values - discount_lambda * previous
    return torch.where(mask, deltas, torch.zeros_like(deltas))


def head_softmax_weights(deltas: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """w_k(t) = softmax over the valid heads k of δ_{t+k+1}/T; [B,T,K], 0 where masked."""
    scores = align_to_heads(deltas, mask.shape[-1], offset=1) / temperature
    weights = torch.softmax(torch.where(mask, scores, torch.full_like(scores, -math.inf)), dim=-1)
    # Positions with no valid head softmax over nothing (NaN); they get weight 0 like any masked target.
    return torch.where(mask, weights, torch.zeros_like(weights))


def masked_mse(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    squared = torch.where(mask, (prediction - target) ** 2, torch.zeros_like(prediction))
    return squared.sum() / mask.sum().clamp_min(1)


class CriticWMTP(Algorithm):
    info: ClassVar[contract.AlgorithmInfo] = contract.CRITIC_WMTP

    def __init__(self, reward_model: nn.Module, hidden_size: int, critic: CriticSection, loss: LossSection) -> None:
        self.reward_model = reward_model
        self.value_head = nn.Linear(hidden_size, 1)
        self.critic = critic
        self.loss = loss

    @classmethod
    def build(cls, recipe: Recipe, frozen: Mapping[str, nn.Module], hidden_size: int) -> CriticWMTP:
        return cls(frozen["rm"], hidden_size, recipe.critic, recipe.loss)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}

    def _values_and_returns(self, batch: Batch, trunk_hidden: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(V [B,T] with grad into the value head only, returns [B,T], valid positions, sequence rewards)."""
        positions = valid_positions(batch.labels)
        with torch.no_grad():
            sequence_rewards = self.reward_model(batch.input_ids).logits.float().view(-1)
        # Detached input: the value loss trains the value head alone. The trunk is trained by the weighted MTP
        # objective only, so a critic still learning cannot pull the language model towards easy-to-value
        # features, and stage 2 matches stage 1, where the trunk is frozen.
        hidden = trunk_hidden.detach().to(self.value_head.weight.dtype)
        values = self.value_head(hidden).squeeze(-1).float()
        rewards = place_rewards(sequence_rewards, positions)
        _, returns = gae_returns(rewards, values.detach(), positions, self.critic.gamma, self.critic.gae_lambda)
        return values, returns, positions, sequence_rewards

    def pretrain(self, model: MTPModel, batches: Iterator[Batch], log: Callable[[int, dict[str, float]], None]) -> None:
        """Fit the value head alone to GAE returns for `critic.pretrain_steps` steps; the trunk stays frozen."""
        steps = self.critic.pretrain_steps
        optimizer = torch.optim.AdamW(self.value_head.parameters(), lr=self.critic.pretrain_lr)
        for step, batch in zip(range(1, steps + 1), batches, strict=False):
            with torch.no_grad():
                trunk_hidden = model(batch.input_ids)[0]
            values, returns, positions, rewards = self._values_and_returns(batch, trunk_hidden)
            value_loss = masked_mse(values, returns, positions)
            optimizer.zero_grad(set_to_none=True)
            # Distributed, the value head is an FSDP module (sharded or replicated) whose backward averages its
            # gradients over the ranks; all ranks start from the same head (same seed, checked when sharding).
            value_loss.backward()
            optimizer.step()
            log(step, {"value_loss": float(value_loss.detach()), "reward_mean": float(rewards.mean())})

    def weights(
        self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]
    ) -> tuple[Tensor, Tensor | None, dict[str, float]]:
        values, returns, positions, rewards = self._values_and_returns(batch, heads[0])
        value_loss = masked_mse(values, returns, positions)
        with torch.no_grad():
            deltas = td_deltas(values, positions, self.critic.discount_lambda)
            raw = head_softmax_weights(deltas, mask, self.loss.temperature)
            weights = normalize_weights(raw, mask, self.loss.epsilon, self.loss.max_weight)
        metrics = {
            "value_loss": float(value_loss.detach()),
            "reward_mean": float(rewards.mean()),
            "value_mean": float(values.detach()[positions].mean()),
        }
        return weights, self.critic.value_coef * value_loss, metrics
