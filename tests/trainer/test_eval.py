"""`wmtp eval`: the pass@k estimator, the tasks' tests, the sandbox, prompting instruct models and the command
(decoding itself: test_decoding.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import mlflow
import pytest
import torch
import typer
from typer.testing import CliRunner

from wmtp import contract
from wmtp.checkpoint import CheckpointStore, FileRecord
from wmtp.cli import app
from wmtp.config import ConfigError, EvalSettings
from wmtp.eval import landlock
from wmtp.eval.command import boolean, headline
from wmtp.eval.prompts import CHAT_REQUEST, Prompting, code_block
from wmtp.eval.runner import TRAINING_RUN_TAG, log_to_mlflow, summary
from wmtp.eval.sandbox import Limits, run_program
from wmtp.eval.scoring import pass_at_k
from wmtp.eval.tasks import BUNDLED, TASKS, humaneval, humaneval_path, mbpp
from wmtp.models import MTPModel, load_tokenizer
from wmtp.reporting import Termination, read_termination
from wmtp.storage import Storage, parse_uri

runner = CliRunner(env={"COLUMNS": "200"})
needs_landlock = pytest.mark.skipif(landlock.abi() == 0, reason="the kernel has no Landlock")


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 0, 1, 0.0),
        (5, 5, 1, 1.0),
        (5, 2, 1, 0.4),  # c/n
        (5, 2, 2, 0.7),  # 1 − C(3,2)/C(5,2) = 1 − 3/10
        (10, 1, 5, 0.5),  # 1 − C(9,5)/C(10,5) = 1 − 126/252
        (3, 1, 3, 1.0),  # every draw of 3 includes the one correct sample
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_refuses_impossible_counts() -> None:
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail() -> None:
    problems = humaneval(str(humaneval_path()), Storage())[:4]
    assert len(humaneval(str(humaneval_path()), Storage())) == 164
    for problem in problems:
        assert run_program(problem.solution(problem.canonical), problem.test).passed, problem.task_id
        wrong = run_program(problem.solution("    return None\n"), problem.test)
        assert (wrong.passed, wrong.reason) == (False, "failed"), problem.task_id


MBPP_FULL = {
    "task_id": 11,
    "text": "Write a python function to remove first and last occurrence of a given character from the string.",
    "code": "def remove_Occ(s,ch):\n    s = s.replace(ch, '', 1)\n    return s[::-1].replace(ch, '', 1)[::-1]",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
    ],
    "test_setup_code": "",
    "challenge_test_list": [],
}
MBPP_SANITIZED = {
    "source_file": "Benchmark Questions Verification V2.ipynb",
    "task_id": 2,
    "prompt": "Write a function to find the shared elements from the given two lists.",
    "code": "def similar_elements(test_tup1, test_tup2):\n  return tuple(set(test_tup1) & set(test_tup2))",
    "test_imports": ["import math"],
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert math.isfinite(1.0)",
    ],
}


@pytest.mark.parametrize("record", [MBPP_FULL, MBPP_SANITIZED], ids=["full", "sanitized"])
def test_mbpp_canonical_solutions_pass_and_wrong_ones_fail(record: dict, tmp_path: Path) -> None:
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (problem,) = mbpp(str(path), Storage())
    assert problem.task_id == f"MBPP/{record['task_id']}"
    assert run_program(problem.solution(problem.canonical), problem.test).passed
    assert not run_program(problem.solution("def unrelated():\n    pass"), problem.test).passed


def test_the_sandbox_stops_an_infinite_loop_and_a_memory_hog() -> None:
    assert run_program("while True:\n    pass\n", limits=Limits(timeout_s=1)).reason == "timeout"
    assert run_program("x = bytearray(8 << 30)\n", limits=Limits(memory_mb=512)).reason == "memory"


@needs_landlock
def test_the_sandbox_confines_writes_network_and_signals(tmp_path: Path) -> None:
    outside = tmp_path / "escaped.txt"
    escaped = run_program(f"open({str(outside)!r}, 'w').write('x')\n")
    assert (escaped.passed, outside.exists()) == (False, False) and "Permission denied" in escaped.detail
    assert run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'\n").passed
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n").passed
    assert not run_program(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)\n").passed


def test_the_sandbox_sees_none_of_the_trainers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    assert run_program("import os\nassert 'AWS_SECRET_ACCESS_KEY' not in os.environ\n").passed


def _tiny_mtp(tiny_models: dict[str, Path], perturb: float) -> tuple[MTPModel, object]:
    torch.manual_seed(3)
    model = MTPModel.from_pretrained(tiny_models["base"], n_heads=4, head_type="block")
    with torch.no_grad():
        for p in model.extra_heads.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval(), load_tokenizer(tiny_models["base"])


@pytest.fixture
def final_model(tiny_models: dict[str, Path], tmp_path: Path) -> Path:
    model, tokenizer = _tiny_mtp(tiny_models, 0.05)
    directory = tmp_path / "final"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_eval_command_reports_scores_speed_and_every_problem(
    final_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mbpp_file = tmp_path / "mbpp.jsonl"
    mbpp_file.write_text(json.dumps(MBPP_FULL) + "\n" + json.dumps(MBPP_SANITIZED) + "\n")
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(final_model), "--tasks", "humaneval,mbpp", "--dataset", f"mbpp={mbpp_file}",
            "--limit", "2", "--samples", "2", "--k", "1,2", "--max-new-tokens", "8", "--speed-prompts", "2",
            "--batch-size", "3", "--output", str(report)]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="wmtp"):
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tasks"] == {
        "humaneval": {"problems": 2, "pass@1": 0.0, "pass@2": 0.0},
        "mbpp": {"problems": 2, "pass@1": 0.0, "pass@2": 0.0},
    }
    speed = summary["speed"]
    assert speed["identical"] is True and speed["mean_accepted"] >= 1.0 and speed["rounds"] == 3
    assert speed["speedup_suspect"] is False and speed["passes"]["greedy"] == speed["tokens"]
    assert summary["samples"] == 2 and summary["decoding"]["batch_size"] == 3 and summary["decoding"]["tokens"] > 0
    # Off a terminal, progress is plain log lines; the table names the samples and the sandbox.
    assert "progress: 4/4 problems" in caplog.text
    assert f"2 samples per problem; programs ran in the sandbox: {summary['sandbox']}" in result.output
    written = json.loads(report.read_text())
    assert "rlimit-as" in written["sandbox"]  # the mechanisms that held the programs, as the runs reported them
    problems = written["problems"]
    assert [p["task_id"] for p in problems["mbpp"]] == ["MBPP/11", "MBPP/2"]
    assert all(p["n"] == 2 and p["correct"] == 0 for task in problems.values() for p in task)


CHAT = (
    "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ("```python\nx = 1\n```", "x = 1\n"),
        ("Sure:\n```\nx = 1\n```\nand also\n```python\ny = 2\n```", "x = 1\n"),  # the first block
        ("```Python3\nx = 1\n```", "x = 1\n"),
        ("Here:\n```py\nx = 1\nfor", "x = 1\nfor"),  # cut off by max_new_tokens: what there is
        ("    return x\n", "    return x\n"),  # no block: the whole answer
    ],
)
def test_the_code_of_an_answer_is_its_first_code_block(answer: str, code: str) -> None:
    assert code_block(answer) == code


def test_an_instruct_model_is_asked_in_its_chat_template_and_scored_on_its_code(
    final_model: Path, tmp_path: Path
) -> None:
    tokenizer = load_tokenizer(final_model)
    problem = humaneval(str(humaneval_path()), Storage())[0]
    with pytest.raises(ConfigError, match="no chat template"):
        Prompting(tokenizer, chat_template=True)
    tokenizer.chat_template = CHAT
    prompting = Prompting(tokenizer, chat_template=True, extract_code=True)
    assert tokenizer.decode(prompting.ids(problem)) == f"<|user|>{CHAT_REQUEST.format(problem.prompt)}\n<|assistant|>"
    assert prompting.stop(problem) == ()  # "\ndef " would end an answer before its code
    answer = f"Sure! Here is the function:\n\n```python\n{problem.prompt}{problem.canonical}```\n\nIt works."
    assert run_program(problem.solution(prompting.completion(answer)), problem.test).passed
    assert not run_program(problem.solution(answer), problem.test).passed  # the prose is not Python

    tokenizer.save_pretrained(final_model)
    report = tmp_path / "report.json"
    args = ["eval", "--model", str(final_model), "--limit", "1", "--max-new-tokens", "4", "--speed-prompts", "0",
            "--chat-template", "True", "--extract-code", "true", "--output", str(report)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["problems"]["humaneval"][0]["n"] == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--k", "10"], "k 10 is more than samples 1"),
        (["--k", "0"], "--k: Input should be greater than or equal to 1"),
        (["--tasks", "mbpp"], "datasets.mbpp is required: there is no bundled copy of mbpp"),
        (["--tasks", "gsm8k"], "--tasks: Input should be 'humaneval' or 'mbpp'"),
        (["--program-timeout", "0"], "--program-timeout: Input should be greater than or equal to 0.1"),
        (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1"),
    ],
)
def test_eval_command_refuses_bad_options_in_one_line(final_model: Path, args: list[str], says: str) -> None:
    result = runner.invoke(app, ["eval", "--model", str(final_model), "--speed-prompts", "0", *args])
    assert result.exit_code == 2 and says in result.output and result.output.count("\n") == 1, result.output


def test_every_eval_setting_is_a_flag_of_wmtp_eval_with_its_default() -> None:
    # spec.eval renders each setting as the flag of its name (wmtp_operator.render.eval_args).
    command = next(c for c in typer.main.get_command(app).commands.values() if c.name == "eval")
    flags = {option: param for param in command.params for option in param.opts}
    for name, field in EvalSettings.model_fields.items():
        flag = "--dataset" if name == "datasets" else f"--{name.replace('_', '-')}"
        default = flags[flag].default
        if isinstance(field.get_default(call_default_factory=True), list):
            default = default.split(",")
            assert default == [str(v) for v in field.get_default(call_default_factory=True)], name
        elif isinstance(field.get_default(), bool):  # a value, as spec.eval renders it: --chat-template True
            assert boolean(default, flag) is field.get_default(), name
        elif name != "datasets":
            assert default == field.get_default(), name


def test_eval_metrics_go_to_the_training_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    training = client.create_run(client.create_experiment("wmtp")).info.run_id
    report = {"model": "s3://b/final", "tasks": {"humaneval": {"problems": 3, "pass@1": 0.25}},
              "speed": {"speedup": 1.5, "mean_accepted": 2.0}}  # fmt: skip
    assert log_to_mlflow(report, uri, training, "wmtp") == training
    logged = client.get_run(training).data.metrics
    assert logged == {"eval/humaneval/pass_at_1": 0.25, "eval/humaneval/problems": 3.0,
                      "eval/speculative/speedup": 1.5, "eval/speculative/mean_accepted": 2.0}  # fmt: skip


def test_the_contracts_eval_tasks_are_the_ones_wmtp_eval_scores() -> None:
    assert list(TASKS) == list(contract.EVAL_TASKS) and tuple(BUNDLED) == contract.EVAL_BUNDLED


def test_eval_logs_to_the_training_run_its_final_model_names_and_leaves_its_results(
    final_model: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    training = client.create_run(client.create_experiment("wmtp")).info.run_id
    records = {p.name: FileRecord(p.stat().st_size) for p in final_model.iterdir()}
    store = CheckpointStore(str(tmp_path), Storage())
    store.mark_committed(parse_uri(str(final_model)), records, mlflow_run_id=training)
    words = tmp_path / "termination-log"
    args = ["eval", "--model", str(final_model), "--limit", "1", "--max-new-tokens", "4", "--speed-prompts", "1"]
    result = runner.invoke(app, args, env={"MLFLOW_TRACKING_URI": uri, "WMTP_TERMINATION_LOG": str(words)})
    assert result.exit_code == 0, result.output
    assert client.get_run(training).data.metrics["eval/humaneval/problems"] == 1.0
    ended = read_termination(words)
    assert ended is not None and (ended.reason, ended.exit_code) == (contract.STOP_SUCCEEDED, 0)
    assert ended.eval["tasks"] == {"humaneval": {"problems": 1, "pass@1": 0.0}}
    assert ended.eval["mlflow_run_id"] == training and ended.eval["speed"]["identical"] is True
    assert set(ended.eval["speed"]) == set(contract.EVAL_SPEED_FIELDS)
    assert ended.message.startswith("humaneval pass@1 0.000, self-speculative decoding ")


def test_a_training_run_the_store_lost_gets_a_new_eval_run_that_names_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    report = {"model": "s3://b/final", "tasks": {"humaneval": {"problems": 3, "pass@1": 0.25}}}
    logged = log_to_mlflow(report, uri, "0123456789abcdef0123456789abcdef", "wmtp")
    assert logged is not None and logged != "0123456789abcdef0123456789abcdef"
    run = mlflow.MlflowClient(uri).get_run(logged)
    assert run.data.tags[TRAINING_RUN_TAG] == "0123456789abcdef0123456789abcdef"
    assert run.data.metrics["eval/humaneval/pass_at_1"] == 0.25


def test_the_termination_message_carries_the_results_and_stays_within_what_the_kubelet_keeps() -> None:
    report = {"tasks": {"humaneval": {"problems": 164, "pass@1": 0.123456, "pass@10": 0.5}},
              "speed": {"speedup": 1.75, "mean_accepted": 2.0, "identical": True, "heads": 4,
                        "tokens": 900}}  # fmt: skip
    results = summary(report)
    assert results["tasks"] == {"humaneval": {"problems": 164, "pass@1": 0.1235, "pass@10": 0.5}}
    assert results["speed"] == {"speedup": 1.75, "mean_accepted": 2.0, "identical": True}
    assert "SUSPECT" not in headline(report)
    assert "SUSPECT" in headline({**report, "speed": {**report["speed"], "speedup_suspect": True}})
    back = Termination.from_json(Termination(contract.STOP_SUCCEEDED, 0, headline(report), eval=results).to_json())
    assert back is not None and back.eval == results
    huge = summary({"tasks": {f"task{i}": {f"pass@{k}": 0.5 for k in range(1, 100)} for i in range(100)}})
    assert all(len(scores) == contract.MAX_EVAL_SCORES + 1 for scores in huge["tasks"].values())
    data = Termination(contract.STOP_SUCCEEDED, 0, "x" * 5000, eval=huge).to_json()
    assert len(data) <= contract.TERMINATION_MESSAGE_MAX
    cut = json.loads(data)
    assert contract.TERMINATION_EVAL not in cut and "did not fit the termination message" in cut["message"]


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--tasks", "mbpp"], 2, "datasets.mbpp is required"),
        (["--k", "one"], 2, "--k: comma-separated integers"),
        (["--model", "/nowhere/final"], 2, "/nowhere/final"),
        (["--chat-template", "maybe"], 2, "--chat-template: true or false, not 'maybe'"),
        (["--chat-template", "true"], 2, "--chat-template: the model's tokenizer has no chat template"),
    ],
)
def test_a_failing_eval_leaves_a_one_line_failure_and_its_exit_code(
    final_model: Path, tmp_path: Path, args: list[str], code: int, says: str
) -> None:
    words = tmp_path / "termination-log"
    result = runner.invoke(
        app, ["eval", "--model", str(final_model), "--speed-prompts", "0", *args],
        env={"WMTP_TERMINATION_LOG": str(words)},
    )  # fmt: skip
    assert result.exit_code == code, result.output
    ended = read_termination(words)
    assert ended is not None and (ended.reason, ended.exit_code, ended.eval) == (contract.STOP_FAILED, code, None)
    assert says in ended.message and "\n" not in ended.message
