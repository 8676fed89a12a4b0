"""`wmtp train` and `wmtp validate` as a user meets them: every ordinary mistake is one line naming the file, field
or URI, with the exit code that classifies it (`wmtp.contract.ExitCode`), and never a traceback."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from support.denying import denying_endpoint
from support.runs import HUMANEVAL, write_run_files
from wmtp.cli import app, one_line
from wmtp.contract import ExitCode
from wmtp.distributed import TORCHRUN_ENV
from wmtp.storage import Storage

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that table cells do not wrap


def test_validate_accepts_a_runnable_pair_and_shows_what_would_run(run_files) -> None:
    config, recipe = run_files("rho1-wmtp")
    result = runner.invoke(app, ["validate", "--config", str(config), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    for item in ("base model", "reference model", "dataset humaneval (humaneval)", "rho1-wmtp", "found"):
        assert item in result.output
    assert "first 164 records: 164 kept" in result.output
    assert "checkpoints" in result.output and "will be created in" in result.output


def test_validate_lists_every_problem_at_once(run_files, tmp_path: Path) -> None:
    config_path, recipe_path = run_files("critic-wmtp")
    config = yaml.safe_load(config_path.read_text())
    config["paths"]["models"]["rm"] = str(tmp_path / "no-such-rm")
    config["paths"]["datasets"]["humaneval"] = str(tmp_path / "no-such.jsonl")
    config_path.write_text(yaml.safe_dump(config))

    result = runner.invoke(app, ["validate", "--config", str(config_path), "--recipe", str(recipe_path)])

    assert result.exit_code == ExitCode.BAD_INPUT
    assert "2 problem(s)" in result.output
    assert "reward model" in result.output and "no-such-rm" in result.output
    assert "dataset humaneval" in result.output and "no-such.jsonl" in result.output


def test_validate_reports_problems_in_both_files(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("paths: {models: {base: /m}}\nseed: many\n")
    (tmp_path / "r.yaml").write_text("run: {name: r}\ntrain: {algo: nope}\ndata: {sources: [{name: x}]}\n")
    result = runner.invoke(app, ["validate", "-c", str(tmp_path / "c.yaml"), "-r", str(tmp_path / "r.yaml")])
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "seed" in result.output and "train.algo" in result.output


def test_one_line_joins_a_report_and_clips_it() -> None:
    assert one_line("r.yaml: 2 problem(s)\n  a: x\n  b: y\n") == "r.yaml: 2 problem(s): a: x; b: y"
    assert len(one_line("x" * 100_000)) <= 2000


# ----------------------------------------------------------------------------- bad input, one line each


@dataclass
class Ctx:
    """One row's run: its config and recipe (as data, or raw bytes), and the endpoints it may point at."""

    tmp: Path
    config: dict[str, Any]
    recipe: dict[str, Any]
    s3: str
    bucket: str
    storage: Storage
    denied: str
    closed: str
    recipe_bytes: bytes | None = None
    args: list[str] = field(default_factory=list)

    def set(self, dotted: str, value: Any) -> None:
        doc = self.config if dotted.split(".")[0] in ("paths", "s3", "mlflow", "seed") else self.recipe
        *parents, leaf = dotted.split(".")
        for key in parents:
            doc = doc.setdefault(key, {})
        doc[leaf] = value

    def dataset(self, data: bytes, name: str = "bad.jsonl") -> str:
        path = self.tmp / name
        path.write_bytes(data)
        self.set("paths.datasets.humaneval", str(path))
        return str(path)

    def put(self, key: str, data: bytes) -> str:
        self.storage.backends["s3"].client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return f"s3://{self.bucket}/{key}"


def bomb() -> bytes:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    return "\n".join(lines).encode()


CONTEST_NO_PYTHON = json.dumps({"description": "d", "solutions": {"language": [2], "solution": ["int main(){}"]}})

