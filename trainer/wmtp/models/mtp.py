"""The multi-token model around an HF causal LM.

The multi-token layout is Meta's (7B_1T_4): the trunk is the HF model's decoder stack minus its last layer;
head 0 is that last layer + the final norm + lm_head, i.e. the unmodified HF model; every extra head is one
more decoder layer run in parallel with the last one on the same input, through the same norm and lm_head.
Nothing here names an architecture: the decoder stack and final norm are found on the model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel

HEAD_TYPES = ("block", "linear")
MTP_META = "mtp.json"
MTP_HEADS = "mtp_heads.safetensors"
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
# Training keeps fp32 master weights (autocast does the low-precision compute), whatever dtype was saved.
LOAD_DTYPE = torch.float32


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: the structure without the memory. Buffers
    stay real (rotary tables are computed, not loaded), and a parameter assigned twice stays one (tied weights).
    The weights come later, from one reader, into whatever sharding the model has by then."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack: a ModuleList whose entries are all one block class, the shallowest then longest.

    Shallowest first, because lists nested inside the layers (MoE experts, say) can be longer than the stack.
    """
    stacks = [
        (name.count("."), -len(module), module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1
    ]
    if not stacks:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of decoder layers found")
    return min(stacks, key=lambda s: s[:2])[2]


def find_final_norm(model: nn.Module) -> nn.Module:
    for name in _NORM_NAMES:
        norm = getattr(model, name, None)
        if isinstance(norm, nn.Module):
            return norm
    names = ", ".join(_NORM_NAMES)
    raise ValueError(f"{type(model).__name__}: no final norm found; looked for the attributes {names}")


def _build_extra_heads(base: PreTrainedModel, n_heads: int, head_type: str) -> nn.ModuleList:
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type {head_type!r}: use one of {', '.join(HEAD_TYPES)}")
    if n_heads < 1:
        raise ValueError(f"n_heads must be at least 1, got {n_heads}")
    if head_type == "block":
        # Copies of the last layer make every extra head start out equal to head 0: a sound init, and the one
        # under which a converted checkpoint can be checked against the plain model.
        last = find_decoder_layers(base.base_model)[-1]
        return nn.ModuleList(copy.deepcopy(last) for _ in range(n_heads - 1))
    d = base.config.get_text_config().hidden_size
    heads = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(n_heads - 1))
    with torch.no_grad():
        for head in heads:
            head.weight.copy_(torch.eye(d))
    return heads


