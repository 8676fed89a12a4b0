from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from typer.testing import CliRunner

from support import sharded_load as sharded
from wmtp.cli import app
from wmtp.config import ModelPaths
from wmtp.contract import ExitCode
from wmtp.models import (
    MTPCache,
    MTPModel,
    build_tiny_models,
    build_tiny_tokenizer,
    load_mtp_model,
    load_reference_model,
    load_reward_model,
    load_tokenizer,
    vocabulary_problems,
)
from wmtp.storage import Location, Storage, parse_uri

VOCAB = 96


def tiny_base(arch: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def outputs(model: MTPModel, ids: torch.Tensor) -> list[torch.Tensor]:
    return model.eval()(ids)


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head0_logits_equal_the_plain_hf_model(arch: str) -> None:
    model = MTPModel(tiny_base(arch), n_heads=3, head_type="block").eval()
    ids = tokens()
    with torch.no_grad():
        hidden = model(ids)
        logits = model.unembed(hidden[0])
        expected = model.base(ids).logits
    assert [h.shape for h in hidden] == [(2, 12, model.hidden_size)] * 3
    assert logits.shape == (2, 12, model.vocab_size) and model.vocab_size == VOCAB
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("arch", "head_type"), [("llama", "block"), ("gpt2", "block"), ("llama", "linear")])
def test_extra_heads_start_equal_to_head0_and_diverge_only_where_perturbed(arch: str, head_type: str) -> None:
    model = MTPModel(tiny_base(arch), n_heads=3, head_type=head_type)
    ids = tokens()
    before = outputs(model, ids)
    # Equal at init only if each extra block saw exactly the last layer's inputs (hidden, masks, positions).
    for head in before[1:]:
        torch.testing.assert_close(head, before[0], rtol=0, atol=1e-6)

    perturb(model.extra_heads[0])
    after = outputs(model, ids)
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert (after[1] - after[0]).abs().max() > 1e-3
    torch.testing.assert_close(after[2], before[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_head_sees_future_tokens(arch: str) -> None:
    model = MTPModel(tiny_base(arch), n_heads=3, head_type="block")
    perturb(model.extra_heads)
    ids = tokens()
    j = 7
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 1) % VOCAB
    for a, b in zip(outputs(model, ids), outputs(model, changed), strict=True):
        torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
        assert (a[:, j] - b[:, j]).abs().max() > 1e-4


@pytest.mark.parametrize(("arch", "head_type"), [("llama", "block"), ("gpt2", "block"), ("llama", "linear")])
@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_a_cache_cropped_after_a_rejected_draft_continues_like_one_full_forward(arch: str, head_type: str) -> None:
    model = MTPModel(tiny_base(arch), n_heads=4, head_type=head_type).eval()
    perturb(model.extra_heads)  # heads that differ from head 0 and from each other, caches included
    ids = tokens()
    full = model(ids)
    cache = MTPCache(model)
    prefix = model(ids[:, :5], cache=cache)
    wrong = ids[:, 5:9].clone()
    wrong[:, 1:] = (wrong[:, 1:] + 1) % VOCAB  # a draft whose first token is right and the rest wrong
    drafted = model(wrong, cache=cache)
    cache.crop(6)
    rest = model(ids[:, 6:], cache=cache)
    assert cache.length == ids.shape[1] and len(cache.heads) == (3 if head_type == "block" else 0)
    stepped = [torch.cat([p, d[:, :1], r], dim=1) for p, d, r in zip(prefix, drafted, rest, strict=True)]
    for a, b in zip(stepped, full, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "head_type"), [("llama", "block"), ("gpt2", "block")])
