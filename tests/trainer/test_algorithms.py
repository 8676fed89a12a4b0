"""The weighted MTP loss and the three weighting algorithms, on tiny fakes and hand-computed tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from wmtp.algorithms import (
    BaselineMTP,
    CriticWMTP,
    Rho1WMTP,
    build_algorithm,
    compute_loss,
    head_cross_entropy,
    normalize_weights,
    weighted_mtp_loss,
)
from wmtp.algorithms.critic import gae_returns, head_softmax_weights, masked_mse, td_deltas, valid_positions
from wmtp.algorithms.loss import align_to_heads
from wmtp.algorithms.rho1 import excess_loss, reference_ce, softmax_weights, topk_weights
from wmtp.config import Recipe, parse_recipe

VOCAB, HIDDEN, HEADS = 11, 8, 3


@dataclass
class Batch:
    input_ids: Tensor
    labels: Tensor


class FakeMTP(nn.Module):
    """Embedding trunk, one linear per head, a shared unembedding that counts its calls."""

    def __init__(self, n_heads: int = HEADS) -> None:
        super().__init__()
        self.n_heads, self.hidden_size, self.vocab_size = n_heads, HIDDEN, VOCAB
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.extra_heads = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(n_heads - 1))
        self.out = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.unembed_calls = 0

    def forward(self, input_ids: Tensor) -> list[Tensor]:
        trunk = self.embed(input_ids)
        return [trunk] + [torch.tanh(head(trunk)) for head in self.extra_heads]

    def unembed(self, hidden: Tensor) -> Tensor:
        self.unembed_calls += 1
        return self.out(hidden)


class FixedLogits(nn.Module):
    """A frozen HF-like model whose output `.logits` is a given tensor."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", logits)

    def forward(self, input_ids: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.fixed)


class TokenSumReward(nn.Module):
    """Sequence reward = mean token id / VOCAB, a learnable function of the tokens."""

    def forward(self, input_ids: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=(input_ids.float().mean(dim=1, keepdim=True) / VOCAB))


def make_labels(input_ids: Tensor, n_heads: int, lengths: list[int] | None = None) -> Tensor:
    """labels[b,t,k] = input_ids[b,t+k+1] inside the row's length, else -100 (the data loader's contract)."""
    batch, length = input_ids.shape
    labels = torch.full((batch, length, n_heads), -100, dtype=torch.long)
    for b in range(batch):
        row_length = length if lengths is None else lengths[b]
        for t in range(row_length):
            for k in range(n_heads):
                if t + k + 1 < row_length:
                    labels[b, t, k] = input_ids[b, t + k + 1]
    return labels


def make_recipe(algo: str, **sections: dict) -> Recipe:
    return parse_recipe(
        {"run": {"name": "t"}, "train": {"algo": algo}, "data": {"sources": [{"name": "mbpp"}]}, **sections}
    )


def random_batch(lengths: list[int], length: int = 7, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (len(lengths), length), generator=generator)
    return Batch(input_ids, make_labels(input_ids, HEADS, lengths))


# ----------------------------------------------------------------------------- shared loss


def test_head_cross_entropy_scores_head_k_at_t_against_token_t_plus_k_plus_1() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 5])
    heads = model(batch.input_ids)
    ce, mask = head_cross_entropy(model, heads, batch.labels)

    for b, row_length in enumerate([7, 5]):
        for t in range(7):
            for k in range(HEADS):
                if t + k + 1 < row_length:
                    log_probs = F.log_softmax(model.out(heads[k][b, t]), dim=-1)
                    expected = -log_probs[batch.input_ids[b, t + k + 1]]
                    assert mask[b, t, k]
                    assert ce[b, t, k].item() == pytest.approx(expected.item(), rel=1e-5)
                else:
                    assert not mask[b, t, k]
                    assert ce[b, t, k].item() == 0.0


