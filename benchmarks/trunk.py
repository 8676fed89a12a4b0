"""The benchmarks' shared trunk: a Llama scaled down from 7B_1T_4, keeping what sets the n=4 / n=1 ratios.

32 layers, and an unembedding that costs about 0.65 of one decoder layer per token (as 4096·32000 does against
a SwiGLU block of width 4096/11008); random weights from a config, nothing downloaded.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_trunk_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)


def build_trunk(args: argparse.Namespace, n_heads: int) -> Any:
    """An MTPModel with `n_heads` heads on the trunk the arguments describe (seeded: the same every call)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wmtp.models import MTPModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return MTPModel(LlamaForCausalLM(config), n_heads=n_heads)
