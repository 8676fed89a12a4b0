"""Tiny random models and a BPE tokenizer, built offline: for the quickstart, tests and benchmarks."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

_EOT = "<|endoftext|>"


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on Python's own stdlib sources: offline, and code like the training data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(os.path.dirname(os.__file__))
    files = sorted(stdlib.glob("*.py"))[:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((f.read_text(encoding="utf-8", errors="replace") for f in files), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=_EOT, eos_token=_EOT, pad_token=_EOT, unk_token=_EOT)


def build_tiny_models(dest: Path, seed: int = 0, layers: int = 2) -> dict[str, Path]:
    """Random tiny Llamas in dest/{base,ref,rm}, each with the tokenizer; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tiny_tokenizer()
    eot = tokenizer.convert_tokens_to_ids(_EOT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    rm_config = copy.deepcopy(config)
    rm_config.num_labels = 1
    builders = {
        "base": (LlamaForCausalLM, config, seed),
        "ref": (LlamaForCausalLM, config, seed + 1),
        "rm": (LlamaForSequenceClassification, rm_config, seed + 2),
    }
    paths = {}
    for name, (model_cls, model_config, model_seed) in builders.items():
        torch.manual_seed(model_seed)
        path = Path(dest) / name
        model_cls(model_config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
