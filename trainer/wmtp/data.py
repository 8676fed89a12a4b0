"""Training data: mbpp / codecontests / humaneval / custom jsonl records, tokenised into fixed-length rows and
served in a seeded order that a checkpoint can resume exactly.

The order of global batches depends on the seed and the dataset only, never on the world size or the global
RNG, so a run resumed from a checkpoint (even on a different number of ranks) sees the batches it would have
seen without stopping.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wmtp.config import Config, Recipe
from wmtp.storage import Storage, parse_uri

IGNORE_INDEX = -100


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file and, for a bad record, the line."""


@dataclass(frozen=True)
class Example:
    prompt: str
    solution: str

    @property
    def text(self) -> str:
        # Completion-style data ("def f(x):" + "    return x") must stay byte-exact; only two texts that
        # would otherwise run together get a newline between them.
        if not self.prompt or self.prompt[-1].isspace() or self.solution[:1].isspace():
            return self.prompt + self.solution
        return f"{self.prompt}\n{self.solution}"


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


# ----------------------------------------------------------------------------- records


class _BadRecord(Exception):
    """Raised by a record parser; `load_examples` adds the file and line."""


def _field(record: dict[str, Any], name: str, kind: type = str) -> Any:
    if name not in record:
        raise _BadRecord(f"missing field {name!r} (has: {', '.join(sorted(record)) or 'nothing'})")
    value = record[name]
    if not isinstance(value, kind):
        raise _BadRecord(f"field {name!r} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _mbpp(record: dict[str, Any]) -> Example:
    tests = "\n".join(_field(record, "test_list", list))
    # The tests fix the function name and signature the solution must use, as in the MBPP paper's prompt.
    prompt = f'"""\n{_field(record, "text").strip()}\n\n{tests}\n"""\n'
    return Example(prompt, _field(record, "code"))


# deepmind/code_contests language ids: 1 = Python 2, 3 = Python 3.
_CODECONTESTS_PREFERENCE = (3, 1)


def _codecontests(record: dict[str, Any]) -> Example | None:
    description = _field(record, "description")
    solutions = _field(record, "solutions", dict)
    languages, codes = _field(solutions, "language", list), _field(solutions, "solution", list)
    if not codes:
        return None
    for language in _CODECONTESTS_PREFERENCE:
        if language in languages:
            return Example(description, codes[languages.index(language)])
    return Example(description, codes[0])


def _humaneval(record: dict[str, Any]) -> Example:
    return Example(_field(record, "prompt"), _field(record, "canonical_solution"))


def _jsonl(record: dict[str, Any]) -> Example:
    if "prompt" in record:
        answer = "completion" if "completion" in record else "solution"
        if answer not in record:
            raise _BadRecord("missing field 'completion' (or 'solution') next to 'prompt'")
        return Example(_field(record, "prompt"), _field(record, answer))
    if "text" in record:
        return Example("", _field(record, "text"))
    raise _BadRecord("missing field 'prompt' (with 'completion' or 'solution') or 'text'")


_PARSERS: dict[str, Callable[[dict[str, Any]], Example | None]] = {
    "mbpp": _mbpp,
    "codecontests": _codecontests,
    "humaneval": _humaneval,
    "jsonl": _jsonl,
}


def load_examples(uri: str, fmt: str, storage: Storage, max_samples: int | None = None) -> list[Example]:
    """Read a .jsonl or .jsonl.gz file (path, file:// or s3://) and normalise each record to an Example."""
    if fmt not in _PARSERS:
        raise DataError(f"{uri}: unknown dataset format {fmt!r}; known: {', '.join(_PARSERS)}")
    parse = _PARSERS[fmt]
    loc = parse_uri(uri)
    if not storage.is_file(loc):
        raise DataError(f"{uri}: no such file")
    raw = storage.read_bytes(loc)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: trust the content, not the file name
        raw = gzip.decompress(raw)
    examples: list[Example] = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines breaks on.
    for lineno, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if max_samples is not None and len(examples) >= max_samples:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
            example = parse(record)
        except json.JSONDecodeError as err:
            raise DataError(f"{uri}:{lineno}: not valid JSON: {err}") from None
        except _BadRecord as err:
            raise DataError(f"{uri}:{lineno}: {fmt} record: {err}") from None
        if example is not None:
            examples.append(example)
    return examples


# ----------------------------------------------------------------------------- tokens


def tokenize(
    examples: list[Example], tokenizer: Any, max_length: int, pack: bool, drop_last: bool = True
) -> TokenBlocks:
    """Rows of `max_length` tokens; every example ends with eos so the model learns where a solution stops.

    pack: one stream cut into full rows (the ragged tail is dropped unless `drop_last` is False, then it is
    padded). Otherwise one example per row, truncated and right-padded.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token; set eos_token in its tokenizer_config.json")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # The tokenizer's own special tokens (a BOS for Llama-style models) are kept: the base model expects them.
    rows: list[list[int]] = tokenizer([e.text for e in examples])["input_ids"] if examples else []
    rows = [row if row and row[-1] == eos else [*row, eos] for row in rows]
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


# ----------------------------------------------------------------------------- assembly


@dataclass
class Data:
    train: BatchLoader
    eval_batches: list[Batch]
    num_train_examples: int
    num_eval_examples: int


def build_data(
    config: Config, recipe: Recipe, storage: Storage, tokenizer: Any, rank: int = 0, world_size: int = 1
) -> Data:
    """Load every source, hold out a seeded eval split, tokenise, and wrap the train split in a BatchLoader.

    Every rank gets the same eval batches, of the per-rank micro-batch size: eval memory matches training and
    the loss needs no reduction across ranks.
    """
    section = recipe.data
    if section.batch_size % world_size:
        raise DataError(f"data.batch_size {section.batch_size} is not divisible by world_size {world_size}")
    examples: list[Example] = []
    for source in section.sources:  # config.check_compatible has checked that each is defined
        uri = config.paths.datasets[source.name]
        examples += load_examples(uri, source.resolved_format, storage, source.max_samples)
    n = len(examples)
    if n == 0:
        raise DataError("data.sources yielded no examples")

    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_eval = round(section.eval_fraction * n)
    if section.eval_fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    eval_examples = [examples[i] for i in order[:n_eval]]
    train_examples = [examples[i] for i in order[n_eval:]]

    train_blocks = tokenize(train_examples, tokenizer, section.max_length, section.pack)
    if len(train_blocks) < section.batch_size:
        raise DataError(
            f"the train split ({len(train_examples)} examples) makes {len(train_blocks)} rows of "
            f"{section.max_length} tokens, fewer than data.batch_size {section.batch_size}; "
            "add data, lower data.max_length or data.batch_size"
            + (", or set data.pack: true" if not section.pack else "")
        )
    # The eval tail is kept: a small eval split could otherwise pack into nothing.
    eval_blocks = tokenize(eval_examples, tokenizer, section.max_length, section.pack, drop_last=False)
    per_rank, n_heads = section.batch_size // world_size, recipe.loss.n_heads
    eval_batches = [
        make_batch(eval_blocks.ids[i : i + per_rank], eval_blocks.lengths[i : i + per_rank], n_heads)
        for i in range(0, len(eval_blocks), per_rank)
    ]
    train = BatchLoader(train_blocks, section.batch_size, n_heads, config.seed, rank, world_size)
    return Data(train, eval_batches, len(train_examples), len(eval_examples))
