"""Hostile input into the trainer's commands: YAML bombs of several shapes into `wmtp validate` and `wmtp pull
--spec`, and expansion attempts in recipe values, names and resume. Each row asserts the outcome: refused with
one bounded line, quickly and in bounded memory, and no secret ever expanded into a value or a message.
(Traversal, symlinks and tampered state: test_hostile_pull.py and test_storage.py.)"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from support.runs import write_run_files
from wmtp.cli import app
from wmtp.config import load_recipe
from wmtp.contract import RENDERED_MARKER

runner = CliRunner(env={"COLUMNS": "200"})
SECRET = "s3cr3t-value-never-shown"


def laughs(width: int = 9, depth: int = 9) -> str:
    """The billion laughs: `depth` levels of lists of `width` aliases of the level below."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def mapping_bomb() -> str:
    lines = ["m0: &m0 {a: x, b: x, c: x, d: x, e: x, f: x, g: x, h: x}"]
    for i in range(1, 9):
        keys = ", ".join(f"{k}: *m{i - 1}" for k in "abcdefgh")
        lines.append(f"m{i}: &m{i} {{{keys}}}")
    return "\n".join(lines) + "\n"


def merge_bomb() -> str:
    lines = ["k0: &k0 {a0: 1, b0: 2}"]
    for i in range(1, 10):
        lines.append(f"k{i}: &k{i} {{<<: [*k{i - 1}], x{i}: [*k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}, *k{i - 1}]}}")
    return "\n".join(lines) + "\n"


BOMBS = {
    "billion laughs": (laughs(), "alias bomb"),
    "wide laughs": (laughs(width=400, depth=3), "alias bomb"),
    "mapping bomb": (mapping_bomb(), "alias bomb"),
    "merge-key bomb": (merge_bomb(), "alias bomb"),
    "recursive alias": ("a: &a [1, *a]\n", "refers to itself"),
    "deep flow nesting": ("[" * 500_000 + "]" * 500_000, "nested more than 100 levels deep"),
    "deep block nesting": ("".join(f"{' ' * i}k:\n" for i in range(1000)) + " " * 1000 + "k: 1\n", "nested more"),
    "oversized": ("x: " + "y" * 2_000_000 + "\n", "more than the 1048576"),
    "control characters": ("a: \x1b[31mred\n", "not valid YAML"),
}


def bounded_run(args: list[str]) -> tuple[object, float, int]:
    """The CLI result, its seconds and its peak Python allocation in bytes."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = runner.invoke(app, args)
        return result, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("document", ["config", "recipe"])
@pytest.mark.parametrize("shape", list(BOMBS))
def test_a_yaml_bomb_into_validate_is_refused_fast_in_bounded_memory(
    tmp_path: Path, tiny_models: dict[str, Path], document: str, shape: str
) -> None:
    text, says = BOMBS[shape]
    config, recipe = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2)
    (config if document == "config" else recipe).write_text(text)

    result, seconds, peak = bounded_run(["validate", "-c", str(config), "-r", str(recipe)])

    assert result.exit_code == 2, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and says in problems[0] and len(problems[0]) < 600, result.stderr
    assert seconds < 10 and peak < 64 << 20, (seconds, peak)


@pytest.mark.parametrize("shape", list(BOMBS))
def test_a_yaml_bomb_as_pull_spec_is_refused_fast_in_bounded_memory(tmp_path: Path, shape: str) -> None:
    text, says = BOMBS[shape]
    spec = tmp_path / "pull.yaml"
    spec.write_text(text)

    result, seconds, peak = bounded_run(["pull", "--spec", str(spec)])

    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and says in result.stderr and len(result.stderr) < 600, result.stderr
    assert seconds < 10 and peak < 64 << 20, (seconds, peak)


EXPANSIONS = [
    "${AWS_SECRET_ACCESS_KEY}",
    "${AWS_SECRET_ACCESS_KEY:-x}",
    "$(AWS_SECRET_ACCESS_KEY)",
    "$AWS_SECRET_ACCESS_KEY",
]


@pytest.mark.parametrize("value", EXPANSIONS)
def test_a_rendered_recipe_keeps_expansion_attempts_literal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    recipe = {
        "run": {"name": "r", "tags": {"owner": value, value: "key"}},
        "train": {"algo": "baseline-mtp"},
        "data": {"sources": [{"name": "humaneval"}]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(RENDERED_MARKER + yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    assert loaded.run.tags == {"owner": value, value: "key"}
    assert SECRET not in loaded.model_dump_json()


# A user's own file expands ${VAR} by design; `$(VAR)` (Kubernetes' syntax) is never expanded by the trainer.
@pytest.mark.parametrize(
    ("rendered", "field", "value"),
    [
        (True, "run.name", "${AWS_SECRET_ACCESS_KEY}"),
        (True, "data.sources", [{"name": "${AWS_SECRET_ACCESS_KEY}"}]),
        (True, "data.sources", [{"name": "$(AWS_SECRET_ACCESS_KEY)"}]),
        (False, "run.name", "$(AWS_SECRET_ACCESS_KEY)"),
        (False, "data.sources", [{"name": "$(AWS_SECRET_ACCESS_KEY)"}]),
    ],
)
def test_an_expansion_attempt_in_a_name_is_refused_without_showing_the_secret(
    tmp_path: Path, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, rendered: bool, field: str,
    value: object,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    config, recipe = write_run_files(tmp_path, tiny_models, "baseline-mtp", steps=2)
    data = yaml.safe_load(recipe.read_text())
    section, key = field.split(".")
    data[section][key] = value
    recipe.write_text((RENDERED_MARKER if rendered else "") + yaml.safe_dump(data))

    result = runner.invoke(app, ["train", "-c", str(config), "-r", str(recipe), "--log-level", "warning"])

    assert result.exit_code == 2
    assert field in result.stderr and SECRET not in result.output


def test_validate_names_the_credential_variables_for_a_tracking_uri_with_a_password(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    """Not "unreachable" (a port where nothing listens): the URI itself is the problem, and its password is never
    shown."""
    config, recipe = write_run_files(
        tmp_path, tiny_models, "baseline-mtp", steps=2, **{"mlflow.tracking_uri": f"http://alice:{SECRET}@127.0.0.1:9"}
    )
    result = runner.invoke(app, ["validate", "-c", str(config), "-r", str(recipe)])

    assert result.exit_code == 2, result.output
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and "MLFLOW_TRACKING_USERNAME" in problems[0], result.stderr
    assert "unreachable" not in result.output.lower() and SECRET not in result.output