def test_head_cross_entropy_matches_full_logits_and_recomputes_one_head_at_a_time() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 4])
    heads = model(batch.input_ids)
    saved_shapes: list[tuple[int, ...]] = []

    def pack(tensor: Tensor) -> Tensor:
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ce, mask = head_cross_entropy(model, heads, batch.labels)
    # Nothing vocabulary-sized outlives the forward: the checkpoints keep only hidden states and CEs.
    assert all(VOCAB not in shape for shape in saved_shapes)
    assert model.unembed_calls == HEADS
    weighted_mtp_loss(ce, mask, torch.ones_like(ce)).backward()
    assert model.unembed_calls == 2 * HEADS  # backward recomputed each head's logits
    checkpointed_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    logits = torch.stack([model.out(h) for h in model(batch.input_ids)], dim=2)  # [B,T,K,V]
    naive = F.cross_entropy(logits.flatten(0, 2), batch.labels.flatten(), ignore_index=-100, reduction="none")
    torch.testing.assert_close(ce, naive.view_as(ce))
    (naive.sum() / mask.sum()).backward()
    for checkpointed, param in zip(checkpointed_grads, model.parameters(), strict=True):
        torch.testing.assert_close(checkpointed, param.grad)


def test_head_cross_entropy_backward_finishes_each_head_before_recomputing_the_next() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 7])
    heads = [hidden.detach().requires_grad_() for hidden in model(batch.input_ids)]
    events: list[str] = []
    model.unembed = lambda hidden: events.append("logits") or model.out(hidden)
    ce, mask = head_cross_entropy(model, heads, batch.labels)
    for k, hidden in enumerate(heads):
        hidden.register_hook(lambda grad, k=k: events.append(f"grad{k}"))

    events.clear()
    weighted_mtp_loss(ce, mask, torch.ones_like(ce)).backward()
    # Each head's logits are recomputed and consumed before the next head's exist.
    assert events == ["logits", "grad2", "logits", "grad1", "logits", "grad0"]


def test_weighted_loss_gradient_is_w_m_over_mask_sum_and_weights_get_none() -> None:
    ce = torch.tensor([[[1.0, 2.0], [3.0, 1e9]]], requires_grad=True)
    mask = torch.tensor([[[True, True], [True, False]]])
    source = torch.tensor([[[0.5, 1.0], [2.0, 7.0]]], requires_grad=True)
    loss = weighted_mtp_loss(ce, mask, source * 1.0)

    # The masked 1e9 counts for nothing.
    assert loss.item() == pytest.approx((0.5 * 1 + 1.0 * 2 + 2.0 * 3) / 3)
    loss.backward()
    torch.testing.assert_close(ce.grad, torch.tensor([[[0.5, 1.0], [2.0, 0.0]]]) / 3)
    assert source.grad is None


def test_normalize_weights_clips_at_the_scale_that_makes_the_mean_one() -> None:
    weights = torch.tensor([1.0, 2.0, 3.0, 10.0])
    mask = torch.tensor([True, True, True, False])
    # c = 0.6: [0.6, 1.2, 1.8] clipped to [0.6, 1.2] is [0.6, 1.2, 1.2], of mean 1; the masked 10 counts for nothing.
    expected = torch.tensor([0.6, 1.2, 1.2, 0.0])
    torch.testing.assert_close(normalize_weights(weights, mask, epsilon=0.6, max_weight=1.2), expected)
    with pytest.raises(ValueError, match="epsilon ≤ 1 ≤ max_weight"):
        normalize_weights(weights, mask, epsilon=0.05, max_weight=0.9)