class MTPModel(nn.Module):
    """A causal-LM trunk with n output heads; head k at position t predicts token t+k+1."""

    def __init__(self, base: PreTrainedModel, n_heads: int, head_type: str = "block") -> None:
        super().__init__()
        self.base = base
        self.n_heads = n_heads
        self.head_type = head_type
        self.extra_heads = _build_extra_heads(base, n_heads, head_type)
        # Resolved now so that a model without a recognisable layout fails at load time, not mid-training.
        find_decoder_layers(base.base_model)
        find_final_norm(base.base_model)

    @property
    def hidden_size(self) -> int:
        return self.base.config.get_text_config().hidden_size

    @property
    def vocab_size(self) -> int:
        return self.base.get_output_embeddings().weight.shape[0]

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: MTPCache | None = None,
    ) -> list[torch.Tensor]:
        """Per-head final hidden states, each [B, T, D], already through the final norm, head 0 first.

        Logits are not computed here: the loss unembeds one head at a time so that [B, T, n, V] never exists.
        With `cache` (decoding), `input_ids` are the positions after those it holds, the trunk and the block heads
        read and extend it, and only its `n_heads` heads are computed. `attention_mask` and `position_ids` are the
        HF model's (left-padded batches).
        """
        trunk = self.base.base_model
        n_heads = self.n_heads if cache is None else cache.n_heads
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "position_ids": position_ids, "use_cache": cache is not None}  # fmt: skip
        if cache is not None:
            inputs[_cache_keyword(type(trunk))] = cache.trunk
        if self.head_type == "linear" or n_heads == 1:
            hidden = trunk(**inputs).last_hidden_state
            return [hidden, *(head(hidden) for head in self.extra_heads[: n_heads - 1])]

        captured: dict[str, Any] = {}

        def capture(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured["args"], captured["kwargs"] = args, kwargs

        # Registered per call rather than once so that deep copies of the layer (the extra heads, or a copied
        # model) never inherit it, and activation-checkpoint recomputation in backward does not re-fire it.
        last = find_decoder_layers(trunk)[-1]
        handle = last.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            hidden = trunk(**inputs).last_hidden_state
        finally:
            handle.remove()
        norm = find_final_norm(trunk)
        outputs = [hidden]
        for i, block in enumerate(self.extra_heads[: n_heads - 1]):
            args, kwargs = captured["args"], captured["kwargs"]
            if cache is not None:
                # The last layer was handed the trunk's cache (by keyword or by position, as the architecture
                # does); each head gets its own in the same place, with the same mask and positions.
                own = cache.heads[i]
                args = tuple(own if a is cache.trunk else a for a in args)
                kwargs = {k: own if v is cache.trunk else v for k, v in kwargs.items()}
            out = block(*args, **kwargs)
            outputs.append(norm(out[0] if isinstance(out, tuple) else out))
        return outputs

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Shared output embedding, [..., D] -> [..., V]."""
        return self.base.get_output_embeddings()(hidden)

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """An HF directory of the base model (loadable on its own) plus the extra heads and an mtp json.

        `state_dict`: this model's full state dict, e.g. gathered from sharded parameters; default its own.
        """
        directory = Path(directory)
        state_dict = self.state_dict() if state_dict is None else state_dict
        parts: dict[str, dict[str, torch.Tensor]] = {"base.": {}, "extra_heads.": {}}
        for key, value in state_dict.items():
            prefix = key.split(".", 1)[0] + "."
            parts[prefix][key.removeprefix(prefix)] = value
        self.base.save_pretrained(directory, state_dict=parts["base."])
        heads = {k: v.detach().contiguous().cpu() for k, v in parts["extra_heads."].items()}
        save_file(heads, directory / MTP_HEADS)
        meta = {"n_heads": self.n_heads, "head_type": self.head_type}
        (directory / MTP_META).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, n_heads: int | None = None, head_type: str | None = None, empty: bool = False
    ) -> MTPModel:
        """A directory written by `save_pretrained` (heads restored), or a plain HF causal-LM directory (heads
        freshly built, so then `n_heads` and `head_type` are required). `empty`: the structure alone, on the meta
        device, from config.json and mtp.json (the weights are not read)."""
        directory = Path(directory)
        meta_path = directory / MTP_META
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            for name, wanted in (("n_heads", n_heads), ("head_type", head_type)):
                if wanted is not None and wanted != meta[name]:
                    raise ValueError(f"{directory}: saved with {name}={meta[name]!r}, not {wanted!r}")
            n_heads, head_type = meta["n_heads"], meta["head_type"]
        elif n_heads is None or head_type is None:
            raise ValueError(f"{directory}: a plain HF directory; give n_heads and head_type to build heads")
        if empty:
            with empty_weights():
                config = AutoConfig.from_pretrained(directory, local_files_only=True)
                return cls(AutoModelForCausalLM.from_config(config, dtype=LOAD_DTYPE), n_heads, head_type)
        # safetensors only: a pickled pytorch_model.bin from a store is never unpickled, not even weights-only.
        base = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=LOAD_DTYPE, use_safetensors=True
        )
        model = cls(base, n_heads, head_type)
        if meta_path.is_file() and n_heads > 1:
            model.extra_heads.load_state_dict(load_file(directory / MTP_HEADS))
        return model


@functools.cache
def _cache_keyword(trunk: type[nn.Module]) -> str:
    # transformers 5 renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40). Once per class:
    # reading a signature costs a good part of a tiny model's decoding step.
    return "cache" if "cache" in inspect.signature(trunk.forward).parameters else "past_key_values"


class MTPCache:
    """The key/value caches of one decoding: the trunk's and one per extra `block` head (each is a decoder layer
    with keys and values of its own; `linear` heads keep none). All hold the same positions, so a rejected draft
    is forgotten everywhere at once (`crop`) and a batch row everywhere at once (`select`)."""

    def __init__(self, model: MTPModel, n_heads: int | None = None) -> None:
        self.n_heads = model.n_heads if n_heads is None else n_heads
        if not 1 <= self.n_heads <= model.n_heads:
            raise ValueError(f"n_heads {self.n_heads}: the model has {model.n_heads} heads")
        config = model.base.config
        self.trunk = DynamicCache(config=config)
        # A head is a copy of the last layer, layer index included: its cache keeps its keys at that index.
        blocks = self.n_heads - 1 if model.head_type == "block" else 0
        self.heads = [DynamicCache(config=config) for _ in range(blocks)]

    @property
    def length(self) -> int:
        """Positions held (padding included)."""
        return self.trunk.get_seq_length()

    def crop(self, length: int) -> None:
        """Forget every position from `length` on: a rejected draft's keys must not be attended to."""
        excess = self.length - length
        if excess > 0:
            for cache in (self.trunk, *self.heads):
                cache.crop(-excess)

    def select(self, rows: torch.Tensor) -> None:
        """Keep these batch rows, in this order; a row may repeat (one prompt's prefill shared by its samples)."""
        for cache in (self.trunk, *self.heads):
            cache.batch_select_indices(rows)