# (id, commands, set-up, exit code, what the line must name: formatted with the Ctx's fields)
Row = tuple[str, tuple[str, ...], Callable[[Ctx], Any], int, str]
ROWS: list[Row] = [
    ("config missing", ("train", "validate"), lambda c: c.args.extend(["-c", str(c.tmp / "nope.yaml")]), 2,
     "nope.yaml: file not found"),
    ("recipe not UTF-8", ("train", "validate"), lambda c: setattr(c, "recipe_bytes", b"run: {name: caf\xe9}\n"), 2,
     "not UTF-8 text (byte 15)"),
    ("recipe alias bomb", ("train", "validate"), lambda c: setattr(c, "recipe_bytes", bomb()), 2, "alias bomb"),
    ("unknown key", ("train", "validate"), lambda c: c.set("train.foo", 1), 2, "train.foo: unknown key"),
    ("lr inf", ("train", "validate"), lambda c: c.set("optim.lr", float("inf")), 2, "optim.lr"),
    ("betas out of range", ("train", "validate"), lambda c: c.set("optim.betas", [2, -1]), 2, "optim.betas.0"),
    ("dataset missing", ("train", "validate"), lambda c: c.set("paths.datasets.humaneval", str(c.tmp / "x.jsonl")),
     2, "{tmp}/x.jsonl: no such file or folder"),
    ("dataset bad JSON", ("train", "validate"), lambda c: c.dataset(b'{"prompt": "p", "canonical_solution": "s"}\n{'),
     2, "{tmp}/bad.jsonl:2: not valid JSON"),
    ("record missing field", ("train", "validate"), lambda c: c.dataset(b'{"prompt": "p"}\n'), 2,
     "bad.jsonl:1: humaneval record: missing field 'canonical_solution'"),
    ("dataset empty folder", ("train", "validate"), lambda c: (c.tmp / "d").mkdir() or c.set(
        "paths.datasets.humaneval", str(c.tmp / "d")), 2, "{tmp}/d: no .jsonl, .jsonl.gz, .parquet files"),
    ("no accepted language", ("train", "validate"), lambda c: (c.dataset(CONTEST_NO_PYTHON.encode()),
        c.set("data.sources", [{"name": "humaneval", "format": "codecontests"}])), 2, "no_accepted_language"),
    ("base model missing", ("train", "validate"), lambda c: c.set("paths.models.base", str(c.tmp / "no-model")), 2,
     "{tmp}/no-model"),
    ("base model not a model", ("train",), lambda c: (c.tmp / "m").mkdir() or c.set("paths.models.base",
        str(c.tmp / "m")), 2, "paths.models.base ({tmp}/m): cannot read its config or tokenizer"),
    ("dataset bucket missing", ("train", "validate"), lambda c: c.set("paths.datasets.humaneval",
        "s3://no-such-bucket-here/he.jsonl"), 3, "s3://no-such-bucket-here/he.jsonl: the bucket does not exist"),
    ("dataset key missing", ("train", "validate"), lambda c: c.set("paths.datasets.humaneval",
        f"s3://{c.bucket}/nope.jsonl"), 2, "s3://{bucket}/nope.jsonl: no such object or prefix"),
    ("S3 record malformed", ("train", "validate"), lambda c: c.set("paths.datasets.humaneval",
        c.put("d/he.jsonl", b'{"prompt": 1, "canonical_solution": "s"}\n')), 2,
     "s3://{bucket}/d/he.jsonl:1: humaneval record: field 'prompt' is int"),
    ("checkpoint bucket missing", ("train", "validate"), lambda c: c.set("paths.checkpoints.base_path",
        "s3://no-such-ckpt-bucket/runs"), 3, "s3://no-such-ckpt-bucket/runs"),
    ("S3 endpoint unreachable", ("train", "validate"), lambda c: (c.set("s3.endpoint_url", c.closed),
        c.set("paths.models.base", "s3://models/base")), 5, "s3://models/base: cannot reach the S3 endpoint"),
    ("S3 access denied", ("train", "validate"), lambda c: (c.set("s3.endpoint_url", c.denied),
        c.set("paths.datasets.humaneval", "s3://data/he.jsonl")), 4, "access denied"),
    ("S3 endpoint not a URL", ("train",), lambda c: (c.set("s3.endpoint_url", "not a url"),
        c.set("paths.datasets.humaneval", "s3://data/he.jsonl")), 2, "s3.endpoint_url"),
    ("batch larger than the data", ("train",), lambda c: c.set("data.batch_size", 4096), 2,
     "fewer than data.batch_size 4096"),
    ("resume step missing", ("train",), lambda c: c.args.extend(["--resume", "step_7"]), 2, "--resume step_7"),
    ("resume with a shell expansion", ("train",), lambda c: c.args.extend(["--resume", "/$(AWS_SECRET_ACCESS_KEY)"]),
     2, "/$(AWS_SECRET_ACCESS_KEY)"),
    ("MLflow unreachable", ("validate",), lambda c: c.set("mlflow.tracking_uri", c.closed), 5,
     "cannot reach the MLflow server"),
    ("MLflow denied", ("validate",), lambda c: c.set("mlflow.tracking_uri", c.denied), 4, "access denied (HTTP 403)"),
]  # fmt: skip
CASES = [pytest.param(command, setup, code, says, id=f"{command}: {row}")
         for row, commands, setup, code, says in ROWS for command in commands]  # fmt: skip