@pytest.mark.usefixtures("one_thread")
@torch.no_grad()
def test_a_left_padded_row_gives_what_it_gives_alone(arch: str, head_type: str) -> None:
    model = MTPModel(tiny_base(arch), n_heads=3, head_type=head_type).eval()
    perturb(model.extra_heads)
    ids = tokens(2, 12)
    short = ids[1, :8]
    batch = torch.stack([ids[0], torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = MTPCache(model)
    first = model(batch[:, :10], attention_mask=mask[:, :10], position_ids=positions[:, :10], cache=cache)
    then = model(batch[:, 10:], attention_mask=mask, position_ids=positions[:, 10:], cache=cache)
    for head, (a, b) in enumerate(zip(first, then, strict=True)):
        padded = torch.cat([a, b], dim=1)
        torch.testing.assert_close(padded[0], model(ids[:1])[head][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(padded[1, 4:], model(short[None])[head][0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("arch", "head_type"), [("llama", "block"), ("gpt2", "block"), ("llama", "linear")])
def test_save_and_load_restores_every_head(arch: str, head_type: str, tmp_path: Path) -> None:
    model = MTPModel(tiny_base(arch), n_heads=4, head_type=head_type)
    # Perturbed, or freshly built heads would pass as restored ones.
    perturb(model.extra_heads)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "mtp.json").read_text()) == {"n_heads": 4, "head_type": head_type}

    loaded = MTPModel.from_pretrained(tmp_path)
    assert (loaded.n_heads, loaded.head_type) == (4, head_type)
    assert_same(outputs(loaded, tokens()), outputs(model, tokens()))
    with pytest.raises(ValueError, match="n_heads=4"):
        MTPModel.from_pretrained(tmp_path, n_heads=2)


def test_a_plain_hf_directory_gets_fresh_heads(tiny_models: dict[str, Path]) -> None:
    model = MTPModel.from_pretrained(tiny_models["base"], n_heads=4, head_type="block")
    assert model.n_heads == 4 and len(model.extra_heads) == 3
    hidden = outputs(model, tokens())
    for head in hidden[1:]:
        torch.testing.assert_close(head, hidden[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="give n_heads and head_type"):
        MTPModel.from_pretrained(tiny_models["base"])


def test_tiny_models_have_a_working_tokenizer_and_the_right_kinds(tiny_models: dict[str, Path]) -> None:
    assert set(tiny_models) == {"base", "ref", "rm"}
    tokenizer = load_tokenizer(tiny_models["base"])
    assert len(tokenizer) == 512
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    text = "def add(a, b):\n    return a + b  # ünïcode ✓\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text.encode())  # the merges learned something
    assert tokenizer.decode(ids) == text

    storage = Storage()
    ref = load_reference_model(str(tiny_models["ref"]), storage)
    rm = load_reward_model(f"file://{tiny_models['rm']}", storage)
    for frozen in (ref, rm):
        assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    batch = torch.tensor([ids, ids])
    assert ref(batch).logits.shape == (2, len(ids), 512)
    assert rm(batch).logits.shape == (2, 1)
    base, ref_weights = (load_file(tiny_models[n] / "model.safetensors") for n in ("base", "ref"))
    assert any(not torch.equal(t, ref_weights[k]) for k, t in base.items())


def test_tiny_models_are_deterministic_given_the_seed(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_models(tmp_path / "again", seed=0)
    other = build_tiny_models(tmp_path / "other", seed=1)
    for name in ("base", "ref", "rm"):
        first = load_file(tiny_models[name] / "model.safetensors")
        second = load_file(again[name] / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
        tokenizer_json = (tiny_models[name] / "tokenizer.json").read_bytes()
        assert tokenizer_json == (again[name] / "tokenizer.json").read_bytes()
        third = load_file(other[name] / "model.safetensors")
        assert not all(torch.equal(first[k], third[k]) for k in first)


def test_load_from_s3_matches_the_local_load(tiny_models: dict[str, Path], s3_storage: Storage, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/models/base"
    s3_storage.upload(tiny_models["base"], parse_uri(uri))

    remote, remote_tok = load_mtp_model(uri, s3_storage, n_heads=2, head_type="block")
    local, local_tok = load_mtp_model(str(tiny_models["base"]), Storage(), n_heads=2, head_type="block")
    text = "import os\nprint(os.getcwd())\n"
    assert remote_tok(text)["input_ids"] == local_tok(text)["input_ids"]
    ids = torch.tensor([local_tok(text)["input_ids"]])
    assert_same(outputs(remote, ids), outputs(local, ids))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_sharded_loading_gives_the_same_models_as_a_full_load(
    world: int, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    models = {role: str(path) for role, path in tiny_models.items()}
    loaded = sharded.sharded_load(models, world, tmp_path / "outputs.pt")
    storage = Storage()
    full = {
        "base": load_mtp_model(models["base"], storage, sharded.N_HEADS, sharded.HEAD_TYPE)[0],
        "ref": load_reference_model(models["ref"], storage),
        "rm": load_reward_model(models["rm"], storage),
    }
    ids = sharded.batch(full["base"].vocab_size)
    for role, model in full.items():
        assert torch.equal(loaded[role], sharded.outputs(role, model, ids)), role


def recorded_downloads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files Storage downloads from now on."""
    fetched: list[str] = []
    download = Storage.download

    def recording(self: Storage, loc: Location, dest: Path) -> Path:
        fetched.append(loc.name)
        return download(self, loc, dest)

    monkeypatch.setattr(Storage, "download", recording)
    return fetched


def test_an_empty_model_has_the_structure_and_no_weights(tiny_models: dict[str, Path]) -> None:
    empty, _ = load_mtp_model(str(tiny_models["base"]), Storage(), n_heads=3, head_type="linear", empty=True)
    full, _ = load_mtp_model(str(tiny_models["base"]), Storage(), n_heads=3, head_type="linear")
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in full.state_dict().items()}
    assert all(p.is_meta for p in empty.parameters())
    for (name, buffer), (_, expected) in zip(empty.named_buffers(), full.named_buffers(), strict=True):
        assert torch.equal(buffer, expected), name  # computed, not loaded: real values already


def test_an_empty_model_from_s3_downloads_no_weights(
    tiny_models: dict[str, Path], s3_storage: Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3_storage.upload(tiny_models["base"], parse_uri(f"s3://{s3_bucket}/base"))
    fetched: list[str] = []
    download = Storage.download
    monkeypatch.setattr(
        Storage, "download", lambda self, loc, dest: fetched.append(loc.name) or download(self, loc, dest)
    )
    model, tokenizer = load_mtp_model(f"s3://{s3_bucket}/base", s3_storage, 2, "block", empty=True)
    assert all(p.is_meta for p in model.parameters()) and len(tokenizer) > 0
    assert "config.json" in fetched and not [name for name in fetched if name.endswith(".safetensors")]


@pytest.fixture
def mismatched(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Reference models that cannot train with the tiny base: another vocabulary size, another tokenizer."""
    other_size = tmp_path / "other-size"
    shutil.copytree(tiny_models["ref"], other_size)
    config = json.loads((other_size / "config.json").read_text())
    (other_size / "config.json").write_text(json.dumps({**config, "vocab_size": 600}))
    build_tiny_tokenizer(vocab_size=600).save_pretrained(other_size)

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_models["ref"], other_tokenizer)
    spec = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two tokens swapped
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(spec))
    return {"size": other_size, "tokenizer": other_tokenizer}


def base_vocabulary(tiny_models: dict[str, Path]) -> int:
    return json.loads((tiny_models["base"] / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("size", "paths.models.ref ({ref}) (a vocabulary of 600, a tokenizer of 600 tokens) does not match "
                 "paths.models.base ({base}) (a vocabulary of {size}, a tokenizer of {size} tokens): the reference "
                 "model must share the base model's vocabulary"),
        ("tokenizer", "the tokenizers differ; the reference model must share the base model's tokenizer"),
    ],
)  # fmt: skip
def test_models_that_cannot_train_together_are_refused_by_validate_and_by_train(
    kind: str, expected: str, mismatched: dict[str, Path], tiny_models: dict[str, Path], run_files
) -> None:
    ref, base = mismatched[kind], tiny_models["base"]
    message = expected.format(ref=ref, base=base, size=base_vocabulary(tiny_models))
    config, recipe = run_files("rho1-wmtp", **{"paths.models.ref": str(ref)})
    runner = CliRunner(env={"COLUMNS": "400"})

    validated = runner.invoke(app, ["validate", "-c", str(config), "-r", str(recipe)])
    assert validated.exit_code == ExitCode.BAD_INPUT
    assert message in " ".join(validated.output.split())
    assert "MISMATCH" in validated.output

    trained = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe)])
    assert trained.exit_code == ExitCode.BAD_INPUT
    assert message in " ".join(trained.output.split())


def test_models_that_fit_pass_and_the_check_reads_no_weights(
    tiny_models: dict[str, Path], s3_storage: Storage, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for role in ("base", "ref", "rm"):
        s3_storage.upload(tiny_models[role], parse_uri(f"s3://{s3_bucket}/{role}"))
    fetched: list[str] = []
    download = Storage.download
    monkeypatch.setattr(
        Storage, "download", lambda self, loc, dest: fetched.append(loc.name) or download(self, loc, dest)
    )
    models = ModelPaths(**{role: f"s3://{s3_bucket}/{role}" for role in ("base", "ref", "rm")})
    assert vocabulary_problems(models, ["ref", "rm"], s3_storage) == []
    assert fetched and not [name for name in fetched if name.endswith(".safetensors")]
