"""Loading models by URI: the multi-token model and its tokenizer, and the frozen models algorithms need by role.

Every loader takes `empty`: the model's structure alone, on the meta device, built from its config and tokenizer
files (on S3 only those are downloaded). Distributed runs build every model so on every rank and let one rank
read the weights, which `wmtp.distributed.load_weights` scatters into the shards. An empty model needs no file
that `wmtp.contract.is_weight_file` names, so a folder `wmtp pull` filled for a node rank other than 0 (weights
left out) builds exactly the model a complete folder does.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from wmtp.contract import is_weight_file
from wmtp.models import native
from wmtp.models.mtp import LOAD_DTYPE, MTPModel, empty_weights
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


@contextlib.contextmanager
def model_directory(uri: str, storage: Storage, weights: bool = True) -> Iterator[tuple[Path, list[str]]]:
    """A local directory for the model at `uri` and the names of every file it has. On this machine it is the
    directory itself, read in place (a missing one fails in the loader, which names what it looked for); from a
    store elsewhere a temporary copy, without the weight files unless `weights`."""
    location = parse_uri(uri)
    path = storage.local_path(location)
    if path is not None:
        yield path, sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        return
    if weights:
        with storage.local_copy(location) as directory:
            yield directory, sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        return
    objects = storage.objects(location)
    with tempfile.TemporaryDirectory(prefix="wmtp-meta-") as tmp:
        for obj in objects:
            if not is_weight_file(obj.rel):
                storage.download(obj.loc, Path(tmp) / obj.rel)
        yield Path(tmp), sorted(obj.rel for obj in objects)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked out of every loss, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@_names_its_uri
def load_mtp_model(
    uri: str, storage: Storage, n_heads: int, head_type: str, empty: bool = False
) -> tuple[MTPModel, PreTrainedTokenizerBase]:
    """The model and tokenizer in the HF or Meta native directory at `uri` (path, file:// or s3://)."""
    with model_directory(uri, storage, weights=not empty) as (directory, names):
        if native.is_native(names):
            return native.load_native(directory, n_heads, head_type, empty=empty)
        return MTPModel.from_pretrained(directory, n_heads, head_type, empty=empty), load_tokenizer(directory)


def _frozen(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _load(cls: type, uri: str, storage: Storage, empty: bool, **config: object) -> PreTrainedModel:
    with model_directory(uri, storage, weights=not empty) as (directory, _):
        if not empty:
            weights = {"dtype": LOAD_DTYPE, "use_safetensors": True}  # never a pickled pytorch_model.bin
            return _frozen(cls.from_pretrained(directory, local_files_only=True, **weights, **config))
        with empty_weights():
            settings = AutoConfig.from_pretrained(directory, local_files_only=True, **config)
            return _frozen(cls.from_config(settings, dtype=LOAD_DTYPE))


@_names_its_uri
def load_reference_model(uri: str, storage: Storage, empty: bool = False) -> PreTrainedModel:
    """The rho1 reference: a causal LM sharing the base model's tokenizer, in eval mode and frozen."""
    return _load(AutoModelForCausalLM, uri, storage, empty)


@_names_its_uri
def load_reward_model(uri: str, storage: Storage, empty: bool = False) -> PreTrainedModel:
    """The critic's reward model: a one-label sequence classifier, in eval mode and frozen."""
    return _load(AutoModelForSequenceClassification, uri, storage, empty, num_labels=1)


# The loader of each frozen-model role in `wmtp.contract.MODEL_ROLES`.
FROZEN_LOADERS: dict[str, Callable[..., PreTrainedModel]] = {
    "ref": load_reference_model,
    "rm": load_reward_model,
}
