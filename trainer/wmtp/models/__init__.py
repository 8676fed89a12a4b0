"""The multi-token model (`mtp`), loading by URI (`loading`), Meta's native format (`native`), tiny builders (`tiny`),
and whether models fit together, from their metadata (`compatibility`).

Nothing here imports torch.distributed: parallelism is applied from outside, in `wmtp.distributed`.
"""

from wmtp.models.compatibility import check_vocabularies, vocabulary_problems
from wmtp.models.loading import (
    FROZEN_LOADERS,
    load_mtp_model,
    load_reference_model,
    load_reward_model,
    load_tokenizer,
)
from wmtp.models.mtp import MTPCache, MTPModel, empty_weights, find_decoder_layers, find_final_norm
from wmtp.models.tiny import build_tiny_models, build_tiny_tokenizer

__all__ = [
    "FROZEN_LOADERS",
    "MTPCache",
    "MTPModel",
    "build_tiny_models",
    "build_tiny_tokenizer",
    "check_vocabularies",
    "empty_weights",
    "find_decoder_layers",
    "find_final_norm",
    "load_mtp_model",
    "load_reference_model",
    "load_reward_model",
    "load_tokenizer",
    "vocabulary_problems",
]
