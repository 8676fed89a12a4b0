"""checkov, a real scanner, over everything the project deploys: the chart (default and namespaced values) and the
objects the operator renders for every example WMTPRun. Zero failed checks; each deliberate exception is a
`checkov.io/skipN: CKV_K8S_NN=<reason>` annotation where the object is made."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.chart import CHART, NAMESPACED, ROOT, helm
from wmtp_operator import render
from wmtp_operator.spec import Run

CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


def _checkov() -> Path:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: `make .venv-checkov/bin/checkov` installs checkov in its own venv "
                    "(`make test` does it first)")  # fmt: skip
    return CHECKOV


def _example_runs() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((ROOT / "configs").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "WMTPRun"
    ]


def _scanned(directory: Path) -> list[dict[str, Any]]:
    for name, values in {"chart-default": [], "chart-namespaced": NAMESPACED}.items():
        result = helm("template", "wmtp", str(CHART), "--namespace", "wmtp-system", *values)
        assert result.returncode == 0, result.stderr
        (directory / f"{name}.yaml").write_text(result.stdout)
    runs = _example_runs()
    assert runs, "configs/ has no example WMTPRun"
    gpu = [doc for doc in runs if "nvidia.com/gpu" in (doc["spec"].get("resources") or {}).get("limits", {})]
    assert gpu, "no example in configs/ runs on GPUs: their rendered pods go unscanned"
    for body in runs:
        body["metadata"] = {**body["metadata"], "namespace": "team-a", "uid": "5b0e7d1c-0000-4000-8000-000000000001"}
        run = Run.from_body(body)
        objects = render.attempt_objects(run, render.trainer_files(run), 1)
        if run.spec.eval is not None:
            objects.append(render.eval_job(run))
        (directory / f"run-{run.name}.yaml").write_text(yaml.safe_dump_all(objects))
    command = [str(_checkov()), "-d", str(directory), "--framework", "kubernetes", "--output", "json", "--compact",
               "--skip-download"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip(), result.stderr[-2000:]
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_finds_nothing_in_the_chart_or_the_rendered_runs(tmp_path: Path) -> None:
    reports = _scanned(tmp_path)
    failed = [
        f"{check['check_id']} {check['resource']} ({Path(check['file_path']).name}): {check['check_name']}"
        for report in reports
        for check in report.get("results", {}).get("failed_checks", [])
    ]
    passed = sum(report["summary"]["passed"] for report in reports)
    assert failed == [] and passed > 300, "\n".join(failed)
    assert sum(report["summary"]["parsing_errors"] for report in reports) == 0
    skipped = [check for report in reports for check in report.get("results", {}).get("skipped_checks", [])]
    assert skipped and all(check["check_result"].get("suppress_comment", "").strip() for check in skipped), (
        "a skip without a reason"
    )