WEIGHT_INPUTS = st.lists(
    st.tuples(st.floats(min_value=0, max_value=1e6) | st.just(0.0) | st.floats(min_value=1e-30, max_value=1e-20),
              st.booleans()),
    min_size=1, max_size=64,
)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@example(inputs=[(2.225073858507e-311, True)], epsilon=0.0, max_weight=2.0, logits=False)  # a subnormal largest weight
@example(inputs=[(0.0, True), (0.0, True), (379.0, True)], epsilon=0.0, max_weight=3.0, logits=True)  # the max alone
@given(
    inputs=WEIGHT_INPUTS,
    epsilon=st.floats(min_value=0, max_value=1),
    max_weight=st.floats(min_value=1, max_value=20),
    logits=st.booleans(),
)
def test_normalized_weights_keep_the_documented_bounds_mean_and_order(
    inputs: list[tuple[float, bool]], epsilon: float, max_weight: float, logits: bool
) -> None:
    x = torch.tensor([value for value, _ in inputs], dtype=torch.float64)
    if logits:  # softmax weights, as rho1-wmtp's weighted mode and critic-wmtp make them: many orders apart
        x = torch.softmax(x.clamp(max=1e3) / 10, dim=0)
    mask = torch.tensor([valid for _, valid in inputs])
    w = normalize_weights(x, mask, epsilon, max_weight).double()
    valid, xv = w[mask], x[mask]
    if len(xv):
        xv = torch.where(xv < 1e-300 * xv.max(), 0.0, xv)  # the documented floor, relative to the largest

    assert (w[~mask] == 0).all()
    if not bool((xv > 0).any()):
        assert (valid == 1).all()
        return
    tolerance = 1e-6 * max_weight
    assert (valid >= epsilon - tolerance).all() and (valid <= max_weight + tolerance).all()
    reachable = (int((xv > 0).sum()) * max_weight + int((xv == 0).sum()) * epsilon) / len(xv)
    if reachable >= 1 + 1e-6:
        assert abs(float(valid.mean()) - 1) < 1e-5
    elif reachable <= 1 - 1e-6:  # too few positive inputs: they all get max_weight
        assert torch.allclose(valid[xv > 0], torch.full_like(valid[xv > 0], max_weight), rtol=1e-6)
    order = torch.argsort(xv, stable=True)
    assert (valid[order].diff() >= -tolerance).all()


