"""Training data: datasets as users have them (`sources`: files, folders, s3:// prefixes; jsonl, gzip, parquet),
records in their real schemas (`records`: mbpp full and sanitized, codecontests, humaneval, custom jsonl), and
tokens served in a resumable seeded order (`batches`). `build_data` assembles them for a run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from wmtp.config import Config, Recipe
from wmtp.data.batches import (
    IGNORE_INDEX,
    Batch,
    BatchLoader,
    ResumableSampler,
    TokenBlocks,
    encode,
    head_labels,
    make_batch,
    pad_id,
    to_blocks,
    tokenize,
)
from wmtp.data.records import DataError, Example
from wmtp.data.sources import SourceStats, load_examples, load_source, shards
from wmtp.storage import Storage

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BatchLoader",
    "Data",
    "DataError",
    "Example",
    "ResumableSampler",
    "SourceStats",
    "TokenBlocks",
    "build_data",
    "head_labels",
    "load_examples",
    "load_source",
    "make_batch",
    "shards",
    "tokenize",
]

log = logging.getLogger(__name__)


@dataclass
class Data:
    train: BatchLoader
    eval_batches: list[Batch]  # empty when data.eval_fraction is 0: then nothing is evaluated
    num_train_examples: int
    num_eval_examples: int
    sources: list[SourceStats]

    def metrics(self) -> dict[str, float]:
        """Every source's counts, as MLflow metrics."""
        return {key: value for stats in self.sources for key, value in stats.metrics().items()}


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
    rows: list[list[int]] = []
    sources: list[SourceStats] = []
    for source in section.sources:  # config.check_compatible has checked that each is defined
        uri = config.paths.datasets[source.name]
        found, stats = load_source(
            uri, source.resolved_format, storage, source.max_samples, source.languages, name=source.name
        )
        encoded = encode(found, tokenizer)
        stats.tokens = sum(map(len, encoded))
        examples += found
        rows += encoded
        sources.append(stats)
        if rank == 0:
            log.info("data %s", stats)
    n = len(examples)
    if n == 0:
        counts = "; ".join(f"{stats.name}: read {stats.read}, skipped {dict(stats.skipped)}" for stats in sources)
        raise DataError(f"data.sources yielded no examples ({counts}); check data.sources[].format and languages")

    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    n_eval = round(section.eval_fraction * n)
    if section.eval_fraction > 0 and n > 1:
        n_eval = min(max(n_eval, 1), n - 1)
    pad = pad_id(tokenizer)
    train_rows = [rows[i] for i in order[n_eval:]]
    train_blocks = to_blocks(train_rows, pad, section.max_length, section.pack)
    if len(train_blocks) < section.batch_size:
        raise DataError(
            f"the train split ({len(train_rows)} examples) makes {len(train_blocks)} rows of "
            f"{section.max_length} tokens, fewer than data.batch_size {section.batch_size}; "
            "add data, lower data.max_length or data.batch_size"
            + (", or set data.pack: true" if not section.pack else "")
        )
    # The eval tail is kept: a small eval split could otherwise pack into nothing.
    eval_blocks = to_blocks([rows[i] for i in order[:n_eval]], pad, section.max_length, section.pack, drop_last=False)
    per_rank, n_heads = section.batch_size // world_size, recipe.loss.n_heads
    eval_batches = [
        make_batch(eval_blocks.ids[i : i + per_rank], eval_blocks.lengths[i : i + per_rank], n_heads)
        for i in range(0, len(eval_blocks), per_rank)
    ]
    train = BatchLoader(train_blocks, section.batch_size, n_heads, config.seed, rank, world_size)
    return Data(train, eval_batches, len(train_rows), n_eval, sources)
