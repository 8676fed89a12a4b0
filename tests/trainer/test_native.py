"""Meta's native multi-token checkpoints: a tiny one in Meta's layout, checked against Meta's forward pass."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from support.sharded_load import batch, outputs, sharded_load
from wmtp import contract
from wmtp.cli import app
from wmtp.models import MTPModel, load_mtp_model
from wmtp.models.compatibility import read_vocabulary
from wmtp.models.native import is_native_dir, load_native, load_native_tokenizer
from wmtp.pull import Job, pull
from wmtp.storage import Storage, parse_uri

# 2 shared trunk layers + head 0's layer in Meta's `layers`, 3 more heads in `extra_heads`. Grouped-query attention,
# a non-default rope_theta and ffn_dim_multiplier make a wrong reading of any of them show in the logits.
PARAMS = {
    "dim": 64,
    "n_layers": 6,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": -1,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "n_future_tokens": 4,
}
HEAD_DIM = PARAMS["dim"] // PARAMS["n_heads"]
HIDDEN = 224  # int(1.3 * int(8 * 64 / 3)) = 221, rounded up to a multiple of 32
TEXT = "def add(a, b):\n    return a + b  # sum ✓\n\nclass Point:\n    x: int = 10\n"
COLUMN_PARALLEL = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
ROW_PARALLEL = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def train_sentencepiece(path: Path) -> None:
    """A Llama-2-like SentencePiece BPE (byte fallback, no normalisation) trained on a few stdlib sources."""
    files = sorted(Path(os.path.dirname(os.__file__)).glob("*.py"))[:8]
    lines = [line for f in files for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=384,  # 259 byte and control pieces come first
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=0.995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def block_shapes() -> dict[str, tuple[int, ...]]:
    d, q, kv = PARAMS["dim"], PARAMS["n_heads"] * HEAD_DIM, PARAMS["n_kv_heads"] * HEAD_DIM
    return {
        "attention.wq.weight": (q, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, q),
        "feed_forward.w1.weight": (HIDDEN, d),
        "feed_forward.w2.weight": (d, HIDDEN),
        "feed_forward.w3.weight": (HIDDEN, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }


def random_state(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)

    def weight(shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:  # norms away from 1, so that a dropped or swapped norm shows
            return 1 + 0.2 * torch.randn(shape, generator=generator)
        return torch.randn(shape, generator=generator) / math.sqrt(shape[1])

    n_trunk = PARAMS["n_layers"] - PARAMS["n_future_tokens"] + 1
    prefixes = [f"layers.{i}." for i in range(n_trunk)]
    prefixes += [f"extra_heads.{j}." for j in range(PARAMS["n_future_tokens"] - 1)]
    state = {"tok_embeddings.weight": torch.randn(vocab, PARAMS["dim"], generator=generator)}
    for prefix in prefixes:
        state.update({prefix + name: weight(shape) for name, shape in block_shapes().items()})
    state["norm.weight"] = weight((PARAMS["dim"],))
    state["output.weight"] = weight((vocab, PARAMS["dim"]))
    # Meta's checkpoints also hold the rotary table, a buffer no weight is built from.
    state["rope.freqs"] = 1.0 / PARAMS["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    return state


def split(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Meta's model-parallel layout, written independently of the loader's merge."""

    def dim(key: str) -> int | None:
        module = key.removesuffix(".weight")
        if any(module.endswith(name) for name in COLUMN_PARALLEL):
            return 0
        return 1 if any(module.endswith(name) for name in ROW_PARALLEL) else None

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for key, tensor in state.items():
        d = dim(key)
        parts = [tensor] * n if d is None else torch.chunk(tensor, n, dim=d)
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part.clone()
    return shards


