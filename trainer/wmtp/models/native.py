"""Meta's native multi-token checkpoints (the 7B_1T_4 release), loaded as an `MTPModel`.

A native directory holds `params.json`, the weights as `consolidated.pth` or as model-parallel shards
`consolidated.00.pth`, `consolidated.01.pth`, ..., and the SentencePiece `tokenizer.model`. Key names, shapes and
the forward pass follow `llama/model.py` of Meta's release (https://huggingface.co/facebook/multi-token-prediction,
class `Transformer`): `layers.{i}` holds n_layers - n_future_tokens + 1 blocks, the shared trunk and then head 0's
layer; `extra_heads.{j}` holds the other n_future_tokens - 1 heads, each a `TransformerBlock` with the same keys;
one `norm` and one `output` serve every head. The forward runs `layers[:-1]`, then each of
`[layers[-1], *extra_heads]` on that same output, then the shared norm and output: `MTPModel`'s "block" layout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast, PreTrainedTokenizerBase

from wmtp.models.mtp import LOAD_DTYPE, MTPModel, empty_weights
from wmtp.storage import Storage, parse_uri

PARAMS = "params.json"
HF_CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
_SHARD = re.compile(r"consolidated(?:\.(\d+))?\.pth")

# The dimension model parallelism split each weight along when Meta saved it (fairscale layers in `llama/model.py`,
# https://github.com/meta-llama/llama, which the MTP release reuses): ColumnParallelLinear shards its output dim,
# RowParallelLinear its input dim, ParallelEmbedding the embedding dim. Norms are replicated on every shard.
_SPLIT_DIM = {
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "feed_forward.w1": 0,
    "feed_forward.w3": 0,
    "output": 0,
    "attention.wo": 1,
    "feed_forward.w2": 1,
    "tok_embeddings": 1,
}
_BLOCK_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Llama 1 checkpoints carry their precomputed rotary table; HF computes its own from rope_theta.
_IGNORED = {"rope.freqs"}


@dataclass(frozen=True)
class NativeParams:
    """`params.json`, with the defaults of Meta's `ModelArgs` for the keys it may leave out."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float
    rope_theta: float
    n_future_tokens: int
    max_seq_len: int

    @property
    def n_trunk_layers(self) -> int:
        """Length of Meta's `layers`: the shared trunk plus head 0's layer."""
        return self.n_layers - self.n_future_tokens + 1

    def block_prefixes(self) -> list[str]:
        return [f"layers.{i}." for i in range(self.n_trunk_layers)] + [
            f"extra_heads.{j}." for j in range(self.n_future_tokens - 1)
        ]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        head_dim = self.dim // self.n_heads
        q, kv, d, h = self.n_heads * head_dim, self.n_kv_heads * head_dim, self.dim, self.hidden_dim
        block = {
            "attention.wq.weight": (q, d),
            "attention.wk.weight": (kv, d),
            "attention.wv.weight": (kv, d),
            "attention.wo.weight": (d, q),
            "feed_forward.w1.weight": (h, d),
            "feed_forward.w2.weight": (d, h),
            "feed_forward.w3.weight": (h, d),
            "attention_norm.weight": (d,),
            "ffn_norm.weight": (d,),
        }
        shapes = {
            "tok_embeddings.weight": (self.vocab_size, d),
            "norm.weight": (d,),
            "output.weight": (self.vocab_size, d),
        }
        for prefix in self.block_prefixes():
            shapes.update({prefix + name: shape for name, shape in block.items()})
        return shapes