def test_align_to_heads_shifts_position_values_by_k_plus_offset() -> None:
    values = torch.tensor([[10.0, 20.0, 30.0]])
    expected = torch.tensor([[[20.0, 30.0], [30.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(align_to_heads(values, n_heads=2, offset=1), expected)


def test_compute_loss_baseline_is_mean_valid_ce_with_per_head_metrics() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 3])
    loss, metrics = compute_loss(model, BaselineMTP(), batch)

    ce, mask = head_cross_entropy(model, model(batch.input_ids), batch.labels)
    assert loss.item() == pytest.approx((ce.sum() / mask.sum()).item(), rel=1e-6)
    assert metrics["loss"] == pytest.approx(loss.item())
    for k in range(HEADS):
        assert metrics[f"ce_head{k}"] == pytest.approx((ce[..., k].sum() / mask[..., k].sum()).item(), rel=1e-5)
    assert metrics["weight_mean"] == metrics["weight_min"] == metrics["weight_max"] == 1.0


# ----------------------------------------------------------------------------- rho1


def test_excess_loss_subtracts_reference_ce_of_the_same_target_token() -> None:
    ce = torch.zeros(1, 3, 2)
    mask = torch.tensor([[[True, True], [True, False], [False, False]]])
    ref_ce = torch.tensor([[10.0, 20.0, 30.0]])  # at t' the reference predicts token t'+1
    expected = -torch.tensor([[[10.0, 20.0], [20.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(excess_loss(ce, ref_ce, mask), expected)


def test_reference_ce_is_float32_next_token_ce_and_zero_where_ignored() -> None:
    logits = torch.randn(2, 4, VOCAB, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    ref = reference_ce(logits, labels)
    expected = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(2, 4)
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref, expected)


@pytest.mark.parametrize(
    ("k_percent", "expected"),
    [
        (0.5, [[1, 0, 1], [1, 0, 0]]),  # ceil(0.5·5) = 3: Δ 9, 7 and the first of the tied 5s
        (0.2, [[1, 0, 0], [0, 0, 0]]),
        (1.0, [[1, 1, 1], [1, 1, 0]]),
    ],
)
def test_topk_weights_select_the_largest_valid_excess_losses(k_percent: float, expected: list) -> None:
    delta = torch.tensor([[9.0, 1.0, 5.0], [7.0, 5.0, 100.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # the masked 100 is never chosen
    torch.testing.assert_close(topk_weights(delta, mask, k_percent), torch.tensor(expected, dtype=torch.float32))


def test_topk_keeps_exactly_ceil_of_the_fraction_despite_float_rounding() -> None:
    delta, mask = torch.arange(100.0), torch.ones(100, dtype=torch.bool)
    assert topk_weights(delta, mask, 0.55).sum().item() == 55  # 0.55·100 is 55.00000000000001 in floats


def test_topk_breaks_ties_by_position() -> None:
    delta, mask = torch.zeros(4, 25), torch.ones(4, 25, dtype=torch.bool)
    expected = torch.zeros(100)
    expected[:30] = 1.0
    torch.testing.assert_close(topk_weights(delta, mask, 0.3), expected.view(4, 25))


def test_softmax_weights_are_a_softmax_over_valid_targets_only() -> None:
    delta = torch.tensor([0.0, math.log(2.0), math.log(4.0), 50.0])
    mask = torch.tensor([True, True, True, False])
    torch.testing.assert_close(softmax_weights(delta, mask, 1.0), torch.tensor([1.0, 2.0, 4.0, 0.0]) / 7)
    torch.testing.assert_close(
        softmax_weights(delta, mask, 2.0),
        torch.tensor([1.0, math.sqrt(2.0), 2.0, 0.0]) / (3 + math.sqrt(2.0)),
    )


def _rho1_alignment_case() -> tuple[Batch, Tensor, Tensor, FixedLogits]:
    # One row of 4 tokens, 2 heads. The reference is unsure at positions 0 and 2 (CE = ln V) and sure at
    # position 1 (CE ≈ 0), where it predicts token 2: the token head 1 predicts at t=0.
    input_ids = torch.tensor([[0, 1, 2, 3]])
    labels = make_labels(input_ids, 2)
    ref_logits = torch.zeros(1, 4, VOCAB)
    ref_logits[0, 1, 2] = 100.0
    ce = torch.zeros(1, 4, 2)
    ce[0, 0, 1], ce[0, 1, 1] = 2.0, 1.5
    return Batch(input_ids, labels), ce, labels != -100, FixedLogits(ref_logits)


def test_rho1_topk_uses_reference_ce_at_t_plus_k() -> None:
    batch, ce, mask, ref = _rho1_alignment_case()
    weights, extra, _ = Rho1WMTP(ref, "topk", k_percent=0.2).weights(batch, ce, mask, [])
    # Δ at t+k: head 1 at t=0 is 2 − 0 = 2, head 1 at t=1 is 1.5 − ln V < 0. Subtracting the reference CE at t
    # instead would rank them 2 − ln V < 1.5 − 0 and keep head 1 at t=1.
    expected = torch.zeros(1, 4, 2)
    expected[0, 0, 1] = 1.0
    torch.testing.assert_close(weights, expected)
    assert extra is None


def test_rho1_weighted_mode_is_normalised_softmax_of_excess_loss() -> None:
    batch, ce, mask, ref = _rho1_alignment_case()
    algorithm = Rho1WMTP(ref, "weighted", temperature=0.5, epsilon=0.05, max_weight=3.0)
    weights, _, _ = algorithm.weights(batch, ce, mask, [])
    ref_ce = reference_ce(ref(batch.input_ids).logits, batch.labels[..., 0])
    delta = excess_loss(ce, ref_ce, mask)
    expected = normalize_weights(softmax_weights(delta, mask, 0.5), mask, 0.05, 3.0)
    torch.testing.assert_close(weights, expected)
    assert weights[mask].mean().item() == pytest.approx(1.0)
    assert weights[0, 0, 1] > weights[0, 1, 0]  # larger Δ, larger weight


# ----------------------------------------------------------------------------- critic


def test_gae_returns_match_a_hand_computed_example_and_ignore_padding() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 0.5, 9.0]])  # the padded 9 must not leak into position 2
    mask = torch.tensor([[True, True, True, False]])
    # γ = λ = 0.5. δ2 = 1 − 0.5 = 0.5; δ1 = 0.5·0.5 − 0.25 = 0; δ0 = 0.5·0.25 − 0.5 = −0.375.
    # A2 = 0.5; A1 = 0 + 0.25·0.5 = 0.125; A0 = −0.375 + 0.25·0.125 = −0.34375.
    advantages, returns = gae_returns(rewards, values, mask, gamma=0.5, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-0.34375, 0.125, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.15625, 0.375, 1.0, 0.0]]))


def test_td_deltas_discount_the_previous_value() -> None:
    values = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(td_deltas(values, mask, 0.5), torch.tensor([[1.0, 1.5, 3.0, 0.0]]))


def test_critic_head_weights_softmax_the_td_delta_of_each_predicted_token() -> None:
    deltas = torch.tensor([[0.0, 0.0, math.log(3.0), 0.0]])
    mask = make_labels(torch.zeros(1, 4, dtype=torch.long), 2) != -100
    # t=0: heads see δ1, δ2 → [1, 3]/4; t=1: δ2, δ3 → [3, 1]/4; t=2: only head 0 is valid; t=3: none.
    expected = torch.tensor([[[0.25, 0.75], [0.75, 0.25], [1.0, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(head_softmax_weights(deltas, mask, 1.0), expected)


def test_valid_positions_end_one_past_the_last_label_and_cover_packed_rows() -> None:
    input_ids = torch.zeros(2, 5, dtype=torch.long)
    labels = make_labels(input_ids, 2, lengths=[5, 3])
    expected = torch.tensor([[True] * 5, [True, True, True, False, False]])
    torch.testing.assert_close(valid_positions(labels), expected)


def _critic(**critic: float) -> CriticWMTP:
    recipe = make_recipe("critic-wmtp", critic=critic)
    return build_algorithm(recipe, {"rm": TokenSumReward()}, HIDDEN)


def test_critic_weights_and_value_loss_train_only_the_value_head() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 5])
    algorithm = _critic(value_coef=0.5)
    heads = model(batch.input_ids)
    ce, mask = head_cross_entropy(model, heads, batch.labels)
    weights, extra, metrics = algorithm.weights(batch, ce.detach(), mask, heads)

    assert not weights.requires_grad
    assert weights[mask].mean().item() == pytest.approx(1.0)
    assert (weights[~mask] == 0).all()
    assert extra.item() == pytest.approx(0.5 * metrics["value_loss"])
    extra.backward()
    assert all(p.grad is None for p in model.parameters())
    assert algorithm.value_head.weight.grad is not None


def test_compute_loss_adds_the_critic_value_loss_to_the_weighted_mtp_loss() -> None:
    torch.manual_seed(0)
    model, batch = FakeMTP(), random_batch([7, 6])
    loss, metrics = compute_loss(model, _critic(value_coef=0.25), batch)
    assert loss.item() == pytest.approx(metrics["mtp_loss"] + 0.25 * metrics["value_loss"], rel=1e-6)
    assert metrics["weight_mean"] == pytest.approx(1.0)


def test_critic_pretrain_lowers_the_value_mse_and_leaves_the_trunk_alone() -> None:
    torch.manual_seed(0)
    model = FakeMTP()
    batches = [random_batch([7, 7, 5, 6], seed=seed) for seed in range(4)]
    algorithm = _critic(pretrain_lr=0.05, gamma=1.0, gae_lambda=1.0, pretrain_steps=60)
    trunk_before = [p.detach().clone() for p in model.parameters()]

    def value_mse() -> float:
        with torch.no_grad():
            losses = [algorithm._values_and_returns(b, model(b.input_ids)[0]) for b in batches]
            return sum(masked_mse(v, r, p).item() for v, r, p, _ in losses) / len(batches)

    before = value_mse()
    logged: list[int] = []
    algorithm.pretrain(model, iter(batches * 20), log=lambda step, metrics: logged.append(step))
    assert value_mse() < 0.5 * before
    assert logged == list(range(1, 61))
    for before_param, param in zip(trunk_before, model.parameters(), strict=True):
        torch.testing.assert_close(before_param, param)


# ----------------------------------------------------------------------------- registry


def test_build_algorithm_picks_the_class_named_by_the_recipe() -> None:
    assert isinstance(build_algorithm(make_recipe("baseline-mtp"), {}, HIDDEN), BaselineMTP)
    rho1 = build_algorithm(
        make_recipe("rho1-wmtp", rho1={"selection_mode": "weighted"}), {"ref": nn.Identity()}, HIDDEN
    )
    assert isinstance(rho1, Rho1WMTP) and rho1.selection_mode == "weighted"
    critic = _critic()
    assert set(critic.trainable_modules()) == {"value_head"}
    assert BaselineMTP().trainable_modules() == {}


@pytest.mark.parametrize(("algo", "role"), [("rho1-wmtp", "ref"), ("critic-wmtp", "rm")])
def test_build_algorithm_names_the_missing_frozen_model(algo: str, role: str) -> None:
    with pytest.raises(ValueError, match=f"needs the frozen model\\(s\\) {role}"):
        build_algorithm(make_recipe(algo), {}, HIDDEN)