def write_native(directory: Path, state: dict[str, torch.Tensor], tokenizer: Path, n_shards: int = 1) -> Path:
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(PARAMS))
    shutil.copy(tokenizer, directory / "tokenizer.model")
    if n_shards == 1:
        torch.save(state, directory / "consolidated.pth")
    for i, shard in enumerate(split(state, n_shards) if n_shards > 1 else []):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("native")
    train_sentencepiece(root / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    state = random_state(sp.vocab_size())
    return {
        "one": write_native(root / "7B_1T_4", state, root / "tokenizer.model"),
        "two": write_native(root / "7B_1T_4-mp2", state, root / "tokenizer.model", n_shards=2),
        "state": state,
        "sp": sp,
    }


# ----------------------------------------------------------------------------- Meta's forward, from the raw tensors


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + PARAMS["norm_eps"]) * weight


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Meta's RoPE: consecutive pairs of each head as complex numbers, times e^(i·t·θ_k)."""
    length = x.shape[1]
    theta = 1.0 / PARAMS["rope_theta"] ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = torch.polar(torch.ones(length, HEAD_DIM // 2), torch.outer(torch.arange(length).float(), theta))
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)


def block(state: dict[str, torch.Tensor], prefix: str, h: torch.Tensor) -> torch.Tensor:
    w = {name: state[prefix + name] for name in block_shapes()}
    batch, length, _ = h.shape
    x = rms_norm(h, w["attention_norm.weight"])
    q = rotary((x @ w["attention.wq.weight"].T).view(batch, length, PARAMS["n_heads"], HEAD_DIM))
    k = rotary((x @ w["attention.wk.weight"].T).view(batch, length, PARAMS["n_kv_heads"], HEAD_DIM))
    v = (x @ w["attention.wv.weight"].T).view(batch, length, PARAMS["n_kv_heads"], HEAD_DIM)
    repeat = PARAMS["n_heads"] // PARAMS["n_kv_heads"]
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / math.sqrt(HEAD_DIM)
    scores = scores + torch.full((length, length), float("-inf")).triu(1)
    attended = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(batch, length, -1)
    h = h + attended @ w["attention.wo.weight"].T
    x = rms_norm(h, w["ffn_norm.weight"])
    gated = F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T)
    return h + gated @ w["feed_forward.w2.weight"].T