def read_params(directory: Path, tokenizer_vocab: int) -> NativeParams:
    path = directory / PARAMS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {PARAMS}; a native checkpoint needs it beside its consolidated*.pth")
    raw = json.loads(path.read_text())
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    dim, n_future = raw["dim"], raw.get("n_future_tokens", 1)
    if not 1 <= n_future <= raw["n_layers"]:
        raise ValueError(f"{path}: n_future_tokens={n_future} must be between 1 and n_layers={raw['n_layers']}")
    # Meta's FeedForward: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to a multiple of multiple_of.
    hidden = int(2 * 4 * dim / 3)
    if raw.get("ffn_dim_multiplier") is not None:
        hidden = int(raw["ffn_dim_multiplier"] * hidden)
    multiple_of = raw.get("multiple_of", 256)
    return NativeParams(
        dim=dim,
        n_layers=raw["n_layers"],
        n_heads=raw["n_heads"],
        n_kv_heads=raw.get("n_kv_heads") or raw["n_heads"],
        # Llama 2 style params.json leave vocab_size at -1: Meta's loader takes it from the tokenizer.
        vocab_size=raw["vocab_size"] if raw.get("vocab_size", -1) > 0 else tokenizer_vocab,
        hidden_dim=multiple_of * ((hidden + multiple_of - 1) // multiple_of),
        norm_eps=raw.get("norm_eps", 1e-5),
        rope_theta=raw.get("rope_theta", 10000.0),
        n_future_tokens=n_future,
        # Meta's freqs_cis table covers twice its max_seq_len (2048 by default).
        max_seq_len=2 * raw.get("max_seq_len", 2048),
    )


def shard_files(directory: str | Path) -> list[Path]:
    """The `consolidated*.pth` files, in shard order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(m, p) for p in directory.iterdir() if (m := _SHARD.fullmatch(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: int(mp[0][1] or 0))]


def is_native_dir(directory: str | Path) -> bool:
    return bool(shard_files(directory))


def is_native(names: list[str]) -> bool:
    """Whether a directory holding these files is a native checkpoint (whether or not they are all here).

    Decided without the weights where possible: a rank that pulled only the small files (params.json and the
    tokenizer, no consolidated*.pth) must read the folder as the same format as rank 0 does. An HF config.json
    beside them (Mistral's releases ship both) makes it an HF directory on every rank."""
    if HF_CONFIG in names:
        return False
    return PARAMS in names or any(_SHARD.fullmatch(name) for name in names)


def _check_shard_count(
    directory: Path, files: list[Path], shards: list[dict[str, torch.Tensor]], params: NativeParams
) -> None:
    indices = [_SHARD.fullmatch(f.name)[1] for f in files]
    if None in indices and len(files) > 1:
        raise ValueError(f"{directory}: both consolidated.pth and numbered shards; keep one or the other")
    key = "layers.0.attention.wq.weight"
    if key not in shards[0]:
        raise ValueError(f"{files[0]}: no {key}; not a Meta Llama checkpoint")
    # Each shard holds an equal slice of wq's rows, so the first one tells how many shards there are. A size that
    # does not divide is no shard count at all: the shape check reports it.
    full, part = params.expected_shapes()[key][0], shards[0][key].shape[0]
    count = full // part if part and full % part == 0 else len(files)
    absent = sorted(set(range(count)) - {int(i or 0) for i in indices})
    if absent:
        raise FileNotFoundError(
            f"{directory}: missing {', '.join(f'consolidated.{i:02d}.pth' for i in absent)}: {key} in "
            f"{files[0].name} has {part} of its {full} rows, so there are {count} shards, but only "
            f"{', '.join(f.name for f in files)} are here"
        )


def _split_dim(key: str) -> int | None:
    module = key.removesuffix(".weight")
    for name, dim in _SPLIT_DIM.items():
        if module == name or module.endswith("." + name):
            return dim
    return None


def merge_shards(directory: str | Path, params: NativeParams) -> dict[str, torch.Tensor]:
    """The full state dict, shards concatenated along their split dims and checked against `params`."""
    directory = Path(directory)
    files = shard_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no consolidated*.pth")
    # mmap: a 7B checkpoint is then paged in as tensors are used rather than read whole up front.
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    _check_shard_count(directory, files, shards, params)
    merged = {}
    for key, first in shards[0].items():
        if key in _IGNORED:
            continue
        lacking = [f.name for f, shard in zip(files, shards, strict=True) if key not in shard]
        if lacking:
            raise ValueError(f"{directory}: {key} is in {files[0].name} but not in {', '.join(lacking)}")
        dim = _split_dim(key)
        merged[key] = first if dim is None or len(shards) == 1 else torch.cat([s[key] for s in shards], dim=dim)

    expected = params.expected_shapes()
    missing, unexpected = sorted(expected.keys() - merged.keys()), sorted(merged.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{directory}: tensors do not match {PARAMS} (n_layers={params.n_layers}, "
            f"n_future_tokens={params.n_future_tokens}): missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for key, shape in expected.items():
        if tuple(merged[key].shape) != shape:
            raise ValueError(
                f"{directory}: tensor {key} has shape {tuple(merged[key].shape)}, but {PARAMS} implies {shape}"
            )
    return merged


def _permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates the two halves of each head. Reordering
    each head's q/k output rows maps one onto the other (transformers' convert_llama_weights_to_hf `permute`)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _block_to_hf(state: dict[str, torch.Tensor], prefix: str, params: NativeParams) -> dict[str, torch.Tensor]:
    block = {hf: state[prefix + meta] for meta, hf in _BLOCK_TO_HF.items()}
    block["self_attn.q_proj.weight"] = _permute_rotary(block["self_attn.q_proj.weight"], params.n_heads)
    block["self_attn.k_proj.weight"] = _permute_rotary(block["self_attn.k_proj.weight"], params.n_kv_heads)
    return block


def load_native_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    directory = Path(directory)
    if not (directory / TOKENIZER).is_file():
        raise FileNotFoundError(
            f"{directory}: no {TOKENIZER}; copy the release's Llama 2 SentencePiece {TOKENIZER} beside {PARAMS}"
        )
    # Meta's code encodes with a BOS and no EOS; the data pipeline keeps the tokenizer's own special tokens.
    tokenizer = LlamaTokenizerFast.from_pretrained(
        directory, local_files_only=True, add_bos_token=True, add_eos_token=False
    )
    if tokenizer.pad_token is None:
        # As in models.load_tokenizer: padded positions are masked out of every loss, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def native_config(params: NativeParams, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The HF Llama equivalent of Meta's layout: the trunk plus head 0's layer; extra heads live in MTPModel."""
    return LlamaConfig(
        vocab_size=params.vocab_size,
        hidden_size=params.dim,
        intermediate_size=params.hidden_dim,
        num_hidden_layers=params.n_trunk_layers,
        num_attention_heads=params.n_heads,
        num_key_value_heads=params.n_kv_heads,
        rms_norm_eps=params.norm_eps,
        rope_theta=params.rope_theta,
        max_position_embeddings=params.max_seq_len,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def load_native(
    directory: str | Path, n_heads: int | None = None, head_type: str | None = None, empty: bool = False
) -> tuple[MTPModel, PreTrainedTokenizerBase]:
    """The multi-token model and tokenizer of a native directory; `n_heads`/`head_type`, when given, must agree.
    `empty`: the structure alone, on the meta device, from params.json and the tokenizer (no shard is read)."""
    directory = Path(directory)
    tokenizer = load_native_tokenizer(directory)
    params = read_params(directory, len(tokenizer))
    for name, wanted, actual in (("n_heads", n_heads, params.n_future_tokens), ("head_type", head_type, "block")):
        if wanted is not None and wanted != actual:
            raise ValueError(f"{directory}: Meta's checkpoint has {name}={actual!r}, not {wanted!r}")
    config = native_config(params, tokenizer)
    if empty:
        with empty_weights():
            return MTPModel(LlamaForCausalLM(config), params.n_future_tokens, "block"), tokenizer
    state = merge_shards(directory, params)

    hf_state = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(params.n_trunk_layers):
        hf_state.update({f"model.layers.{i}.{k}": v for k, v in _block_to_hf(state, f"layers.{i}.", params).items()})
    base, info = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=hf_state, dtype=LOAD_DTYPE, output_loading_info=True
    )
    # A key the mapping above got wrong would otherwise leave that weight at its random init.
    if info["missing_keys"] or info["unexpected_keys"]:
        raise ValueError(f"{directory}: HF Llama rejected {info['missing_keys']}, {info['unexpected_keys']}")

    model = MTPModel(base, params.n_future_tokens, "block")
    heads = {}
    for j in range(params.n_future_tokens - 1):
        heads.update({f"{j}.{k}": v for k, v in _block_to_hf(state, f"extra_heads.{j}.", params).items()})
    model.extra_heads.load_state_dict(heads)
    return model, tokenizer


def convert_native(src: str, dst: str | Path, storage: Storage) -> Path:
    """Write the native checkpoint at `src` (path, file:// or s3://) to `dst` in the project's own layout: the HF
    trunk, `mtp_heads.safetensors`, `mtp.json` and the tokenizer, which `MTPModel.from_pretrained` loads."""
    with storage.local_copy(parse_uri(src)) as directory:
        model, tokenizer = load_native(directory)
    dst = Path(dst)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst
