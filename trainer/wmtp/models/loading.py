"""Loading models by URI: the multi-token model and its tokenizer, and the frozen models algorithms need by role."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from wmtp.models import native
from wmtp.models.mtp import LOAD_DTYPE, MTPModel
from wmtp.storage import Storage, parse_uri

T = TypeVar("T")


class ModelError(ValueError):
    """A model that cannot be loaded from its URI; one line naming the URI and the loader's reason."""


def _names_its_uri(load: Callable[..., T]) -> Callable[..., T]:
    """Turn a loader's OSError or ValueError (transformers' are paragraphs) into one ModelError naming the URI."""

    @functools.wraps(load)
    def wrapper(uri: str, *args: Any, **kwargs: Any) -> T:
        try:
            return load(uri, *args, **kwargs)
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise ModelError(f"{uri}: cannot load a model from it: {reason[:300]}") from err

    return wrapper


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked out of every loss, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@_names_its_uri
def load_mtp_model(
    uri: str, storage: Storage, n_heads: int, head_type: str
) -> tuple[MTPModel, PreTrainedTokenizerBase]:
    """The model and tokenizer in the HF or Meta native directory at `uri` (path, file:// or s3://)."""
    with storage.local_copy(parse_uri(uri)) as directory:
        if native.is_native_dir(directory):
            return native.load_native(directory, n_heads, head_type)
        return MTPModel.from_pretrained(directory, n_heads, head_type), load_tokenizer(directory)


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


@_names_its_uri
def load_reference_model(uri: str, storage: Storage) -> PreTrainedModel:
    """The rho1 reference: a causal LM sharing the base model's tokenizer, in eval mode and frozen."""
    with storage.local_copy(parse_uri(uri)) as directory:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=LOAD_DTYPE)
    return _frozen(model)


@_names_its_uri
def load_reward_model(uri: str, storage: Storage) -> PreTrainedModel:
    """The critic's reward model: a one-label sequence classifier, in eval mode and frozen."""
    with storage.local_copy(parse_uri(uri)) as directory:
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=1, local_files_only=True, dtype=LOAD_DTYPE
        )
    return _frozen(model)


# The loader of each frozen-model role in `wmtp.contract.MODEL_ROLES`.
FROZEN_LOADERS: dict[str, Callable[[str, Storage], PreTrainedModel]] = {
    "ref": load_reference_model,
    "rm": load_reward_model,
}
