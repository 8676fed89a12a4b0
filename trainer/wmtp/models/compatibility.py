"""Whether the base, reference and reward models can train together, read from their metadata alone.

Only config and tokenizer files are read, never weights (on S3 nothing else is downloaded), so `wmtp validate`
and the trainer's first seconds can refuse a pair that would otherwise crash mid-training (an IndexError in an
embedding) after a long pull: every model must have the base model's vocabulary size and, where it ships a
tokenizer, the base model's tokenizer; and the base model must embed every token its tokenizer produces.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import AutoConfig

from wmtp.config import ConfigError, ModelPaths, clip
from wmtp.contract import MODEL_ROLES
from wmtp.models import native
from wmtp.models.loading import load_tokenizer, model_directory
from wmtp.storage import Storage, StorageError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Vocabulary:
    """What a model directory says about its vocabulary."""

    where: str  # "paths.models.ref (URI)"
    size: int  # rows of the model's embedding: the config's vocab_size
    tokens: int | None = None  # the tokenizer's size, added tokens included; None without a tokenizer
    digest: str | None = None  # of the tokenizer's token → id map

    def __str__(self) -> str:
        tokenizer = f", a tokenizer of {self.tokens} tokens" if self.tokens is not None else ""
        return f"{self.where} (a vocabulary of {self.size}{tokenizer})"


def read_vocabulary(where: str, uri: str, storage: Storage) -> Vocabulary:
    """The model's vocabulary from its config and tokenizer files; ConfigError if they cannot be read."""
    label = f"{where} ({uri})"
    try:
        with model_directory(uri, storage, weights=False) as (directory, names):
            if native.is_native(names):
                tokenizer = native.load_native_tokenizer(directory)
                size = native.read_params(directory, len(tokenizer)).vocab_size
            else:
                config = AutoConfig.from_pretrained(directory, local_files_only=True)
                size = config.get_text_config().vocab_size
                has_tokenizer = any(name in names for name in _TOKENIZER_FILES)
                tokenizer = load_tokenizer(directory) if has_tokenizer else None
    except StorageError:
        raise  # unreachable, denied or missing in the store: its own line and exit code
    except Exception as err:  # a missing or malformed file: one line, whatever it was
        raise ConfigError(clip(f"{label}: cannot read its config or tokenizer: {type(err).__name__}: {err}")) from None
    if tokenizer is None:
        return Vocabulary(label, size)
    vocab = sorted(tokenizer.get_vocab().items())
    return Vocabulary(label, size, len(vocab), hashlib.sha256(json.dumps(vocab).encode()).hexdigest())


def vocabulary_problems(models: ModelPaths, roles: Iterable[str], storage: Storage) -> list[str]:
    """What keeps the base model and the frozen models of `roles` from training together; [] if nothing."""
    base = read_vocabulary("paths.models.base", models.base, storage)
    problems = []
    if base.tokens is not None and base.tokens > base.size:
        problems.append(f"{base}: its tokenizer produces ids its embedding does not have")
    for role in roles:
        uri = getattr(models, role)
        if uri is None:
            continue
        other = read_vocabulary(f"paths.models.{role}", uri, storage)
        must = f"{MODEL_ROLES[role].name} must share the base model's"
        if other.size != base.size:
            problems.append(f"{other} does not match {base}: the {must} vocabulary")
        elif other.digest is not None and base.digest is not None and other.digest != base.digest:
            problems.append(f"{other} does not match {base}: the tokenizers differ; the {must} tokenizer")
    return problems


def check_vocabularies(models: ModelPaths, roles: Iterable[str], storage: Storage) -> None:
    """ConfigError naming both models and their sizes unless the models can train together."""
    problems = vocabulary_problems(models, roles, storage)
    if problems:
        raise ConfigError("; ".join(problems))