def meta_logits(state: dict[str, torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """Meta's Transformer.forward(return_all_heads=True): trunk = layers[:-1], then [layers[-1], *extra_heads] in
    parallel on the trunk's output, through the shared norm and output."""
    n_trunk = PARAMS["n_layers"] - PARAMS["n_future_tokens"] + 1
    h = state["tok_embeddings.weight"][ids]
    for i in range(n_trunk - 1):
        h = block(state, f"layers.{i}.", h)
    heads = [f"layers.{n_trunk - 1}."] + [f"extra_heads.{j}." for j in range(PARAMS["n_future_tokens"] - 1)]
    return [rms_norm(block(state, head, h), state["norm.weight"]) @ state["output.weight"].T for head in heads]


@torch.no_grad()
def logits(model: MTPModel, ids: torch.Tensor) -> list[torch.Tensor]:
    return [model.unembed(hidden) for hidden in model.eval()(ids)]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- tests

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that messages do not wrap


def test_loaded_native_checkpoint_matches_metas_forward_for_every_head(native: dict) -> None:
    assert is_native_dir(native["one"]) and is_native_dir(native["two"])
    model, tokenizer = load_mtp_model(str(native["one"]), Storage(), n_heads=4, head_type="block")
    assert (model.n_heads, model.head_type, len(model.extra_heads)) == (4, "block", 3)
    assert len(model.base.model.layers) == 3 and model.vocab_size == native["sp"].vocab_size()

    # Meta encodes with its SentencePiece processor and a leading BOS.
    ids = tokenizer(TEXT)["input_ids"]
    assert ids == [native["sp"].bos_id(), *native["sp"].encode(TEXT)]
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = torch.tensor([ids, ids[::-1]])

    expected = meta_logits(native["state"], batch)
    got = logits(model, batch)
    assert len(got) == 4
    for head, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5, msg=lambda m, k=head: f"head {k}: {m}")
    # The heads differ from each other, so each head's match means its own weights were loaded.
    assert all((got[k] - got[0]).abs().max() > 1e-1 for k in range(1, 4))


def test_two_shard_checkpoint_loads_identically(native: dict) -> None:
    one, _ = load_native(native["one"])
    two, _ = load_native(native["two"])
    ids = torch.tensor([native["sp"].encode(TEXT)])
    assert_same(logits(two, ids), logits(one, ids))


def test_convert_then_load_gives_identical_logits_and_tokens(native: dict, tmp_path: Path) -> None:
    dst = tmp_path / "converted"
    result = runner.invoke(app, ["convert-native", str(native["two"]), str(dst)])
    assert result.exit_code == 0, result.output
    assert {"config.json", "mtp.json", "mtp_heads.safetensors", "tokenizer.json"} <= {p.name for p in dst.iterdir()}
    assert not is_native_dir(dst)

    native_model, native_tok = load_native(native["one"])
    model, tokenizer = load_mtp_model(str(dst), Storage(), n_heads=4, head_type="block")
    assert tokenizer(TEXT)["input_ids"] == native_tok(TEXT)["input_ids"]
    assert tokenizer.pad_token_id == native_tok.pad_token_id
    ids = torch.tensor([native_tok(TEXT)["input_ids"]])
    assert_same(logits(model, ids), logits(native_model, ids))


@pytest.mark.slow
def test_native_shards_loaded_sharded_over_two_ranks_give_the_same_model(native: dict, tmp_path: Path) -> None:
    sharded = sharded_load({"base": str(native["two"])}, 2, tmp_path / "outputs.pt")
    whole, _ = load_native(native["one"])
    assert torch.equal(sharded["base"], outputs("base", whole, batch(whole.vocab_size)))


def test_native_checkpoint_loads_from_s3(native: dict, s3_storage: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/meta/7B_1T_4"
    s3_storage.upload(native["one"], parse_uri(uri))
    remote, _ = load_mtp_model(uri, s3_storage, n_heads=4, head_type="block")
    local, _ = load_native(native["one"])
    ids = torch.tensor([native["sp"].encode(TEXT)])
    assert_same(logits(remote, ids), logits(local, ids))


def test_a_native_folder_pulled_without_its_shards_builds_the_same_empty_model(
    native: dict, s3_storage: Storage, s3_bucket: str, tmp_path: Path
) -> None:
    """A node rank other than 0 pulls params.json and tokenizer.model alone: it must still read the folder as Meta's
    format, and build the model rank 0 builds."""
    uri = f"s3://{s3_bucket}/meta/7B_1T_4-mp2"
    s3_storage.upload(native["two"], parse_uri(uri))
    assert pull([Job(uri, str(tmp_path), contract.PULL_WEIGHTS_RANK0)], s3_storage, node_rank=1)["rank0_only"] == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["params.json", "tokenizer.model"]

    pulled, tokenizer = load_mtp_model(str(tmp_path), Storage(), n_heads=4, head_type="block", empty=True)
    whole, _ = load_mtp_model(str(native["two"]), Storage(), n_heads=4, head_type="block", empty=True)

    def shapes(model: MTPModel) -> list[tuple[str, torch.Size]]:
        return [(name, p.shape) for name, p in model.named_parameters()]

    assert shapes(pulled) == shapes(whole) and all(p.is_meta for p in pulled.parameters())
    assert tokenizer.get_vocab() == load_native_tokenizer(native["two"]).get_vocab()
    read, want = (read_vocabulary("base", str(path), Storage()) for path in (tmp_path, native["two"]))
    assert (read.size, read.tokens, read.digest) == (want.size, want.tokens, want.digest)


def test_a_head_count_other_than_the_checkpoints_is_refused(native: dict) -> None:
    with pytest.raises(ValueError, match="n_heads=4, not 2"):
        load_mtp_model(str(native["one"]), Storage(), n_heads=2, head_type="block")
    with pytest.raises(ValueError, match="head_type='block', not 'linear'"):
        load_native(native["one"], head_type="linear")


def copy_without(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).unlink()
    return dst


def test_missing_params_json_is_named(native: dict, tmp_path: Path) -> None:
    directory = copy_without(native["one"], tmp_path / "ckpt", "params.json")
    assert is_native_dir(directory)
    with pytest.raises(FileNotFoundError, match=r"no params\.json"):
        load_native(directory)


@pytest.mark.parametrize("absent", ["consolidated.01.pth", "consolidated.00.pth"])
def test_missing_shard_is_named(native: dict, tmp_path: Path, absent: str) -> None:
    directory = copy_without(native["two"], tmp_path / "ckpt", absent)
    with pytest.raises(FileNotFoundError, match=rf"missing {absent.replace('.', '[.]')}.*2 shards"):
        load_native(directory)


def test_shape_mismatch_names_the_tensor_and_both_shapes(native: dict, tmp_path: Path) -> None:
    state = dict(native["state"])
    key = "extra_heads.2.feed_forward.w2.weight"
    state[key] = state[key][:, :-1]
    directory = write_native(tmp_path / "ckpt", state, native["one"] / "tokenizer.model")
    with pytest.raises(
        ValueError, match=rf"{re.escape(key)} has shape \(64, 223\), but params\.json implies \(64, 224\)"
    ):
        load_native(directory)


def test_convert_native_reports_errors_without_a_traceback(native: dict, tmp_path: Path) -> None:
    directory = copy_without(native["one"], tmp_path / "ckpt", "params.json")
    result = runner.invoke(app, ["convert-native", str(directory), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no params.json" in result.output
    assert not (tmp_path / "out").exists()
