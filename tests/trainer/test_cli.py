from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from wmtp.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that table cells do not wrap


def test_validate_accepts_a_runnable_pair_and_shows_what_would_run(run_files) -> None:
    config, recipe = run_files("rho1-wmtp")
    result = runner.invoke(app, ["validate", "--config", str(config), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    for item in ("base model", "reference model", "dataset humaneval (humaneval)", "rho1-wmtp", "found"):
        assert item in result.output


def test_validate_lists_every_problem_at_once(run_files, tmp_path: Path) -> None:
    config_path, recipe_path = run_files("critic-wmtp")
    config = yaml.safe_load(config_path.read_text())
    config["paths"]["models"]["rm"] = str(tmp_path / "no-such-rm")
    config["paths"]["datasets"]["humaneval"] = str(tmp_path / "no-such.jsonl")
    config_path.write_text(yaml.safe_dump(config))

    result = runner.invoke(app, ["validate", "--config", str(config_path), "--recipe", str(recipe_path)])

    assert result.exit_code == 1
    assert "2 problem(s)" in result.output
    assert "reward model" in result.output and "no-such-rm" in result.output
    assert "dataset humaneval" in result.output and "no-such.jsonl" in result.output


def test_validate_reports_problems_in_both_files(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("paths: {models: {base: /m}}\nseed: many\n")
    (tmp_path / "r.yaml").write_text("run: {name: r}\ntrain: {algo: nope}\ndata: {sources: [{name: x}]}\n")
    result = runner.invoke(app, ["validate", "-c", str(tmp_path / "c.yaml"), "-r", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1
    assert "seed" in result.output and "train.algo" in result.output


def test_validate_reports_an_unreachable_s3_endpoint_as_a_problem(run_files) -> None:
    config_path, recipe_path = run_files("baseline-mtp")
    config = yaml.safe_load(config_path.read_text())
    config["paths"]["models"]["base"] = "s3://bucket/base"
    config["s3"] = {"endpoint_url": "http://127.0.0.1:9", "access_key_id": "x", "secret_access_key": "y"}
    config_path.write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["validate", "-c", str(config_path), "-r", str(recipe_path)])
    assert result.exit_code == 1
    assert "base model: s3://bucket/base" in result.output and "ERROR" in result.output


def test_train_refuses_a_bad_recipe_naming_the_field(run_files) -> None:
    config_path, recipe_path = run_files("baseline-mtp")
    recipe_path.write_text(recipe_path.read_text().replace("max_steps: 30", "max_steps: -1"))
    result = runner.invoke(app, ["train", "-c", str(config_path), "-r", str(recipe_path)])
    assert result.exit_code == 2
    assert "train.max_steps" in result.output