def closed_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def denied() -> Iterator[str]:
    with denying_endpoint() as url:
        yield url


@pytest.fixture
def fast_failing_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard retries still run against a closed port; only their sleeps are cut."""
    import botocore.retries.standard

    monkeypatch.setattr(botocore.retries.standard.ExponentialBackoff, "delay_amount", lambda self, ctx: 0)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-printed-secret")


@pytest.mark.usefixtures("fast_failing_s3")
@pytest.mark.parametrize(("command", "setup", "code", "says"), CASES)
def test_bad_input_is_one_line_naming_it_with_its_exit_code(
    command: str, setup: Callable[[Ctx], Any], code: int, says: str, tmp_path: Path,
    tiny_models: dict[str, Path], s3_storage: Storage, s3_bucket: str, s3_endpoint: str, denied: str,
) -> None:  # fmt: skip
    config_path, recipe_path = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2)
    ctx = Ctx(tmp_path, yaml.safe_load(config_path.read_text()), yaml.safe_load(recipe_path.read_text()),
              s3_endpoint, s3_bucket, s3_storage, denied, closed_endpoint())  # fmt: skip
    ctx.set("s3.endpoint_url", s3_endpoint)
    setup(ctx)
    config_path.write_text(yaml.safe_dump(ctx.config))
    recipe_path.write_bytes(ctx.recipe_bytes or yaml.safe_dump(ctx.recipe).encode())
    args = [command, "-c", str(config_path), "-r", str(recipe_path), "--log-level", "warning", *ctx.args]

    result = runner.invoke(app, args)

    expected = says.format(tmp=tmp_path, bucket=s3_bucket)
    stderr = result.stderr
    assert result.exit_code == code, stderr
    assert "Traceback" not in result.output and "never-printed-secret" not in result.output
    if command == "train":
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and expected in last, stderr
        assert stderr.count("error: ") == 1
    else:
        problems = [line for line in stderr.splitlines() if line.startswith("  - ")]
        assert f"{len(problems)} problem(s)" in stderr, stderr
        assert any(expected in line for line in problems), stderr
    assert all(len(line) <= 2100 for line in stderr.splitlines())


def test_the_traceback_is_logged_only_at_debug(
    tmp_path: Path, tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config_path, recipe_path = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2)
    (tmp_path / "m").mkdir()
    config_path.write_text(config_path.read_text().replace(str(tiny_models["base"]), str(tmp_path / "m")))
    args = ["train", "-c", str(config_path), "-r", str(recipe_path)]
    for level, traced in (("info", False), ("debug", True)):
        caplog.clear()
        result = runner.invoke(app, [*args, "--log-level", level])
        assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert any(record.exc_info for record in caplog.records) is traced, level


def test_pull_alias_bomb_spec_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(bomb())
    result = runner.invoke(app, ["pull", "--spec", str(spec)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "alias bomb" in result.stderr


def test_validate_parses_a_folder_of_gzip_and_parquet_shards(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in gzip.decompress(HUMANEVAL.read_bytes()).splitlines()]
    folder = tmp_path / "he"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in records[:80]).encode()))
    pq.write_table(pa.Table.from_pylist(records[80:]), folder / "b.parquet")
    config_path, recipe_path = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2)
    config = yaml.safe_load(config_path.read_text())
    config["paths"]["datasets"]["humaneval"] = str(folder)
    config_path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", "-c", str(config_path), "-r", str(recipe_path)])
    assert result.exit_code == 0, result.output
    assert "2+ shard(s); first 164 records: 164 kept" in result.output


def test_recipe_checkpoint_settings_apply_and_a_flag_beats_them(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    checkpointing = {"save_interval": 2, "keep_last": 1, "save_final": False}
    config, recipe = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=4, checkpointing=checkpointing)

    result = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--keep-last", "2"])

    assert result.exit_code == 0, result.output
    run = tmp_path / "checkpoints" / "test-baseline-mtp"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_step_00000002", "checkpoint_step_00000004"]


@pytest.mark.slow
def test_a_fresh_start_never_overwrites_committed_checkpoints_unless_the_recipe_says_so(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    checkpointing = {"save_interval": 2, "save_final": False}
    config, recipe = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2, checkpointing=checkpointing)
    train = ["train", "-c", str(config), "-r", str(recipe), "--log-level", "warning"]
    assert runner.invoke(app, train).exit_code == 0
    prefix = tmp_path / "checkpoints" / "test-baseline-mtp"
    marker = prefix / "checkpoint_step_00000002" / "COMMITTED"
    written = marker.read_bytes()
    for resume in (["--resume", "never"], []):  # asked for, or nothing to resume: a fresh start either way
        result = runner.invoke(app, [*train, *resume])
        assert result.exit_code == 2, result.output
        assert result.stderr.count("error: ") == 1 and "Traceback" not in result.output
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and str(prefix) in last and "checkpointing.overwrite: true" in last, last
        assert marker.read_bytes() == written
    write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2, checkpointing={**checkpointing, "overwrite": True})
    result = runner.invoke(app, [*train, "--resume", "never"])
    assert result.exit_code == 0, result.output
    assert marker.read_bytes() != written  # the user said so: started over, in the same place


def test_without_an_eval_split_no_eval_metric_is_logged_or_tracked(
    tmp_path: Path, tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    config, recipe = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=4, **{"data.eval_fraction": 0})
    with caplog.at_level("INFO", logger="wmtp"):
        result = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--log-level", "info"])

    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if "eval" in r.getMessage() and "loss=" in r.getMessage()]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'test-baseline-mtp' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("wmtp").experiment_id])
    assert not [key for key in run.data.metrics if key.startswith("eval/")], run.data.metrics
    assert run.data.metrics["data/humaneval/kept"] == 164


@pytest.mark.usefixtures("fast_failing_s3")
@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["convert-native", "{tmp}/no-such-native", "{tmp}/out"], 2, "{tmp}/no-such-native: no such file or folder"),
        (["convert-native", "{tmp}", "{tmp}/out"], 2, "params.json"),
        (["checkpoints", "list", "s3://no-such-bucket-here/run"], 3, "the bucket does not exist"),
        (["checkpoints", "prune", "s3://no-such-bucket-here/run", "--keep", "1"], 3, "the bucket does not exist"),
        (["pull", "s3://no-such-bucket-here/m", "--dest", "{tmp}/d"], 3, "the bucket does not exist"),
    ],
    ids=["convert missing", "convert not native", "list missing bucket", "prune missing bucket", "pull missing bucket"],
)
def test_the_other_commands_fail_in_one_line_too(
    tmp_path: Path, s3_endpoint: str, s3_storage: Storage, monkeypatch: pytest.MonkeyPatch, args: list[str],
    code: int, says: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    result = runner.invoke(app, [arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == code, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and says.format(tmp=tmp_path) in last, result.stderr
    assert "Traceback" not in result.output


def test_a_deliberate_exit_inside_a_reported_block_keeps_its_code() -> None:
    import typer

    from wmtp.cli import reported

    with pytest.raises(typer.Exit) as stop, reported(None):
        raise typer.Exit(ExitCode.PREEMPTED)
    assert stop.value.exit_code == ExitCode.PREEMPTED


@pytest.mark.slow  # two interpreters that import torch
def test_a_torchrun_worker_ends_without_the_interpreters_finalization() -> None:
    """Where torch's caches would tear gloo's threads down after the group closed (a SIGABRT); a process outside
    torchrun returns and finalizes as usual."""
    code = (
        "import atexit; from wmtp.cli import end_worker; atexit.register(print, 'finalized'); "
        "print('ending', flush=True); end_worker(3); print('returned')"
    )
    alone = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    rank_1 = dict(zip(TORCHRUN_ENV, ("1", "2", "1", "127.0.0.1", "29500"), strict=True))
    python = [sys.executable, "-c", code]
    worker = subprocess.run(python, env={**alone, **rank_1}, capture_output=True, text=True)
    assert (worker.returncode, worker.stdout) == (3, "ending\n"), worker.stderr
    single = subprocess.run(python, env=alone, capture_output=True, text=True)
    assert (single.returncode, single.stdout) == (0, "ending\nreturned\nfinalized\n"), single.stderr
