"""Examples as tokens: fixed-length rows (packed or padded), per-head labels, and batches served in a seeded
order that a checkpoint can resume exactly.

The order of global batches depends on the seed and the dataset only, never on the world size or the global
RNG, so a run resumed from a checkpoint (even on a different number of ranks) sees the batches it would have
seen without stopping.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wmtp.data.records import DataError, Example

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T, K] long; labels[b, t, k] = input_ids[b, t+k+1] or IGNORE_INDEX

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device))


@dataclass
class TokenBlocks:
    ids: torch.Tensor  # [N, max_length] long
    lengths: torch.Tensor  # [N] long: valid tokens per row; the rest is padding

    def __len__(self) -> int:
        return self.ids.shape[0]


# ----------------------------------------------------------------------------- tokens


def encode(examples: list[Example], tokenizer: Any) -> list[list[int]]:
    """Each example's tokens, ending with eos so that the model learns where a solution stops."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    # The tokenizer's own special tokens (a BOS for Llama-style models) are kept: the base model expects them.
    rows: list[list[int]] = tokenizer([e.text for e in examples])["input_ids"] if examples else []
    return [row if row and row[-1] == eos else [*row, eos] for row in rows]


def to_blocks(rows: list[list[int]], pad: int, max_length: int, pack: bool, drop_last: bool = True) -> TokenBlocks:
    """Rows of `max_length` tokens. pack: one stream cut into full rows (the ragged tail is dropped unless
    `drop_last` is False, then it is padded). Otherwise one example per row, truncated and right-padded."""
    if pack:
        stream = list(itertools.chain.from_iterable(rows))
        rows = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
        if drop_last and rows and len(rows[-1]) < max_length:
            rows.pop()
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:max_length]
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths[i] = len(row)
    return TokenBlocks(ids, lengths)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def tokenize(
    examples: list[Example], tokenizer: Any, max_length: int, pack: bool, drop_last: bool = True
) -> TokenBlocks:
    """`to_blocks` of the examples' tokens."""
    return to_blocks(encode(examples, tokenizer), pad_id(tokenizer), max_length, pack, drop_last)


def head_labels(ids: torch.Tensor, lengths: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, K] targets: head k at position t predicts ids[t+k+1]; IGNORE_INDEX past the valid tokens."""
    batch, seq = ids.shape
    valid = torch.arange(seq, device=ids.device) < lengths.to(ids.device)[:, None]
    targets = torch.where(valid, ids, IGNORE_INDEX)
    padded = torch.cat([targets, targets.new_full((batch, n_heads), IGNORE_INDEX)], dim=1)
    # Window t of padded[:, 1:] holds positions t+1 .. t+K.
    return padded[:, 1:].unfold(1, n_heads, 1).contiguous()


def make_batch(ids: torch.Tensor, lengths: torch.Tensor, n_heads: int) -> Batch:
    return Batch(ids, head_labels(ids, lengths, n_heads))


# ----------------------------------------------------------------------------- order


class ResumableSampler:
    """Seeded order of global batches: epoch e is a permutation from (seed, e); depends on the seed only.

    Every rank computes the same global batch of `batch_size` indices and takes its contiguous slice, so the
    data a step sees does not depend on the world size. Iterates forever; `len` is batches per epoch (the
    incomplete last batch of an epoch is dropped).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of world_size {world_size} "
                "(it is the global batch; every rank takes an equal share)"
            )
        if num_samples < batch_size:
            raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size}")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.per_rank = rank, batch_size // world_size
        self._epoch = 0
        self._batch = 0  # batches of the current epoch already handed out
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_samples // self.batch_size

    @property
    def epoch(self) -> int:
        """Epoch of the latest batch; it moves on when the first batch of the next epoch is drawn."""
        return self._epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            # SeedSequence needs non-negative entropy; modulo 2**64 keeps distinct seeds distinct.
            rng = np.random.default_rng([self.seed % 2**64, epoch])
            self._order = (epoch, rng.permutation(self.num_samples))
        return self._order[1]

    def __iter__(self) -> ResumableSampler:
        return self

    def __next__(self) -> list[int]:
        if self._batch == len(self):
            self._epoch, self._batch = self._epoch + 1, 0
        start = self._batch * self.batch_size + self.rank * self.per_rank
        self._batch += 1
        return self._permutation(self._epoch)[start : start + self.per_rank].tolist()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Resuming onto other data or another batch size would silently train on a different order.
        for key in ("seed", "num_samples", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data cursor was saved with {key}={state[key]}, this run has {getattr(self, key)}; "
                    "resume with the same dataset, seed and batch_size"
                )
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"data cursor batch {state['batch']} is outside 0..{len(self)}")
        self._epoch, self._batch = state["epoch"], state["batch"]


class BatchLoader:
    """Infinite stream of this rank's Batches in the sampler's order; resumable through state_dict."""

    def __init__(
        self,
        blocks: TokenBlocks,
        batch_size: int,
        n_heads: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.blocks, self.n_heads = blocks, n_heads
        self.sampler = ResumableSampler(len(blocks), batch_size, seed, rank, world_size)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> Batch:
        index = torch.tensor(next(self.sampler), dtype=torch.long)
        return make_batch(self.blocks.ids[index], self.blocks.lengths[index], self.n_heads)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
