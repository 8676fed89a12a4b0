"""The parts of a run, each made by one `build_*` function that returns it: the checkpoint store, the models with
the algorithm, the number of steps. `Trainer.__init__` calls them in order and keeps what they return; none of
them sets anything on anything else."""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from wmtp import contract
from wmtp.algorithms import Algorithm, build_algorithm
from wmtp.checkpoint import CheckpointStore
from wmtp.checkpoint.manager import MODEL
from wmtp.config import Config, Recipe, checkpoint_root
from wmtp.data import Data
from wmtp.distributed import Dist, load_weights, parallelize
from wmtp.models import FROZEN_LOADERS, MTPModel, check_vocabularies, load_mtp_model
from wmtp.storage import Storage


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(backend: str) -> torch.device:
    if backend == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("devices.compute_backend=cuda but no CUDA device is visible; use cpu or auto")
    return torch.device(backend)


def build_store(config: Config, recipe: Recipe, storage: Storage, dist: Dist) -> CheckpointStore:
    """The run's checkpoint store; one that cannot be written fails now, not at the first save."""
    store = CheckpointStore(checkpoint_root(config, recipe), storage)
    if dist.is_main:
        storage.probe(store.root)
    return store


@dataclass(frozen=True)
class Models:
    """The trained model, its tokenizer, and the algorithm with its frozen models and trainable modules, on the
    device and parallelized."""

    model: MTPModel
    tokenizer: PreTrainedTokenizerBase
    algorithm: Algorithm
    trainable: dict[str, nn.Module]  # the algorithm's

    def modules(self) -> nn.ModuleDict:
        """One module tree for the optimizer and the checkpoint: the model and the algorithm's trainable parts."""
        return nn.ModuleDict({MODEL: self.model, **self.trainable})


def build_models(config: Config, recipe: Recipe, storage: Storage, dist: Dist) -> Models:
    """The model, the frozen models the algorithm asks for and the algorithm. Distributed, every rank builds each
    model empty (on the meta device) and rank 0 alone reads its weights, which `load_weights` scatters into the
    shards: no rank but 0 ever holds a whole model, and rank 0 one at a time."""
    models, heads, empty = config.paths.models, (recipe.loss.n_heads, recipe.model.head_type), dist.enabled
    check_vocabularies(models, contract.algorithm(recipe.train.algo).frozen, storage)
    seed_everything(config.seed)
    model, tokenizer = load_mtp_model(models.base, storage, *heads, empty=empty)
    readers = {model: lambda: load_mtp_model(models.base, storage, *heads)[0].state_dict()}
    frozen = {}
    for role in contract.algorithm(recipe.train.algo).frozen:
        load = functools.partial(FROZEN_LOADERS[role], getattr(models, role), storage)
        frozen[role] = load(empty=empty)
        readers[frozen[role]] = lambda load=load: load().state_dict()
    # The algorithm's own modules start from the same numbers on every rank, however the models were built.
    seed_everything(config.seed)
    algorithm = build_algorithm(recipe, frozen, model.hidden_size)
    trainable = algorithm.trainable_modules()
    for module in [*trainable.values(), *([] if empty else readers)]:
        module.to(dist.device)
    # Before the optimizer is built: sharding turns the parameters into DTensors.
    parallelize(model, list(trainable.values()), list(frozen.values()), config.devices, dist)
    for module, read in readers.items() if empty else ():
        load_weights(module, read, dist)
    return Models(model, tokenizer, algorithm, trainable)


def count_steps(recipe: Recipe, data: Data) -> int:
    """Optimizer steps of the run: max_steps, else num_epochs passes over the training split."""
    train = recipe.train
    return train.max_steps or train.num_epochs * max(1, len(data.train) // train.grad_accum)
