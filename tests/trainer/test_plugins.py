"""Adding an algorithm is one module and one registry line: this module is that module, and it trains."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import pytest
import torch
from torch import Tensor, nn

from wmtp.algorithms import Algorithm, register
from wmtp.config import ConfigError, load
from wmtp.contract import AlgorithmInfo
from wmtp.data import Batch
from wmtp.models import MTPModel
from wmtp.train import Trainer

pytestmark = pytest.mark.slow


class NextTokenOnly(Algorithm):
    """Weighs head 0 alone, asks for a reference model and has a pretraining stage, to prove all three reach it."""

    info: ClassVar[AlgorithmInfo] = AlgorithmInfo(
        "next-token-only", "trains the next-token head alone", frozen=("ref",), pretrain=True
    )

    def __init__(self, ref: nn.Module) -> None:
        self.ref = ref
        self.pretrained_on: list[Batch] = []

    @classmethod
    def build(cls, recipe: object, frozen: Mapping[str, nn.Module], hidden_size: int) -> NextTokenOnly:
        return cls(frozen["ref"])

    def pretrain(self, model: MTPModel, batches: Iterator[Batch], log: Callable[[int, dict[str, float]], None]) -> None:
        self.pretrained_on.append(next(batches))
        log(1, {"batches": 1.0})

    def weights(self, batch: Batch, ce: Tensor, mask: Tensor, heads: list[Tensor]) -> tuple[Tensor, None, dict]:
        weights = torch.zeros_like(ce)
        weights[..., 0] = 1.0
        return weights * mask, None, {}


register(NextTokenOnly)


def test_a_registered_algorithm_trains_without_any_change_to_the_trainer(run_files) -> None:
    config, recipe = load(*run_files("next-token-only", steps=4, **{"optim.weight_decay": 0.0}))
    trainer = Trainer(config, recipe)
    heads_before = [p.detach().clone() for p in trainer.model.extra_heads.parameters()]
    trunk_before = [p.detach().clone() for p in trainer.model.base.parameters()]

    summary = trainer.train()

    algorithm = trainer.algorithm
    assert isinstance(algorithm, NextTokenOnly) and summary["steps"] == 4
    assert len(algorithm.pretrained_on) == 1
    assert not any(p.requires_grad for p in algorithm.ref.parameters()) and not algorithm.ref.training
    # Weight 0 on heads 1..3 and no weight decay: the extra heads never move; the trunk does.
    assert all(torch.equal(a, b) for a, b in zip(heads_before, trainer.model.extra_heads.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(trunk_before, trainer.model.base.parameters(), strict=True))


def test_the_config_requires_the_models_a_registered_algorithm_declares(run_files) -> None:
    with pytest.raises(ConfigError, match=r"paths\.models\.ref: required by train\.algo=next-token-only"):
        load(*run_files("next-token-only", **{"paths.models.ref": None}))


def test_an_unregistered_algorithm_is_refused_with_the_known_ones(run_files) -> None:
    with pytest.raises(ConfigError, match=r"train\.algo: .*unknown algorithm 'no-such-algo'; known: baseline-mtp"):
        load(*run_files("no-such-algo"))
