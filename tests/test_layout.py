"""The layering the import-linter contracts in pyproject.toml enforce, and what keeps those contracts complete."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import wmtp

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in config["contracts"]}


def test_the_operators_forbidden_list_names_every_trainer_module_but_contract_and_config() -> None:
    contract = _contracts()["The operator imports only the trainer's contract and config"]
    modules = {f"wmtp.{m.name}" for m in pkgutil.iter_modules(wmtp.__path__) if not m.name.startswith("_")}
    assert set(contract["forbidden_modules"]) == modules - {"wmtp.contract", "wmtp.config"}


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    paths = [str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in done.stdout
